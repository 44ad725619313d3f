"""The rotary embedding in one kernel: ``higgs_rs.cuda.rope`` and ``fuse_rope``. On any machine,
that ``fuse_rope`` replaces transformers' ``apply_rotary_pos_emb`` once and leaves CPU results
unchanged; on a GPU the kernel against transformers' function bit for bit (float16 and bfloat16,
decode and prefill shapes, transposed and contiguous inputs, broadcast cos/sin), the cases it
declines, and a model's logits and greedy tokens with and without it."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import higgs_rs  # noqa: E402
from higgs_rs import cuda as hcuda  # noqa: E402
from higgs_rs.torch import fuse_rope  # noqa: E402

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and higgs_rs.cuda_available()),
    reason="needs a CUDA GPU and a CUDA build of higgs_rs",
)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _original_rope():
    from transformers.models.llama import modeling_llama

    fn = modeling_llama.apply_rotary_pos_emb
    return getattr(fn, "__higgs_original__", fn)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _tiny_family(family: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A 2-layer random model of one of the families whose RoPE ``fuse_rope`` replaces (not
    quantized: the replacement is the same for fp16 models)."""
    import transformers

    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    config = config_class(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval().to(device=device, dtype=dtype)


def _restore_original(model: torch.nn.Module) -> None:
    import sys

    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        fn = getattr(modeling, "apply_rotary_pos_emb", None)
        if fn is not None and hasattr(fn, "__higgs_original__"):
            modeling.apply_rotary_pos_emb = fn.__higgs_original__



def _tiny_llama(device: str = "cpu", dtype: torch.dtype = torch.float32, quantize: bool = True):
    model = _tiny_family("llama", device, dtype)
    if quantize:
        higgs_rs.patch(model, bits=4, p=2, group_size=64, seed=0)
    return model

def test_fuse_rope_replaces_the_function_once_and_keeps_cpu_results() -> None:
    from transformers.models.llama import modeling_llama

    model = _tiny_llama(quantize=False)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    original = _original_rope()
    modeling_llama.apply_rotary_pos_emb = original
    with torch.no_grad():
        before = model(ids).logits
    assert fuse_rope(model) == 1
    assert fuse_rope(model) == 0  # already replaced
    replaced = modeling_llama.apply_rotary_pos_emb
    assert replaced.__higgs_original__ is original and replaced.__name__ == original.__name__
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    # Other calling conventions go to the original.
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    for got, want in zip(replaced(q, k, cos, sin), original(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    for got, want in zip(
        replaced(qt, kt, cos, sin, unsqueeze_dim=2), original(qt, kt, cos, sin, unsqueeze_dim=2), strict=True
    ):
        assert torch.equal(got, want)


def test_patch_fuses_the_rope() -> None:
    from transformers.models.llama import modeling_llama

    modeling_llama.apply_rotary_pos_emb = _original_rope()
    _tiny_llama()
    assert hasattr(modeling_llama.apply_rotary_pos_emb, "__higgs_original__")


def _qk(
    batch: int, seq: int, q_heads: int, k_heads: int, dim: int, dtype: torch.dtype, transposed: bool,
    seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(heads: int) -> torch.Tensor:
        if transposed:  # as a projection's output: (batch, seq, heads * dim) viewed and transposed
            x = torch.randn(batch, seq, heads * dim, device="cuda", generator=g).to(dtype)
            return x.view(batch, seq, heads, dim).transpose(1, 2)
        return torch.randn(batch, heads, seq, dim, device="cuda", generator=g).to(dtype)

    return make(q_heads), make(k_heads)


def _cos_sin(cs_batch: int, seq: int, dim: int, dtype: torch.dtype, seed: int):
    # As LlamaRotaryEmbedding: cat(freqs, freqs) through cos / sin, cast to the activation dtype.
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    pos = torch.randint(0, 4096, (cs_batch, seq), device="cuda", generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "seq", "q_heads", "k_heads", "dim", "cs_batch", "transposed"),
    [
        (1, 1, 32, 8, 128, 1, True),  # a Llama-3-8B decode step
        (2, 7, 4, 2, 64, 2, True),
        (3, 5, 6, 6, 32, 1, True),  # cos/sin broadcast over the batch
        (2, 4, 4, 2, 64, 2, False),
        (1, 130, 8, 1, 96, 1, True),
    ],
)
def test_rope_kernel_gives_transformers_bits(
    dtype: torch.dtype,
    batch: int,
    seq: int,
    q_heads: int,
    k_heads: int,
    dim: int,
    cs_batch: int,
    transposed: bool,
) -> None:
    seed = _seed()
    q, k = _qk(batch, seq, q_heads, k_heads, dim, dtype, transposed, seed)
    cos, sin = _cos_sin(cs_batch, seq, dim, dtype, seed)
    want_q, want_k = _original_rope()(q, k, cos, sin)
    n = hcuda.fused_ropes
    got = hcuda.rope(q, k, cos, sin)
    assert got is not None and hcuda.fused_ropes == n + 1
    got_q, got_k = got
    torch.cuda.synchronize()
    for g_, w_, name in ((got_q, want_q, "q"), (got_k, want_k, "k")):
        assert g_.shape == w_.shape and g_.dtype == dtype, name
        assert torch.equal(g_, w_), f"{name} seed {seed}: {int((g_ != w_).sum())} values differ"
    # Inputs untouched.
    q2, k2 = _qk(batch, seq, q_heads, k_heads, dim, dtype, transposed, seed)
    assert torch.equal(q, q2) and torch.equal(k, k2)


@needs_gpu
def test_rope_falls_back_where_the_kernels_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a build without CUDA or NVRTC: transformers' function is replaced process-wide, so
    # its CUDA calls must fall back to the original, not raise.
    model = _tiny_family("llama", "cuda", torch.float16)
    fuse_rope(model)
    g = torch.Generator(device="cuda").manual_seed(5)
    ids = torch.randint(0, 128, (1, 5), device="cuda", generator=g)
    with torch.no_grad():
        want = model(ids).logits
        monkeypatch.setattr(hcuda, "_ROPE_READY", False)
        n = hcuda.fused_ropes
        got = model(ids).logits
    assert hcuda.fused_ropes == n
    assert torch.equal(got, want)


def test_rope_readiness_matches_the_build() -> None:
    ready = hasattr(higgs_rs._core, "cuda_rope") and higgs_rs.cuda_available()
    assert hcuda._rope_ready() == ready


@needs_gpu
def test_rope_declines_what_it_does_not_compute() -> None:
    q, k = _qk(1, 3, 4, 2, 64, torch.float16, True, 0)
    cos, sin = _cos_sin(1, 3, 64, torch.float16, 0)
    assert hcuda.rope(q.float(), k.float(), cos.float(), sin.float()) is None  # float32
    assert hcuda.rope(q, k, cos.float(), sin.float()) is None  # mixed dtypes
    assert hcuda.rope(q.cpu(), k.cpu(), cos.cpu(), sin.cpu()) is None
    assert hcuda.rope(q[..., :63], k[..., :63], cos[..., :63], sin[..., :63]) is None  # odd head size
    assert hcuda.rope(q, k, cos[:, :2], sin[:, :2]) is None  # positions differ
    assert hcuda.rope(q.transpose(2, 3), k, cos, sin) is None  # head_dim not contiguous
    with torch.enable_grad():
        assert hcuda.rope(q.clone().requires_grad_(), k, cos, sin) is None


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_rope_model_gives_the_same_logits_and_tokens(dtype: torch.dtype) -> None:
    model = _tiny_llama("cuda", dtype)
    g = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(0, 128, (2, 11), device="cuda", generator=g)
    flag = hcuda._FUSE_ROPE
    try:
        with torch.no_grad():
            hcuda._FUSE_ROPE = False
            n = hcuda.fused_ropes
            want = model(ids).logits
            want_tokens = higgs_rs.generate(model, ids[:1], 8, keep_graph=False)
            assert hcuda.fused_ropes == n
            hcuda._FUSE_ROPE = True
            got = model(ids).logits
            assert hcuda.fused_ropes == n + 2  # one per attention layer
            got_tokens = higgs_rs.generate(model, ids[:1], 8, keep_graph=False)
    finally:
        hcuda._FUSE_ROPE = flag
    assert torch.equal(got, want)
    assert torch.equal(got_tokens, want_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_fuse_rope_covers_the_llama_family(family: str) -> None:
    model = _tiny_family(family)
    _restore_original(model)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    assert fuse_rope(model) == 1
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@needs_gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_rope_gives_each_family_the_same_logits(family: str) -> None:
    model = _tiny_family(family, "cuda", torch.float16)
    fuse_rope(model)
    g = torch.Generator(device="cuda").manual_seed(4)
    ids = torch.randint(0, 128, (2, 9), device="cuda", generator=g)
    flag = hcuda._FUSE_ROPE
    try:
        with torch.no_grad():
            hcuda._FUSE_ROPE = False
            want = model(ids).logits
            hcuda._FUSE_ROPE = True
            n = hcuda.fused_ropes
            got = model(ids).logits
    finally:
        hcuda._FUSE_ROPE = flag
    assert hcuda.fused_ropes == n + 2
    assert torch.equal(got, want)
