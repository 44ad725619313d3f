"""Token generation with a static KV cache, the one-token step replayed from a CUDA graph.

Eager decoding on a GPU is bound by the CPU: every ``HiggsLinear`` call costs tens of
microseconds of Python and launch work, more than its kernel. Capturing the whole one-token
forward pass once and replaying it removes that cost, which is where the 4-bit weights' lower
memory traffic turns into tokens per second. ``generate`` does this for any transformers
causal LM whose forward pass can be captured (Llama, Qwen2, Mistral, SmolLM2, ...): the prompt
runs eagerly, then every new token is one graph replay plus a few tiny eager kernels (the next
token's id, its attention-mask slot, its position). Nothing is read back to the CPU until the end,
except one end-of-sequence check every ``eos_check_every`` tokens.

The captured step is kept for the model's next call (``keep_graph``; beside the model, not in
it): a call with the same batch size, cache length (prompt + new tokens, rounded up to
``CACHE_LEN_STEP``) and step model (compiled or not), while the model's parameters and buffers
are still the same tensors, resets the kept cache and replays the kept graph instead of warming
up and capturing again. The graph replays the kernels it captured: after changing how the model
computes (not its tensors: an attention implementation, a ``higgs_rs`` switch, a module swap that
keeps every tensor), call once with ``keep_graph=False``.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: The static cache's length (prompt + new tokens) is rounded up to a multiple of this, so calls
#: with other prompt or output lengths can reuse a kept graph (the extra slots are masked).
CACHE_LEN_STEP = 128
#: Graphs captured by ``generate`` (for tests and benches).
captures = 0


@dataclass
class _GraphSession:
    """A captured one-token step and the static tensors it reads and writes."""

    key: tuple[Any, ...]
    tensors: tuple[tuple[int, torch.dtype, tuple[int, ...]], ...]
    cache: Any
    mask: torch.Tensor
    token_in: torch.Tensor
    position: torch.Tensor
    slot: torch.Tensor
    step: Callable[[], torch.Tensor]


#: Each model's kept ``_GraphSession``, outside the model (pickles and copies of it stay plain;
#: nothing in a session refers to its model, so it is freed with the model).
_kept: weakref.WeakKeyDictionary[torch.nn.Module, _GraphSession] = weakref.WeakKeyDictionary()


def _model_tensors(model: torch.nn.Module) -> tuple[tuple[int, torch.dtype, tuple[int, ...]], ...]:
    """Address, dtype and shape of every parameter and buffer: a kept graph reads them by address,
    so it is replayed only while all are the same tensors (in-place edits are fine)."""
    return tuple(
        (t.data_ptr(), t.dtype, tuple(t.shape))
        for t in itertools.chain(model.parameters(), model.buffers())
    )


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
    keep_graph: bool = True,
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
        keep_graph: keep the captured step, its KV cache and static inputs for the model, so
            the next call with the same batch size and rounded cache length skips the warm-up
            and capture (~0.1 s for an 8B shape); ``False`` frees a kept one and keeps nothing.
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
            keep_graph,
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
    keep_graph: bool,
) -> torch.Tensor:
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    # Rounded up, but not past the model's context length (unless the call itself goes past it).
    needed = prompt_len + max_new_tokens
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or needed
    max_len = max(needed, min(-(-needed // CACHE_LEN_STEP) * CACHE_LEN_STEP, limit))
    # transformers renamed `past_key_values` to `cache` (5.2x); older releases also want the
    # written cache slots as `cache_position`, newer ones count them inside the cache.
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    takes_slots = "cache_position" in params
    use_graph = use_graph and max_new_tokens > 1
    key = (id(step_model), batch, max_len, device, cache_kwarg, takes_slots)
    # A call without a graph leaves the kept one alone (unless told not to keep it); a call with
    # one takes it if it fits, else drops it (its graph, cache and memory pool are freed).
    session = _kept.pop(model, None) if use_graph or not keep_graph else None
    if session is not None and not (keep_graph and session.key == key):
        session = None
    if session is not None:
        cache, mask = session.cache, session.mask
        cache.reset()
        mask.zero_()
    else:
        # The attention mask covers the whole cache from the start (zeros for slots not yet
        # written), so its shape, address and the mask the model builds from it never change.
        mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        cache = _static_cache(model, batch, max_len, device)
    mask[:, :prompt_len] = 1 if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    # Positions count real tokens only (left padding), as model.generate does.
    positions = (mask[:, :prompt_len].cumsum(-1) - 1).clamp(min=0)
    new_tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)

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
    step: Callable[[], torch.Tensor]
    # Compared after the prompt's pass, which may have replaced buffers (the first GPU call
    # repacks HIGGS codes): the graph must read the tensors the model holds now.
    tensors = _model_tensors(model) if use_graph and keep_graph else ()
    if session is not None and session.tensors != tensors:
        session = None  # its cache and mask stay in use; its graph is freed
    if session is not None:
        token_in, position, slot, step = session.token_in, session.position, session.slot, session.step
        token_in.copy_(next_token.view(batch, 1))
        position.copy_(positions[:, -1:] + 1)
        slot.fill_(prompt_len)
    else:
        token_in = next_token.view(batch, 1).clone()
        position = positions[:, -1:].clone() + 1
        slot = torch.full((1,), prompt_len, dtype=torch.long, device=device)
    if use_graph and session is None:
        global captures
        step = _captured_step(lambda: forward(token_in, position, slot, step_model), cache)
        captures += 1
        session = _GraphSession(key, tensors, cache, mask, token_in, position, slot, step)
    elif not use_graph:

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
    if session is not None and keep_graph:
        _kept[model] = session
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
