"""Residual adds computed by the projections before them: ``HiggsLinear(x, residual=r)``,
``HiggsGatedMLP(x, residual=r)`` and ``fuse_residuals`` (the decoder layer's forward). On any
machine the forms against ``r + layer(x)`` and a fused transformers model against its unfused
copy; on a GPU the LUT-GEMM's ``addend`` (the kernel adds the residual as it writes) bit for bit
against PyTorch's add."""

from __future__ import annotations

import copy
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import higgs_rs  # noqa: E402
from higgs_rs import cuda as hcuda  # noqa: E402
from higgs_rs.torch import HiggsGatedMLP, HiggsLinear, fuse_residuals  # noqa: E402

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and higgs_rs.cuda_available()),
    reason="needs a CUDA GPU and a CUDA build of higgs_rs",
)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _layer(rows: int, in_f: int, seed: int, bias: bool = False, device: str = "cpu") -> HiggsLinear:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, in_f)) * 0.02).astype(np.float32)
    q = higgs_rs.quantize_tensor(w, bits=4, p=2, group_size=64, seed=seed % 1000)
    b = torch.from_numpy(rng.standard_normal(rows).astype(np.float32)) if bias else None
    return HiggsLinear.from_quantized(q, bias=b).to(device)


def _tiny_llama(device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)
    higgs_rs.patch(model, bits=4, p=2, group_size=64, seed=0)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_residual_is_added_after_the_layer(dtype: torch.dtype, bias: bool) -> None:
    layer = _layer(96, 128, 3, bias=bias)
    x = torch.randn(2, 3, 128).to(dtype)
    r = torch.randn(2, 3, 96).to(dtype)
    assert torch.equal(layer(x, residual=r), r + layer(x))
    assert torch.equal(layer(x, r), r + layer(x))


def test_gated_mlp_adds_the_residual() -> None:
    gate, up, down = _layer(64, 32, 1), _layer(64, 32, 2), _layer(32, 64, 3)
    mlp = HiggsGatedMLP(gate, up, down, torch.nn.SiLU())
    x, r = torch.randn(3, 32), torch.randn(3, 32)
    assert torch.equal(mlp(x, residual=r), r + mlp(x))


def test_fuse_residuals_gives_the_unfused_logits() -> None:
    model = _tiny_llama()
    layers = model.model.layers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    # `patch` (and `load`) fused them; a second call finds nothing left to fuse.
    assert all(isinstance(layer, LlamaDecoderLayer) for layer in layers)
    assert [type(layer).__name__ for layer in layers] == ["HiggsLlamaDecoderLayer"] * 2
    assert fuse_residuals(model) == 0
    # Copies are of the original class again: they add with PyTorch.
    plain = copy.deepcopy(model)
    assert type(plain.model.layers[0]) is LlamaDecoderLayer
    assert set(plain.state_dict()) == set(model.state_dict())
    # (Before any call with output_hidden_states: transformers' recording hooks do not pickle.)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.model.layers[1]) is LlamaDecoderLayer
    assert fuse_residuals(clone) == 2
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(clone(ids).logits, plain(ids).logits)
        got = model(ids, output_hidden_states=True)
        ref = plain(ids, output_hidden_states=True)
    assert torch.equal(got.logits, ref.logits)
    # transformers records each decoder layer's output by its class: still one per layer.
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(got.hidden_states, ref.hidden_states, strict=True):
        assert torch.equal(a, b)
    o_proj = layers[0].self_attn.o_proj
    assert "_higgs_pending_residual" not in o_proj.__dict__, "the hand-over is cleared"


