"""``higgs_rs.generate``: the static-cache decode loop against transformers' ``model.generate``
(on the CPU, every run), and its CUDA-graph replay against the same loop run eagerly (on a GPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import higgs_rs  # noqa: E402
from higgs_rs import generation  # noqa: E402
from higgs_rs.cuda import group_projections  # noqa: E402
from higgs_rs.generation import generate  # noqa: E402
from higgs_rs.torch import fuse_mlps, fuse_norms, fuse_residuals  # noqa: E402


def _tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random 2-layer Llama whose logits spread over several units (greedy picks are rarely
    near-ties, so two correct implementations agree token for token)."""
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _reference(model: torch.nn.Module, ids: torch.Tensor, new: int, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_transformers_generate(seed: int) -> None:
    model = _tiny_llama(seed)
    ids = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(seed))
    got = generate(model, ids, 20, cuda_graph=False)
    assert got.shape == (1, 29)
    assert torch.equal(got, _reference(model, ids, 20)), f"seed {seed}"


def test_left_padded_batch_matches_rows_alone() -> None:
    """Two prompts of different lengths, left-padded in one batch: each row's tokens are those of
    the prompt generated alone."""
    model = _tiny_llama(3)
    long = torch.randint(1, 300, (1, 10), generator=torch.Generator().manual_seed(3))
    short = long[:, 6:].flip(1)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    got = generate(model, batch, 12, attention_mask=mask, cuda_graph=False)
    assert torch.equal(got[0], generate(model, long, 12, cuda_graph=False)[0])
    assert torch.equal(got[1, 6:], generate(model, short, 12, cuda_graph=False)[0])


