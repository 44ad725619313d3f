"""``HiggsRMSNorm``/``fuse_norms`` and ``HiggsGatedMLP``/``fuse_mlps``: the formulas and the module
swaps on any machine; on a GPU the fused prologue + rotation kernels against PyTorch and against the
Hadamard kernel they replace."""

from __future__ import annotations

import copy
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import higgs_rs  # noqa: E402
from higgs_rs import cuda as hcuda  # noqa: E402
from higgs_rs.torch import HiggsGatedMLP, HiggsLinear, HiggsRMSNorm, fuse_mlps, fuse_norms  # noqa: E402

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and higgs_rs.cuda_available()),
    reason="needs a CUDA GPU and a CUDA build of higgs_rs",
)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _layer(rows: int, in_f: int, seed: int, h: int | None = None, device: str = "cpu") -> HiggsLinear:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, in_f)) * 0.02).astype(np.float32)
    q = higgs_rs.quantize_tensor(w, bits=4, p=2, hadamard_size=h, group_size=64, seed=seed % 1000)
    layer = HiggsLinear.from_quantized(q).to(device)
    layer.w_deq = torch.from_numpy(higgs_rs.dequantize(q)).double().to(device)
    return layer


def _llama_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, written out."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _assert_close_in_ulps(got: torch.Tensor, ref: torch.Tensor, seed: int) -> None:
    """At least 99% of the values equal, none more than two units in the last place apart."""
    ulp = 2.0**-10 if got.dtype == torch.float16 else 2.0**-7
    diff = (got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-3)
    assert float(diff.max()) <= 2 * ulp, f"seed {seed}: {float(diff.max())}"
    equal = float((got == ref).float().mean())
    assert equal >= 0.99, f"seed {seed}: {equal:.4f} equal"


class _Block(torch.nn.Module):
    """A decoder layer's attention input: a norm, then q/k/v reading its output."""

    def __init__(self, norm: torch.nn.Module, q: HiggsLinear, k: HiggsLinear, v: HiggsLinear) -> None:
        super().__init__()
        self.input_layernorm = norm
        self.self_attn = torch.nn.Module()
        self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj = q, k, v

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.input_layernorm(x)
        a = self.self_attn
        return [a.q_proj(h), a.k_proj(h), a.v_proj(h)]


