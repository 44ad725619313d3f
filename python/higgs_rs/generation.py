"""Token generation with a static KV cache, the one-token step replayed from a CUDA graph.

Eager decoding on a GPU is bound by the CPU: every ``HiggsLinear`` call costs tens of
microseconds of Python and launch work, more than its kernel. Capturing the whole one-token
forward pass once and replaying it removes that cost, which is where the 4-bit weights' lower
memory traffic turns into tokens per second. ``generate`` does this for any transformers
causal LM whose forward pass can be captured (Llama, Qwen2, Mistral, SmolLM2, ...): the prompt
runs eagerly, then every new token is one graph replay plus a few tiny eager kernels (the next
token's id, its attention-mask slot, its position). Nothing is read back to the CPU until the end,
except one end-of-sequence check every ``eos_check_every`` tokens.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch


def _select_next(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token of each row, greedy or sampled (temperature, then top-k)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cache_lengths(cache: Any) -> list[torch.Tensor]:
    """The per-layer filled-length counters of a transformers ``StaticCache`` (tensors it advances
    in place on every forward pass), so a warm-up step can be undone."""
    return [
        layer.cumulative_length
        for layer in getattr(cache, "layers", [])
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
    ]


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    *,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    eos_check_every: int = 16,
) -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens after ``input_ids`` (batch × prompt length).

    Returns the prompt and the new tokens, like ``model.generate``: rows that produced an
    end-of-sequence token are padded after it with ``pad_token_id`` (default: the generation
    config's, else the first EOS id),
    and generation stops early once every row has finished.

    Args:
        model: a transformers causal LM (quantized with ``higgs_rs.load``/``patch`` or not).
        input_ids: token ids on the model's device; left-pad batched prompts and pass
            ``attention_mask`` (1 for real tokens) as for ``model.generate``.
        eos_token_id: id(s) that end a row; default: the model's generation config.
        do_sample, temperature, top_k, seed: sampling instead of greedy decoding.
        cuda_graph: replay the one-token step from a CUDA graph (default: on a CUDA device).
            ``False`` runs the same static-cache loop eagerly (on any device).
        compile: run the one-token step through ``torch.compile`` (kept on the model for later
            calls): TorchInductor fuses the small ops between the linear layers (norms, rotary
            embedding, residuals); ``HiggsLinear`` calls stay as they are (graph breaks). The first
            call compiles (tens of seconds for an 8B-shaped model).
        eos_check_every: tokens between the end-of-sequence checks (each reads one flag back).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be batch × prompt length with a non-empty prompt; got {tuple(input_ids.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling; got {temperature}")
    device = input_ids.device
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    if use_graph and device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs the model and input_ids on a CUDA device; they are on {device}"
        )

    config = getattr(model, "generation_config", None)
    eos_ids = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    generator = torch.Generator(device=device).manual_seed(seed) if do_sample and seed is not None else None

    # Plain tensors, not inference tensors, even under torch.inference_mode: the mask, positions
    # and cache are updated in place between steps, and CUDA HiggsLinear layers share one
    # activation rotation between q/k/v (gate/up) only for tensors with a version counter.
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", 32)
    limits = _compile_limits(layers) if compile else contextlib.nullcontext()
    with torch.inference_mode(False), torch.no_grad(), limits:
        return _generate(
            model,
            _compiled(model) if compile else model,
            input_ids,
            max_new_tokens,
            attention_mask,
            eos_ids,
            pad,
            do_sample,
            temperature,
            top_k,
            generator,
            use_graph,
            eos_check_every,
        )


def _generate(
    model: torch.nn.Module,
    step_model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None,
    eos_ids: list[int],
    pad: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    use_graph: bool,
    eos_check_every: int,
) -> torch.Tensor:
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    max_len = prompt_len + max_new_tokens
    # The attention mask covers the whole cache from the start (zeros for slots not yet written),
    # so its shape, address and the mask the model builds from it never change between steps.
    mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
    mask[:, :prompt_len] = 1 if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    # Positions count real tokens only (left padding), as model.generate does.
    positions = (mask[:, :prompt_len].cumsum(-1) - 1).clamp(min=0)
    cache = _static_cache(model, batch, max_len, device)
    new_tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    # transformers renamed `past_key_values` to `cache` (5.2x); older releases also want the
    # written cache slots as `cache_position`, newer ones count them inside the cache.
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    takes_slots = "cache_position" in params

    def forward(
        ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, run: torch.nn.Module = model
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {cache_kwarg: cache}
        if takes_slots:
            kwargs["cache_position"] = slots
        out = run(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kwargs
        )
        return out.logits[:, -1]

    logits = forward(input_ids, positions, torch.arange(prompt_len, device=device))
    if int(cache.get_seq_length()) != prompt_len:
        raise RuntimeError(
            f"{type(model).__name__} did not fill the static KV cache with the prompt "
            f"({int(cache.get_seq_length())} of {prompt_len} tokens): this transformers version or "
            "model is not supported by higgs_rs.generate; use model.generate"
        )
    next_token = _select_next(logits, do_sample, temperature, top_k, generator)
    new_tokens[:, 0] = next_token
    token_in = next_token.view(batch, 1).clone()
    position = positions[:, -1:].clone() + 1
    slot = torch.full((1,), prompt_len, dtype=torch.long, device=device)
    step: Callable[[], torch.Tensor]
    if use_graph and max_new_tokens > 1:
        step = _captured_step(lambda: forward(token_in, position, slot, step_model), cache)
    else:

        def step() -> torch.Tensor:
            return forward(token_in, position, slot, step_model)

    done = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    produced = 1
    for t in range(1, max_new_tokens):
        if eos_ids:
            done |= torch.isin(next_token, eos)
            if t % eos_check_every == 0 and bool(done.all()):
                break
        mask[:, prompt_len + t - 1] = 1
        logits = step()
        next_token = _select_next(logits, do_sample, temperature, top_k, generator)
        if eos_ids:
            next_token = torch.where(done, pad, next_token)
        new_tokens[:, t] = next_token
        token_in.copy_(next_token.view(batch, 1))
        position += 1
        slot += 1
        produced += 1
    return torch.cat([input_ids, new_tokens[:, :produced]], dim=1)


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)`` for one-token steps, made once per model (kept in the model's
    ``__dict__``, not registered as a submodule). ``HiggsLinear.forward`` is never traced: each
    call is a graph break and runs as it does eagerly."""
    compiled = model.__dict__.get("_higgs_rs_compiled")
    if compiled is None:
        compiled = torch.compile(model, dynamic=False)
        model.__dict__["_higgs_rs_compiled"] = compiled
    return compiled


def _compile_limits(layers: int) -> Any:
    """Dynamo specializes the code after each graph break on the layer index (one compiled
    version per decoder layer): allow that many, or the layers past the default 8 run eagerly."""
    import torch._dynamo.config as dynamo_config

    limit = max(dynamo_config.recompile_limit, 2 * layers + 8)
    return dynamo_config.patch(recompile_limit=limit, accumulated_recompile_limit=max(256, 16 * limit))


def _static_cache(model: torch.nn.Module, batch: int, max_len: int, device: torch.device) -> Any:
    """A transformers ``StaticCache`` for ``max_len`` tokens (its constructor changed in 5.0)."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:
        dtype = next(model.parameters()).dtype
        return StaticCache(
            model.config, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype
        )


def _captured_step(step: Callable[[], torch.Tensor], cache: Any) -> Callable[[], torch.Tensor]:
    """``step`` captured in a CUDA graph after one warm-up run (which compiles and allocates what
    the first call needs); the warm-up's advance of the cache is undone, so the first replay
    computes the same step again, writing the same cache slot."""
    lengths = _cache_lengths(cache)
    saved = [length.clone() for length in lengths]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for length, value in zip(lengths, saved, strict=True):
        length.copy_(value)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    return replay