def test_fused_decoder_keeps_gradients_through_the_residual() -> None:
    model = _tiny_llama()
    embeds = torch.randn(1, 4, 256, requires_grad=True)
    model(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and float(embeds.grad.abs().sum()) > 0


def test_the_hand_over_is_cleared_when_the_attention_fails() -> None:
    model = _tiny_llama()
    layer = model.model.layers[0]
    with pytest.raises(TypeError):
        layer(torch.randn(1, 2, 256))  # no position embeddings: the attention cannot unpack None
    assert "_higgs_pending_residual" not in layer.self_attn.o_proj.__dict__


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "in_f", "batch", "tuning"),
    [
        (512, 1024, 1, {}),
        (4096, 1024, 1, {}),
        (1024, 4096, 1, {"splits": 8}),
        (1000, 576, 3, {}),
        (512, 1024, 4, {}),
        (512, 1024, 8, {}),
        (1024, 4096, 16, {}),
        (1024, 4096, 64, {}),
        (1024, 4096, 64, {"mt": 1, "splits": 4}),
        (2048, 1024, 33, {"mt": 2, "splits": 1}),
        (512, 1024, 80, {}),
    ],
)
def test_lut_gemm_adds_the_residual_as_pytorch_does(
    dtype: torch.dtype, rows: int, in_f: int, batch: int, tuning: dict
) -> None:
    seed = _seed()
    torch.manual_seed(seed)
    layer = _layer(rows, in_f, seed, device="cuda")
    x = torch.randn(batch, in_f, device="cuda").to(dtype)
    r = (torch.randn(batch, rows, device="cuda") * 3).to(dtype)
    before = hcuda.fused_residuals
    got = hcuda.lut_linear(layer, x, addend=r, **tuning)
    assert hcuda.fused_residuals == before + (batch < hcuda.DENSE_MIN_BATCH)
    ref = r + hcuda.lut_linear(layer, x, **tuning)
    assert torch.equal(got, ref), f"seed {seed}"
    # Into a given output, even the addend itself.
    out = torch.full_like(r, float("nan"))
    assert torch.equal(hcuda.lut_linear(layer, x, out, addend=r, **tuning), ref)
    assert torch.equal(hcuda.lut_linear(layer, x, r, addend=r, **tuning), ref), f"seed {seed}"


@needs_gpu
def test_addend_of_another_shape_is_refused() -> None:
    layer = _layer(128, 256, 1, device="cuda")
    x = torch.randn(2, 256, device="cuda").half()
    with pytest.raises(ValueError, match="addend must be"):
        hcuda.lut_linear(layer, x, addend=torch.zeros(2, 64, device="cuda").half())
    with pytest.raises(ValueError, match="addend must be"):
        hcuda.lut_linear(layer, x, addend=torch.zeros(2, 128, device="cuda"))


@needs_gpu
def test_residual_with_bias_or_gradients_is_added_by_pytorch() -> None:
    layer = _layer(256, 512, 2, bias=True, device="cuda")
    x = torch.randn(1, 512, device="cuda").half()
    r = torch.randn(1, 256, device="cuda").half()
    before = hcuda.fused_residuals
    with torch.no_grad():
        assert torch.equal(layer(x, residual=r), r + layer(x))
    assert hcuda.fused_residuals == before, "the bias comes before the residual"
    plain = _layer(256, 512, 2, device="cuda")
    tracked = r.clone().requires_grad_()
    y = plain(x, residual=tracked)
    assert hcuda.fused_residuals == before and y.grad_fn is not None
    y.float().sum().backward()
    assert tracked.grad is not None


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_decoder_on_the_gpu_matches_pytorch_adds(dtype: torch.dtype) -> None:
    model = _tiny_llama("cuda", dtype)
    ids = torch.tensor([[1, 5, 9, 3]], device="cuda")
    with torch.no_grad():
        before = hcuda.fused_residuals
        got = model(ids).logits
        assert hcuda.fused_residuals == before + 4, "o and down of both layers"
        hcuda._FUSE_RESIDUAL = False
        try:
            ref = model(ids).logits
        finally:
            hcuda._FUSE_RESIDUAL = True
        assert hcuda.fused_residuals == before + 4
    assert torch.equal(got, ref)


@needs_gpu
def test_fused_decoder_in_a_cuda_graph() -> None:
    model = _tiny_llama("cuda", torch.float16)
    layer = model.model.layers[0]
    rotary = model.model.rotary_emb
    static_x = torch.randn(1, 1, 256, device="cuda").half()
    position_ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        emb = rotary(static_x, position_ids)

        def step() -> torch.Tensor:
            return layer(static_x, position_embeddings=emb, position_ids=position_ids)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        before = hcuda.fused_residuals
        with torch.cuda.graph(graph):
            static_y = step()
        assert hcuda.fused_residuals == before + 2
        for _ in range(3):
            static_x.copy_(torch.randn(1, 1, 256, device="cuda").half())
            graph.replay()
            torch.cuda.synchronize()
            hcuda._FUSE_RESIDUAL = False
            try:
                ref = step()
            finally:
                hcuda._FUSE_RESIDUAL = True
            assert torch.equal(static_y, ref)


def test_fused_decoder_traced_by_dynamo_gives_the_same_logits() -> None:
    """Under torch.compile the attention's add is traced and the MLP's stays in the down
    projection (a graph break, like every HIGGS module)."""
    model = _tiny_llama()
    plain = copy.deepcopy(model)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(ids).logits, plain(ids).logits)