def test_stops_at_eos_and_pads_after_it() -> None:
    model = _tiny_llama(4)
    ids = torch.randint(1, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    free = generate(model, ids, 40, cuda_graph=False)
    eos = int(free[0, 5 + 3])  # row 0's fourth new token
    got = generate(model, ids, 40, eos_token_id=eos, pad_token_id=299, cuda_graph=False, eos_check_every=1)
    for row in range(2):
        new = free[row, 5:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert got[row, 5 : 5 + stop].tolist() == new[:stop]
        assert (got[row, 5 + stop :] == 299).all()
    # Row 0 finished at its fourth token; the loop ends once both rows have.
    rows_done = [free[r, 5:].tolist().index(eos) + 1 if eos in free[r, 5:].tolist() else 40 for r in range(2)]
    assert got.shape[1] == 5 + max(rows_done)


def test_sampling_is_reproducible_and_top_k_1_is_greedy() -> None:
    model = _tiny_llama(5)
    ids = torch.randint(1, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    a = generate(model, ids, 16, do_sample=True, temperature=0.8, seed=11, cuda_graph=False)
    b = generate(model, ids, 16, do_sample=True, temperature=0.8, seed=11, cuda_graph=False)
    assert torch.equal(a, b)
    assert torch.equal(
        generate(model, ids, 16, do_sample=True, top_k=1, seed=3, cuda_graph=False),
        generate(model, ids, 16, cuda_graph=False),
    )


def test_quantized_model_on_cpu(tmp_path: Path) -> None:
    """A model quantized in place (``patch``: LUT kernels on the codes) runs through the loop and
    matches its own ``model.generate``."""
    model = _tiny_llama(6)
    higgs_rs.patch(model, bits=4, p=2)
    ids = torch.randint(1, 300, (1, 7), generator=torch.Generator().manual_seed(6))
    assert torch.equal(generate(model, ids, 10, cuda_graph=False), _reference(model, ids, 10))


def test_bad_arguments_are_reported() -> None:
    model = _tiny_llama(7)
    with pytest.raises(ValueError, match="CUDA device"):
        generate(model, torch.tensor([[1, 2]]), 4, cuda_graph=True)
    with pytest.raises(ValueError, match="batch × prompt length"):
        generate(model, torch.tensor([1, 2]), 4)
    with pytest.raises(ValueError, match="at least 1"):
        generate(model, torch.tensor([[1, 2]]), 0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.tensor([[1, 2]]), 3, do_sample=True, temperature=0.0)


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU"
    if not higgs_rs.cuda_available():
        return higgs_rs.cuda_status()
    return None


@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")
@pytest.mark.parametrize("quantized", [False, True])
def test_cuda_graph_replay_matches_the_eager_loop(tmp_path: Path, quantized: bool) -> None:
    """On the GPU, in float16: the graph replays the very kernels the eager loop launches, so the
    tokens agree exactly; against transformers' own generate they agree up to float16 near-ties
    (checked teacher-forced on the float32 model)."""
    model = _tiny_llama(8)
    if quantized:
        higgs_rs.patch(model, bits=4, p=2)
    reference = _tiny_llama(8) if not quantized else None
    model = model.half().cuda()
    ids = torch.randint(1, 300, (2, 11), generator=torch.Generator().manual_seed(8)).cuda()
    eager = generate(model, ids, 24, cuda_graph=False)
    graph = generate(model, ids, 24)
    assert torch.equal(graph, eager)
    again = generate(model, ids, 24)
    assert torch.equal(again, graph), "a second captured run must give the same tokens"
    if reference is not None:
        with torch.no_grad():
            logits = reference.cuda()(graph).logits[:, 10:-1]
        chosen = logits.gather(2, graph[:, 11:, None])[..., 0]
        gap = logits.max(dim=2).values - chosen
        assert (gap < 0.05).all(), f"logit gaps {gap.tolist()}"
    # torch.compile fuses the ops between the linear layers, so float16 rounding may differ:
    # every token must still be the eager model's best up to rounding (teacher-forced).
    compiled = generate(model, ids, 24, compile=True)
    with torch.no_grad():
        logits = model(compiled).logits[:, 10:-1].float()
    chosen = logits.gather(2, compiled[:, 11:, None])[..., 0]
    gap = logits.max(dim=2).values - chosen
    assert (gap < 0.05).all(), f"compiled: logit gaps {gap.tolist()}"


@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")
def test_kept_graph_is_reused_until_the_model_or_shape_changes() -> None:
    model = _tiny_llama(9)
    higgs_rs.patch(model, bits=4, p=2)
    model = model.half().cuda()
    ids = torch.randint(1, 300, (2, 11), generator=torch.Generator().manual_seed(9)).cuda()
    captures = generation.captures
    first = generate(model, ids, 24)
    assert generation.captures == captures + 1
    assert torch.equal(generate(model, ids, 24), first)
    # Other prompt and output lengths within the same rounded cache length: the same graph.
    short = generate(model, ids[:, :5], 30)
    assert generation.captures == captures + 1
    assert torch.equal(short, generate(model, ids[:, :5], 30, cuda_graph=False))
    # Calls without a graph (eager, or one new token) leave the kept one alone.
    generate(model, ids, 1)
    assert torch.equal(generate(model, ids, 24), first)
    assert generation.captures == captures + 1
    # A replaced tensor (not an in-place edit) or another batch size: captured again.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert torch.equal(generate(model, ids, 24), first)
    assert generation.captures == captures + 2
    generate(model, ids[:1], 24)
    assert generation.captures == captures + 3
    # Kept outside the model: a copy is a plain model that captures its own.
    clone = copy.deepcopy(model)
    assert clone not in generation._kept and model in generation._kept
    # (Copies drop the fusions' links to their layers: set them up as `load` does.)
    group_projections(clone)
    fuse_norms(clone)
    fuse_mlps(clone)
    fuse_residuals(clone)
    assert torch.equal(generate(clone, ids[:1], 24), generate(model, ids[:1], 24))
    generate(model, ids, 24, keep_graph=False)
    assert model not in generation._kept