class _Mlp(torch.nn.Module):
    """transformers' LlamaMLP."""

    def __init__(self, gate: HiggsLinear, up: HiggsLinear, down: HiggsLinear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate, up, down, torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_forward_is_the_llama_norm(dtype: torch.dtype) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert transformers is not None
    torch.manual_seed(0)
    ref = LlamaRMSNorm(256, eps=1e-5).to(dtype)
    ref.weight.data.uniform_(0.5, 1.5)
    norm = HiggsRMSNorm(ref.weight, 1e-5, _layer(32, 256, 1))
    x = (torch.randn(3, 5, 256) * 4).to(dtype)
    assert torch.equal(norm(x), ref(x))
    assert norm.variance_epsilon == 1e-5


def test_fuse_norms_swaps_llama_norms_and_keeps_the_state_dict() -> None:
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
    model = LlamaForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            p.data.uniform_(0.5, 1.5)
    keys = set(model.state_dict())
    higgs_rs.patch(model, bits=4, p=2, group_size=64, seed=0)
    norms = [m for m in model.modules() if isinstance(m, HiggsRMSNorm)]
    assert len(norms) == 4, "two norms per decoder layer; the final norm feeds the fp head"
    assert sum(isinstance(m, HiggsGatedMLP) for m in model.modules()) == 2
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    # The swap keeps every key; the quantized layers changed theirs.
    norm_keys = {k for k in keys if "layernorm" in k}
    assert norm_keys <= set(model.state_dict())
    assert set(model.state_dict()) == set(higgs_state_keys(model)), "the swaps keep every key"
    assert fuse_norms(model) == 0 and fuse_mlps(model) == 0, "fused modules are not swapped again"
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        got = model(ids).logits
        # The same model with plain norms and MLPs again (same weights): the same logits on the CPU.
        plain = copy.deepcopy(model)
        for layer in plain.model.layers:
            mlp = _Mlp(layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            layer.mlp = mlp
            for name in ("input_layernorm", "post_attention_layernorm"):
                fused = getattr(layer, name)
                from transformers.models.llama.modeling_llama import LlamaRMSNorm

                back = LlamaRMSNorm(256, eps=fused.eps)
                back.weight = fused.weight
                setattr(layer, name, back)
        assert torch.equal(plain(ids).logits, got)
        # Copies keep working (their norms lose the link to the original's layers).
        clone = pickle.loads(pickle.dumps(model))
        assert clone.model.layers[0].input_layernorm.__dict__.get("_higgs_norm_consumer") is None
        assert torch.equal(clone(ids).logits, got)


def higgs_state_keys(model: torch.nn.Module) -> list[str]:
    """The state dict keys of ``model`` with its fused modules swapped back to plain ones."""
    plain = copy.deepcopy(model)
    for module in list(plain.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, HiggsGatedMLP):
                setattr(module, name, _Mlp(child.gate_proj, child.up_proj, child.down_proj))
    return list(plain.state_dict())


def test_phi3_fused_projections_take_the_fused_norms() -> None:
    pytest.importorskip("transformers")
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    layer = torch.nn.Module()
    layer.input_layernorm = Phi3RMSNorm(256, eps=1e-5)
    layer.post_attention_layernorm = Phi3RMSNorm(256, eps=1e-5)
    layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
    layer.self_attn.qkv_proj = _layer(96, 256, 4)
    layer.mlp.gate_up_proj = _layer(128, 256, 4)
    assert fuse_norms(layer) == 2
    assert layer.input_layernorm.__dict__["_higgs_norm_consumer"]() is layer.self_attn.qkv_proj
    assert layer.post_attention_layernorm.__dict__["_higgs_norm_consumer"]() is layer.mlp.gate_up_proj


def test_torch_rmsnorm_is_fused_with_named_pairs() -> None:
    q, k, v = (_layer(r, 256, 3) for r in (64, 32, 32))
    block = _Block(torch.nn.RMSNorm(256, eps=1e-6), q, k, v)
    assert fuse_norms(block, pairs=(("input_layernorm", "self_attn.q_proj"),)) == 1
    assert isinstance(block.input_layernorm, HiggsRMSNorm)
    x = torch.randn(2, 256)
    ref = torch.nn.functional.rms_norm(x, (256,), block.input_layernorm.weight, 1e-6)
    torch.testing.assert_close(block.input_layernorm(x), ref)
    # A norm without a weight, or of another width than its reader, stays.
    other = _Block(torch.nn.RMSNorm(256, elementwise_affine=False), q, k, v)
    assert fuse_norms(other, pairs=(("input_layernorm", "self_attn.q_proj"),)) == 0


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("in_f", "h", "batch"), [(4096, None, 1), (4096, 1024, 3), (576, 64, 2), (1536, 512, 1)]
)
def test_fused_norm_feeds_the_next_call(dtype: torch.dtype, in_f: int, h: int | None, batch: int) -> None:
    seed = _seed()
    torch.manual_seed(seed)
    layer = _layer(256, in_f, seed, h, device="cuda")
    weight = torch.nn.Parameter((torch.rand(in_f, device="cuda") + 0.5).to(dtype))
    norm = HiggsRMSNorm(weight, 1e-5, layer)
    x = (torch.randn(batch, 1, in_f, device="cuda") * 3).to(dtype)
    fused = hcuda.fused_prologues
    with torch.no_grad():
        y = norm(x)
        assert hcuda.fused_prologues == fused + 1
        ref = _llama_norm(x, weight, 1e-5)
        # The sum of squares is ordered differently, so x * inv may round the other way: almost all
        # equal, the rest at most two units in the last place apart (two roundings).
        _assert_close_in_ulps(y, ref, seed)
        shared = hcuda.shared_rotations
        out = layer(y)
        assert hcuda.shared_rotations == shared + 1, "the call should reuse the fused rotation"
        # The same rotation as the Hadamard kernel of a fresh call on the same values.
        assert torch.equal(out, layer(y.clone())), f"seed {seed}"
        # An in-place edit of the norm's output: the call rotates again.
        norm(x)
        y2 = norm(x)
        y2.mul_(2)
        shared = hcuda.shared_rotations
        assert torch.equal(layer(y2), layer(y2.clone())), f"seed {seed}"
        assert hcuda.shared_rotations == shared


@needs_gpu
def test_fused_norm_in_a_cuda_graph() -> None:
    seed = _seed()
    torch.manual_seed(seed)
    q, k, v = (_layer(r, 1024, seed, device="cuda") for r in (512, 128, 128))
    weight = torch.nn.Parameter((torch.rand(1024, device="cuda") + 0.5).half())
    block = _Block(torch.nn.RMSNorm(1024, eps=1e-5).cuda().half(), q, k, v)
    block.input_layernorm.weight = weight
    hcuda.group_projections(block)
    assert fuse_norms(block) == 1
    deq = [m.w_deq for m in (q, k, v)]
    static_x = torch.randn(1, 1, 1024, device="cuda").half()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                block(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        fused, shared = hcuda.fused_prologues, hcuda.shared_rotations
        with torch.cuda.graph(graph):
            static_ys = block(static_x)
        assert hcuda.fused_prologues == fused + 1
        assert hcuda.shared_rotations == shared + 1, "the grouped q/k/v launch should reuse the rotation"
        for _ in range(3):
            fresh = torch.randn(1, 1, 1024, device="cuda").half()
            static_x.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            h = _llama_norm(fresh, weight, 1e-5).double().view(1, -1)
            for i, (y, w) in enumerate(zip(static_ys, deq, strict=True)):
                ref = h @ w.t()
                err = float((y.double().view(1, -1) - ref).norm() / ref.norm())
                assert err < 1e-3, f"layer {i} seed {seed}: {err}"


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("mlp", "h", "batch"), [(14336, None, 1), (14336, None, 2), (1536, None, 3), (4096, 1024, 1)]
)
def test_fused_gate_feeds_the_down_projection(
    dtype: torch.dtype, mlp: int, h: int | None, batch: int
) -> None:
    """silu(gate) * up and its rotation in one kernel: 14336 runs the cluster kernel at batch 1-2,
    1536 (12 * 128) the small-order path, 4096 with Hadamard 1024 several tiles a row."""
    seed = _seed()
    torch.manual_seed(seed)
    down = _layer(512, mlp, seed, h, device="cuda")
    gate = (torch.randn(batch, 1, mlp, device="cuda") * 3).to(dtype)
    up = torch.randn(batch, 1, mlp, device="cuda").to(dtype)
    fused = hcuda.fused_prologues
    with torch.no_grad():
        product = hcuda.silu_mul_rotate(gate, up, down)
        assert product is not None and hcuda.fused_prologues == fused + 1
        _assert_close_in_ulps(product, torch.nn.functional.silu(gate) * up, seed)
        shared = hcuda.shared_rotations
        out = down(product)
        assert hcuda.shared_rotations == shared + 1, "the call should reuse the fused rotation"
        assert torch.equal(out, down(product.clone())), f"seed {seed}"
        assert hcuda.silu_mul_rotate(gate, up[..., :-1], down) is None


@needs_gpu
def test_fused_mlp_in_a_cuda_graph() -> None:
    seed = _seed()
    torch.manual_seed(seed)
    gate, up = (_layer(1536, 512, seed, device="cuda") for _ in range(2))
    down = _layer(512, 1536, seed + 1, device="cuda")
    mlp = torch.nn.ModuleDict({"mlp": _Mlp(gate, up, down)})
    hcuda.group_layers([gate, up])
    assert fuse_mlps(mlp, classes=frozenset({"_Mlp"})) == 1
    static_x = torch.randn(1, 1, 512, device="cuda").half()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                mlp["mlp"](static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        fused = hcuda.fused_prologues
        with torch.cuda.graph(graph):
            static_y = mlp["mlp"](static_x)
        assert hcuda.fused_prologues == fused + 1
        for _ in range(3):
            fresh = torch.randn(1, 1, 512, device="cuda").half()
            static_x.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            x = fresh.double().view(1, -1)
            hidden = torch.nn.functional.silu(x @ gate.w_deq.t()) * (x @ up.w_deq.t())
            ref = hidden @ down.w_deq.t()
            err = float((static_y.double().view(1, -1) - ref).norm() / ref.norm())
            assert err < 2e-3, f"seed {seed}: {err}"


@needs_gpu
def test_fused_norm_leaves_autograd_to_pytorch() -> None:
    """With gradients wanted the norm runs in PyTorch (the kernel keeps no graph)."""
    layer = _layer(128, 1024, 5, device="cuda")
    weight = torch.nn.Parameter(torch.ones(1024, device="cuda").half())
    norm = HiggsRMSNorm(weight, 1e-5, layer)
    x = torch.randn(1, 1024, device="cuda").half()
    fused = hcuda.fused_prologues
    y = norm(x)
    assert hcuda.fused_prologues == fused and y.grad_fn is not None
    y.float().sum().backward()
    assert weight.grad is not None
    with torch.no_grad():
        norm(x)
    assert hcuda.fused_prologues == fused + 1
