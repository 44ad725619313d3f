"""Sibling layers (q/k/v, gate/up) computed by one CUDA launch: grouping rules on any machine,
results against float64 and against separate launches on a GPU (skipped elsewhere)."""

from __future__ import annotations

import copy
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import higgs_rs  # noqa: E402
from higgs_rs import cuda as hcuda  # noqa: E402
from higgs_rs.torch import HiggsLinear  # noqa: E402

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and higgs_rs.cuda_available()),
    reason="needs a CUDA GPU and a CUDA build of higgs_rs",
)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _layers(
    rows: list[int], in_f: int, seed: int, h: int | None = None, device: str = "cpu", bits: int = 4
) -> list[HiggsLinear]:
    """Layers with one sign seed over the same input width (as one checkpoint's q/k/v); each
    carries its dequantized weights as ``w_deq`` (float64, for references)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        w = (rng.standard_normal((r, in_f)) * 0.02).astype(np.float32)
        q = higgs_rs.quantize_tensor(w, bits=bits, p=2, hadamard_size=h, group_size=64, seed=seed % 1000)
        layer = HiggsLinear.from_quantized(q).to(device)
        layer.w_deq = torch.from_numpy(higgs_rs.dequantize(q)).double().to(device)
        out.append(layer)
    return out


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


class _Attention(torch.nn.Module):
    def __init__(self, q: HiggsLinear, k: HiggsLinear, v: HiggsLinear) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q, k, v


def test_group_rules() -> None:
    a, b = _layers([64, 32], 256, 1)
    (c,) = _layers([64], 512, 1)
    with pytest.raises(ValueError, match="share input width"):
        hcuda.group_layers([a, c])
    with pytest.raises(ValueError, match="2 or 3"):
        hcuda.group_layers([a])
    with pytest.raises(ValueError, match="twice"):
        hcuda.group_layers([a, a])
    (d,) = _layers([32], 256, 2)  # another sign seed
    with pytest.raises(ValueError, match="signs differ"):
        hcuda.group_layers([a, d])
    hcuda.group_layers([a, b])
    assert hcuda.siblings_of(a) == [a, b] and hcuda.siblings_of(b) == [a, b]


def test_group_projections_finds_qkv_and_copies_stay_ungrouped() -> None:
    q, k, v = _layers([64, 32, 32], 256, 2)
    model = torch.nn.ModuleDict({"attn": _Attention(q, k, v)})
    assert hcuda.group_projections(model) == 1
    assert hcuda.siblings_of(k) == [q, k, v]
    clone = copy.deepcopy(model)
    assert hcuda.siblings_of(clone.attn.q_proj) is None, "a deep copy must not use the original's layers"
    assert hcuda.siblings_of(model.attn.q_proj) == [q, k, v]
    restored = pickle.loads(pickle.dumps(model))
    assert hcuda.siblings_of(restored.attn.k_proj) is None
    # A different width is left alone.
    (odd,) = _layers([32], 512, 2)
    model2 = torch.nn.ModuleDict({"attn": _Attention(*_layers([64, 32], 256, 3), odd)})
    assert hcuda.group_projections(model2) == 0


@needs_gpu
@pytest.mark.parametrize(
    "rows,in_f,h,bits,one_launch",
    [
        ([512, 128, 128], 1024, None, 4, True),
        ([256, 256], 1536, None, 4, True),
        ([208, 64, 48], 576, 64, 4, True),  # padded width 576: no layer tiles
        ([202, 98, 40], 512, None, 4, True),  # no layer tiles, rows not a multiple of 4
        ([200, 96, 48], 512, None, 4, False),  # 96 and 48 rows tile, 200 does not: separate launches
        ([256, 64, 64], 1024, None, 3, True),
        ([256, 64, 64], 1024, None, 2, True),
    ],
    ids=["qkv", "gate_up", "odd_widths", "untiled", "mixed", "3bit", "2bit"],
)
def test_grouped_launch_matches_float64(
    rows: list[int], in_f: int, h: int | None, bits: int, one_launch: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hcuda, "GROUP_MODE", "always")  # eager calls grouped too
    seed = _seed()
    layers = _layers(rows, in_f, seed, h, device="cuda", bits=bits)
    hcuda.group_layers(layers)
    for batch in (1, 4, 16, 40, 100):
        x = torch.randn(batch, in_f, device="cuda").half()
        launches, hits = hcuda.grouped_launches, hcuda.grouped_hits
        ys = [layer(x) for layer in layers]
        torch.cuda.synchronize()
        grouped = one_launch and batch <= 4  # the lut_gemv path at group size 64
        assert hcuda.grouped_launches - launches == int(grouped), f"batch {batch}"
        assert hcuda.grouped_hits - hits == (len(layers) - 1) * int(grouped), f"batch {batch}"
        for i, (layer, y) in enumerate(zip(layers, ys, strict=True)):
            what = f"batch {batch} layer {i} seed {seed}"
            assert y.shape == (batch, rows[i]) and torch.isfinite(y).all(), what
            assert _relative_error(y, x.double() @ layer.w_deq.t()) < 1e-3, what
            # A tuning override never groups: a launch of this layer alone.
            alone = hcuda.lut_linear(layer, x, mt=1)
            assert _relative_error(y, alone) < 1e-3, what


@needs_gpu
def test_grouped_outputs_follow_input_and_weight_edits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hcuda, "GROUP_MODE", "always")
    seed = _seed()
    q, k, v = _layers([256, 64, 64], 512, seed, device="cuda")
    hcuda.group_layers([q, k, v])
    x = torch.randn(2, 512, device="cuda").half()
    y_q = q(x)
    x.mul_(2)  # in place: k and v must see the new values
    hits = hcuda.grouped_hits
    y_k, y_v = k(x), v(x)
    assert hcuda.grouped_hits == hits + 1, "k relaunches the group on the edited input, v takes its output"
    for layer, y, scale in ((q, y_q, 0.5), (k, y_k, 1.0), (v, y_v, 1.0)):
        assert _relative_error(y, scale * x.double() @ layer.w_deq.t()) < 1e-3, f"seed {seed}"
    # A caller's output buffer gets the precomputed result copied in.
    x3 = torch.randn(2, 512, device="cuda").half()
    q(x3)
    out = torch.full((2, 64), float("nan"), dtype=torch.float16, device="cuda")
    hits = hcuda.grouped_hits
    assert hcuda.lut_linear(v, x3, out) is out and hcuda.grouped_hits == hits + 1
    assert _relative_error(out, x3.double() @ v.w_deq.t()) < 1e-3, f"seed {seed}"
    # A weight edit between the grouped launch and the sibling's call.
    x2 = torch.randn(2, 512, device="cuda").half()
    q(x2)
    k.scales.mul_(0.5)
    y_k2 = k(x2)
    assert _relative_error(y_k2, 0.5 * x2.double() @ k.w_deq.t()) < 1e-3, f"seed {seed}"
    k.scales.mul_(2)


@needs_gpu
def test_grouped_launch_in_a_cuda_graph() -> None:
    """The default mode: a group's first eager call is grouped (its kernel compiles outside any
    capture), later eager calls run layer by layer, a capture holds one grouped launch."""
    assert hcuda.GROUP_MODE == "graph"
    seed = _seed()
    layers = _layers([512, 128, 128], 1024, seed, device="cuda")
    hcuda.group_layers(layers)
    static_x = torch.randn(1, 1024, device="cuda").half()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launches = hcuda.grouped_launches
        for _ in range(3):
            eager = [layer(static_x) for layer in layers]
        assert hcuda.grouped_launches == launches + 1, "only the first eager call is grouped"
        for layer, y in zip(layers, eager, strict=True):
            assert _relative_error(y, static_x.double() @ layer.w_deq.t()) < 1e-3, f"seed {seed}"
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    launches = hcuda.grouped_launches
    with torch.cuda.graph(graph):
        static_ys = [layer(static_x) for layer in layers]
    assert hcuda.grouped_launches == launches + 1, "the capture should hold one grouped launch"
    for _ in range(3):
        fresh = torch.randn(1, 1024, device="cuda").half()
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        for i, (layer, y) in enumerate(zip(layers, static_ys, strict=True)):
            err = _relative_error(y, fresh.double() @ layer.w_deq.t())
            assert err < 1e-3, f"layer {i} seed {seed}: {err}"
