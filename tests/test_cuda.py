"""CUDA kernels against the CPU reference: the activation Hadamard transform against
``higgs_rs.hadamard_transform``, and the LUT-GEMM against dequantize-then-matmul in float64.

Every run draws fresh random inputs (the seed is in each failure message) and poisons outputs with
NaN before the call, so an unwritten element fails. Without a GPU (or a CUDA build) the GPU tests
skip with the reason; ``HIGGS_CUDA_QUICK=1`` runs a reduced set (used under compute-sanitizer).
"""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import higgs_rs  # noqa: E402
from higgs_rs import cuda as hcuda  # noqa: E402
from higgs_rs.torch import HiggsLinear  # noqa: E402


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU"
    if not higgs_rs.cuda_available():
        return higgs_rs.cuda_status()
    return None


SKIP_REASON = _skip_reason()
needs_gpu = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
QUICK = os.environ.get("HIGGS_CUDA_QUICK", "") not in ("", "0")


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def test_status_is_reported() -> None:
    available = higgs_rs.cuda_available()
    status = higgs_rs.cuda_status()
    assert isinstance(available, bool)
    assert status
    assert status.startswith("CUDA unavailable: ") != available


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


HADAMARD_ORDERS = [64, 128, 1024, 4096, 16384, 32768, 12, 48, 3072, 12 * 1024, 20 * 64, 20 * 512, 28 * 512,
                   576, 240 * 8, 336 * 4, 400, 560 * 2, 784 * 16]
if QUICK:
    HADAMARD_ORDERS = [64, 4096, 28 * 512, 576]


@needs_gpu
@pytest.mark.parametrize("order", HADAMARD_ORDERS)
def test_hadamard_matches_cpu(order: int) -> None:
    seed = _seed()
    rng = np.random.default_rng(seed)
    for in_features, batch in ((order, 3), (max(1, 2 * order - 5), 2)):
        padded = -(-in_features // order) * order
        x = torch.from_numpy(rng.standard_normal((batch, in_features)).astype(np.float32))
        signs = torch.from_numpy(np.where(rng.random(padded) < 0.5, -1.0, 1.0).astype(np.float32))
        width = padded + 128
        x16 = x.half()
        expected = torch.zeros(batch, padded)
        expected[:, :in_features] = x16.float()
        expected = (expected * signs).contiguous().numpy()
        higgs_rs._core.hadamard_transform(expected, order)
        got = hcuda.hadamard(x16.cuda(), order, signs.cuda(), width=width).float().cpu()
        assert torch.isfinite(got).all(), f"seed {seed}"
        assert (got[:, padded:] == 0).all(), f"seed {seed}: columns past the padded width must be 0"
        err = _relative_error(got[:, :padded], torch.from_numpy(expected))
        assert err < 1e-3, f"order {order}, in {in_features}, seed {seed}: relative error {err}"


# (out, in, p, bits, hadamard_size, group_size): the whole-row Paley orders of real models, padding,
# unaligned code rows (3-bit with 1000 columns: 375 bytes per row), two-factor Paley orders.
LAYERS = [
    (1000, 576, 2, 4, None, 64),
    (512, 1536, 1, 4, None, 64),
    (384, 4096, 2, 3, 1024, 128),
    (272, 100, 2, 2, 64, 32),
    (200, 1000, 1, 3, None, 32),
    (96, 14336, 2, 4, None, 64),
    (64, 12544, 1, 2, None, 64),
    (130, 1280, 1, 4, 1280, 64),
    (256, 4096, 2, 4, None, 64),
]
# Every kernel boundary: lut_gemv (<= 4 at group 64), lut_mma with 1, 2, 4, 8 batch tiles, dense.
BATCHES = [1, 3, 5, 9, 16, 24, 33, 57, 64, 100]
if QUICK:
    LAYERS = [LAYERS[0], LAYERS[4], LAYERS[5]]
    BATCHES = [1, 16, 100]


def _layer(
    out_f: int, in_f: int, p: int, bits: int, h: int | None, g: int, seed: int
) -> tuple[HiggsLinear, torch.Tensor]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out_f, in_f)) * 0.02).astype(np.float32)
    q = higgs_rs.quantize_tensor(w, bits=bits, p=p, hadamard_size=h, group_size=g, seed=seed % 1000)
    layer = HiggsLinear.from_quantized(q).to("cuda")
    w_deq = torch.from_numpy(higgs_rs.dequantize(q)).cuda()
    return layer, w_deq


@needs_gpu
@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: "x".join(str(v) for v in s))
def test_lut_linear_matches_dequantized_f16(shape: tuple) -> None:
    seed = _seed()
    layer, w_deq = _layer(*shape, seed)
    rng = torch.Generator().manual_seed(seed)
    for batch in BATCHES:
        x = torch.randn(batch, layer.in_features, generator=rng).half().cuda()
        out = torch.full((batch, layer.out_features), float("nan"), dtype=torch.float16, device="cuda")
        y = hcuda.lut_linear(layer, x, out)
        torch.cuda.synchronize()
        assert y.data_ptr() == out.data_ptr()
        assert torch.isfinite(y).all(), f"{shape} batch {batch} seed {seed}: unwritten or non-finite output"
        ref = x.double() @ w_deq.double().t()
        err = _relative_error(y, ref)
        assert err < 1e-3, f"{shape} batch {batch} seed {seed}: relative error {err} vs float64"
        err_linear = _relative_error(y, torch.nn.functional.linear(x, w_deq.half()))
        assert err_linear < 1e-3, f"{shape} batch {batch} seed {seed}: {err_linear} vs F.linear in f16"


@needs_gpu
@pytest.mark.parametrize("shape", LAYERS[:3] if not QUICK else LAYERS[:1], ids=lambda s: str(s[:2]))
def test_lut_linear_bf16(shape: tuple) -> None:
    seed = _seed()
    layer, w_deq = _layer(*shape, seed)
    for batch in (1, 16, 100):
        x = torch.randn(batch, layer.in_features, device="cuda").bfloat16()
        out = torch.full((batch, layer.out_features), float("nan"), dtype=torch.bfloat16, device="cuda")
        y = hcuda.lut_linear(layer, x, out)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all(), f"{shape} batch {batch} seed {seed}"
        err = _relative_error(y, x.double() @ w_deq.double().t())
        # bf16 keeps 8 bits: rotated activations, weights and outputs each round at ~2^-9.
        assert err < 1e-2, f"{shape} batch {batch} seed {seed}: relative error {err}"


@needs_gpu
@pytest.mark.parametrize("mt,splits", [(1, 1), (2, 1), (1, 3), (2, 7), (1, 16)])
def test_tuning_overrides_compute_the_same(mt: int, splits: int) -> None:
    seed = _seed()
    layer, w_deq = _layer(300, 4096, 2, 4, None, 64, seed)
    # 130: two batch chunks of lut_mma (the dense path switched off), the second one partial.
    for batch in (1, 9, 40, 64, 130):
        x = torch.randn(batch, 4096, device="cuda").half()
        out = torch.full((batch, 300), float("nan"), dtype=torch.float16, device="cuda")
        y = hcuda.lut_linear(layer, x, out, mt=mt, splits=splits, dense_min_batch=1000)
        torch.cuda.synchronize()
        err = _relative_error(y, x.double() @ w_deq.double().t())
        assert err < 1e-3, f"mt {mt} splits {splits} batch {batch} seed {seed}: {err}"


@needs_gpu
def test_deterministic_and_module_forward() -> None:
    seed = _seed()
    layer, w_deq = _layer(1024, 4096, 2, 4, None, 64, seed)
    layer.bias = torch.nn.Parameter(torch.randn(1024, device="cuda"), requires_grad=False)
    x = torch.randn(2, 3, 4096, device="cuda").half()
    a = layer(x)
    b = layer(x)
    assert a.shape == (2, 3, 1024)
    assert torch.equal(a, b), "two runs on the same input differ"
    ref = x.double() @ w_deq.double().t() + layer.bias.double()
    assert _relative_error(a, ref) < 1e-3, f"seed {seed}"


@needs_gpu
def test_unaligned_codes_take_the_byte_path() -> None:
    seed = _seed()
    layer, w_deq = _layer(100, 4096, 2, 4, None, 64, seed)
    codes = layer.codes
    storage = torch.empty(codes.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted = storage[1:].view(codes.shape)
    shifted.copy_(codes)
    layer.codes = shifted
    assert layer.codes.data_ptr() % 16 != 0
    for batch in (1, 5):
        x = torch.randn(batch, 4096, device="cuda").half()
        y = hcuda.lut_linear(layer, x)
        assert _relative_error(y, x.double() @ w_deq.double().t()) < 1e-3, f"batch {batch} seed {seed}"


@needs_gpu
@pytest.mark.parametrize(
    "shape",
    [(14336, 4096, 2, 4, None, 64), (4096, 14336, 2, 4, None, 64), (130, 1280, 1, 4, 1280, 64)],
    ids=lambda s: "x".join(str(v) for v in s[:2]),
)
def test_batch1_split_k_is_deterministic(shape: tuple) -> None:
    """Decode-sized calls split K across blocks; the partial sums are added in a fixed order, so
    every call gives the same bits."""
    seed = _seed()
    layer, w_deq = _layer(*shape, seed)
    x = torch.randn(1, layer.in_features, device="cuda").half()
    runs = [hcuda.lut_linear(layer, x).clone() for _ in range(3)]
    torch.cuda.synchronize()
    assert all(torch.equal(runs[0], r) for r in runs[1:]), f"{shape} seed {seed}: calls differ"
    err = _relative_error(runs[0], x.double() @ w_deq.double().t())
    assert err < 1e-3, f"{shape} seed {seed}: {err}"


@needs_gpu
@pytest.mark.parametrize(
    "shape",
    [
        (256, 4096, 2, 4, None, 64),
        (48, 1536, 2, 3, None, 128),
        (32, 256, 1, 2, 128, 32),
        (200, 1000, 1, 3, None, 32),
    ],
    ids=lambda s: "x".join(str(v) for v in s),
)
def test_tiled_codes_keep_the_stored_order_outside(shape: tuple) -> None:
    """The CUDA path repacks the codes of tileable layers (rows % 16 == 0, padded width % 128 == 0)
    in place of the buffer; state_dict, deepcopy, load_state_dict and moves all see the stored
    order, and results do not change."""
    seed = _seed()
    out_f, in_f, p, bits, h, g = shape
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out_f, in_f)) * 0.02).astype(np.float32)
    q = higgs_rs.quantize_tensor(w, bits=bits, p=p, hadamard_size=h, group_size=g, seed=seed % 1000)
    stored = torch.from_numpy(q.codes.copy())
    w_deq = torch.from_numpy(higgs_rs.dequantize(q)).cuda()
    layer = HiggsLinear.from_quantized(q).to("cuda")
    tileable = out_f % 16 == 0 and layer.padded_in_features % 128 == 0 and hcuda._TILE_CODES
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(seed)).half().cuda()
    y = layer(x)
    assert _relative_error(y, x.double() @ w_deq.double().t()) < 1e-3, f"{shape} seed {seed}"
    assert hcuda.codes_are_tiled(layer) == tileable, f"{shape}"
    if tileable:
        assert not torch.equal(layer.codes.cpu(), stored), "the codes were not repacked"
    dense = hcuda.lut_linear(layer, x, dense_min_batch=1)
    assert _relative_error(dense, x.double() @ w_deq.double().t()) < 1e-3, f"{shape} seed {seed}: dense path"
    state = layer.state_dict()
    assert torch.equal(state["codes"].cpu(), stored), "state_dict must hold the stored order"
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.codes.cpu(), stored) and not hcuda.codes_are_tiled(clone)
    assert torch.equal(clone(x), y), "a deep copy computes the same"
    assert hcuda.codes_are_tiled(clone) == tileable
    layer.load_state_dict(state)  # copies the stored order into the (tiled) buffer
    assert torch.equal(layer(x), y), f"{shape}: wrong after load_state_dict into tiled codes"
    assert torch.equal(layer.state_dict()["codes"].cpu(), stored)
    layer.to("cpu")
    assert torch.equal(layer.codes, stored), "moving to the CPU must restore the stored order"
    y_cpu = layer(x.cpu().float())
    assert _relative_error(y_cpu, x.double().cpu() @ w_deq.double().cpu().t()) < 1e-3, f"{shape} seed {seed}"
    layer.to("cuda")
    assert torch.equal(layer(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(layer)).codes.cpu(), stored)


def _plain_path_outputs(seed: int) -> dict[str, torch.Tensor]:
    """lut_linear outputs for layers that take lut_gemv's plain refills: rows past a partial last
    tile (272 rows), 2/3/4 bits, one/two/four scale groups per super-step, f16 and bf16."""
    outputs = {}
    for shape in [(272, 4096, 2, 4, None, 64), (256, 1024, 2, 3, None, 128), (96, 2048, 1, 2, None, 32)]:
        layer, _ = _layer(*shape, seed)
        rng = torch.Generator().manual_seed(seed)
        for dtype in (torch.float16, torch.bfloat16):
            for batch in (1, 2, 3, 4, 8):
                x = torch.randn(batch, shape[1], generator=rng).to("cuda", dtype)
                outputs[f"{shape}/{dtype}/{batch}"] = hcuda.lut_linear(layer, x, dense_min_batch=1000).cpu()
    return outputs


@needs_gpu
def test_plain_refills_give_the_same_bits(tmp_path: Path) -> None:
    """lut_gemv refills plain layers without per-step checks; the general path
    (``HIGGS_CUDA_PLAIN=0``, read once per process, so in a child process) computes the same
    products in the same order: the outputs must be equal bit for bit."""
    import subprocess
    import sys

    seed = _seed() % 100000
    here = Path(__file__).parent
    script = (
        f"import sys, torch; sys.path.insert(0, {str(here)!r}); "
        f"from test_cuda import _plain_path_outputs; torch.save(_plain_path_outputs({seed}), sys.argv[1])"
    )
    general = tmp_path / "general.pt"
    env = dict(os.environ, HIGGS_CUDA_PLAIN="0")
    subprocess.run([sys.executable, "-c", script, str(general)], env=env, check=True, timeout=300)
    theirs = torch.load(general)
    ours = _plain_path_outputs(seed)
    assert ours.keys() == theirs.keys()
    for key, y in ours.items():
        assert torch.isfinite(y.float()).all(), f"{key} seed {seed}"
        assert torch.equal(y, theirs[key]), f"{key} seed {seed}: plain and general paths differ"


@needs_gpu
def test_cuda_graph_replay() -> None:
    seed = _seed()
    layer, w_deq = _layer(512, 1536, 2, 4, None, 64, seed)
    static_x = torch.randn(4, 1536, device="cuda").half()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    for _ in range(3):
        fresh = torch.randn(4, 1536, device="cuda").half()
        static_x.copy_(fresh)
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _relative_error(static_y, fresh.double() @ w_deq.double().t()) < 1e-3, f"seed {seed}"


def _layers_sharing_signs(
    shapes: list[tuple[int, int, int | None]], seed: int
) -> list[tuple[HiggsLinear, torch.Tensor]]:
    """Layers (out, in, hadamard size) quantized with one sign seed and, where the padded widths
    agree, one signs tensor on the GPU (as a loaded checkpoint has)."""
    rng = np.random.default_rng(seed)
    layers = []
    signs_by_width: dict[int, torch.Tensor] = {}
    for out_f, in_f, h in shapes:
        w = (rng.standard_normal((out_f, in_f)) * 0.02).astype(np.float32)
        q = higgs_rs.quantize_tensor(w, bits=4, p=2, hadamard_size=h, group_size=64, seed=seed % 1000)
        layer = HiggsLinear.from_quantized(q).to("cuda")
        shared = signs_by_width.setdefault(layer.padded_in_features, layer.signs)
        assert torch.equal(shared, layer.signs)
        layer._buffers["signs"] = shared
        layers.append((layer, torch.from_numpy(higgs_rs.dequantize(q)).cuda()))
    return layers


def _check(y: torch.Tensor, x: torch.Tensor, w_deq: torch.Tensor, what: str) -> None:
    assert torch.isfinite(y).all(), what
    ref = x.reshape(-1, x.shape[-1]).double() @ w_deq.double().t()
    err = _relative_error(y.reshape(-1, y.shape[-1]), ref)
    assert err < 1e-3, f"{what}: relative error {err}"


@needs_gpu
@pytest.mark.parametrize("batch", [1, 5, 16, 40])
def test_shared_rotation_matches_unshared(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = _seed()
    qkv = _layers_sharing_signs([(512, 1536, None), (256, 1536, None), (256, 1536, None)], seed)
    x = torch.randn(1, batch, 1536, device="cuda").half()
    before = hcuda.shared_rotations
    shared = [layer(x) for layer, _ in qkv]
    torch.cuda.synchronize()
    assert hcuda.shared_rotations - before == 2, f"seed {seed}: k and v must reuse q's rotation"
    monkeypatch.setattr(hcuda, "_SHARE_ROTATION", False)
    before = hcuda.shared_rotations
    unshared = [layer(x) for layer, _ in qkv]
    torch.cuda.synchronize()
    assert hcuda.shared_rotations == before
    for (_, w_deq), a, b in zip(qkv, shared, unshared, strict=True):
        assert torch.equal(a, b), f"seed {seed}: sharing changed the result"
        _check(a, x, w_deq, f"batch {batch} seed {seed}")


@needs_gpu
def test_in_place_edit_and_new_tensor_rotate_again() -> None:
    seed = _seed()
    (q, wq), (k, wk), (v, wv) = _layers_sharing_signs(
        [(512, 1536, None), (256, 1536, None), (256, 1536, None)], seed
    )
    x = torch.randn(2, 1536, device="cuda").half()
    q(x)
    before = hcuda.shared_rotations
    x.mul_(-2.0)  # version bump: the cached rotation is stale
    _check(k(x), x, wk, f"after an in-place edit, seed {seed}")
    assert hcuda.shared_rotations == before
    # A new tensor with equal values (the old one is released first, so the allocator may hand
    # out the same address): rotated again, never matched by address.
    values = x.clone()
    del x
    y = torch.empty(2, 1536, device="cuda", dtype=torch.float16).copy_(values)
    _check(v(y), y, wv, f"new tensor, seed {seed}")
    assert hcuda.shared_rotations == before
    # A second view of the same tensor with the same geometry (what `forward`'s reshape makes).
    _check(q(y.view(2, 1536)), y, wq, f"view, seed {seed}")
    assert hcuda.shared_rotations == before + 1
    # Another row range of the same tensor: a different view geometry, rotated again.
    _check(k(y[1:]), y[1:], wk, f"row slice, seed {seed}")
    assert hcuda.shared_rotations == before + 1


@needs_gpu
def test_rotated_overlap_only_with_unchanged_weights() -> None:
    """A call that reuses the rotation overlaps the kernel before it only when the layer's codes,
    scales and grid are untouched since its previous call; a write just before the call (here to
    the scales) turns the overlap off for that call, and the call sees the new values."""
    seed = _seed()
    (q, wq), (k, wk), (v, wv) = _layers_sharing_signs(
        [(512, 1536, None), (256, 1536, None), (256, 1536, None)], seed
    )
    x = torch.randn(1, 1536, device="cuda").half()
    before = hcuda.overlapped_rotations
    for round_ in range(3):
        for layer, w_deq in ((q, wq), (k, wk), (v, wv)):
            _check(layer(x), x, w_deq, f"round {round_}, seed {seed}")
        torch.cuda.synchronize()
        # First round: every layer's first call, no overlap; then q (reusing the previous round's
        # rotation of the same input), k and v each round.
        assert hcuda.overlapped_rotations - before == 3 * round_, f"seed {seed}"
    before = hcuda.overlapped_rotations
    q(x)
    k.scales.mul_(2.0)  # exact in float16: the layer's weights double
    _check(k(x), x, 2.0 * wk, f"scales written just before the call, seed {seed}")
    _check(v(x), x, wv, f"after the write, seed {seed}")
    assert hcuda.overlapped_rotations - before == 2, f"seed {seed}: q and v overlap, k must not"


@needs_gpu
def test_different_rotations_do_not_share() -> None:
    seed = _seed()
    layers = _layers_sharing_signs(
        [(256, 1536, None), (256, 1536, 512), (128, 1536, 256), (128, 1600, None)], seed
    )
    x = torch.randn(3, 1536, device="cuda").half()
    before = hcuda.shared_rotations
    for layer, w_deq in layers[:3]:
        _check(layer(x), x, w_deq, f"hadamard {layer.hadamard_size}, seed {seed}")
    assert hcuda.shared_rotations == before, "different Hadamard sizes must not share"
    wide, w_wide = layers[3]
    xw = torch.randn(3, 1600, device="cuda").half()
    _check(wide(xw), xw, w_wide, f"width 1600, seed {seed}")
    # Another batch of the same tensor's rows is another view: rotated again.
    _check(layers[0][0](x[:2]), x[:2], layers[0][1], f"batch 2, seed {seed}")
    assert hcuda.shared_rotations == before


@needs_gpu
def test_cuda_graph_replay_of_shared_rotations() -> None:
    seed = _seed()
    qkv = _layers_sharing_signs([(512, 1536, None), (256, 1536, None), (256, 1536, None)], seed)
    static_x = torch.randn(1, 1, 1536, device="cuda").half()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer, _ in qkv:
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    before = hcuda.shared_rotations
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [layer(static_x) for layer, _ in qkv]
    assert hcuda.shared_rotations - before == 2, f"seed {seed}: the capture must share"
    # A second graph captured on the same input (no write in between) rotates again: the first
    # graph's rotation is not part of it.
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        out2 = qkv[1][0](static_x)
    assert hcuda.shared_rotations - before == 2, f"seed {seed}: a new capture must rotate"
    for _ in range(3):
        fresh = torch.randn(1, 1, 1536, device="cuda").half()
        static_x.copy_(fresh)
        for o in (*outs, out2):
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for (_, w_deq), o in zip(qkv, outs, strict=True):
            _check(o, fresh, w_deq, f"graph replay, seed {seed}")
        static_x.mul_(0.5)
        graph2.replay()
        torch.cuda.synchronize()
        _check(out2, static_x, qkv[1][1], f"second graph, seed {seed}")


@needs_gpu
def test_bad_inputs_are_named() -> None:
    layer, _ = _layer(64, 256, 2, 4, None, 64, 1)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        hcuda.lut_linear(layer, torch.randn(2, 256, device="cuda"))
    with pytest.raises(ValueError, match="shape"):
        hcuda.lut_linear(layer, torch.randn(2, 255, device="cuda").half())
    odd, _ = _layer(64, 256, 2, 4, None, 16, 1)
    with pytest.raises(NotImplementedError, match="multiple of 32"):
        hcuda.lut_linear(odd, torch.randn(2, 256, device="cuda").half())


def _tiny_llama(tmp_path: Path, seed: int) -> Path:
    """A random-weight Llama checkpoint (2 layers, hidden 512, MLP 1536 = 12·128, 4 heads / 2 KV
    heads, vocabulary 1000) saved as bf16 safetensors. The embeddings and lm_head are scaled up so
    the logits spread over several units: greedy tokens are then rarely near-ties."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.05,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    src = tmp_path / "tiny-llama"
    model.save_pretrained(src, safe_serialization=True)
    return src


@needs_gpu
def test_load_on_cuda_and_generate(tmp_path: Path) -> None:
    """End to end on the GPU: quantize a checkpoint, ``higgs_rs.load(..., device="cuda")``, logits
    against the dequantized model in float32, then ``generate`` (prefill through the batch path,
    decode steps through the batch-1 kernels and the KV cache)."""
    seed = _seed()
    src = _tiny_llama(tmp_path, seed)
    dst = tmp_path / "tiny-llama-higgs4"
    higgs_rs.quantize_checkpoint(src, dst, bits=4, p=2, seed=seed % 1000, progress=False)
    model = higgs_rs.load(dst, device="cuda")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, HiggsLinear) and layer.codes.is_cuda, "the quantized layers must live on the GPU"
    assert next(model.parameters()).dtype == torch.float16
    reference = higgs_rs.load_dequantized(dst, dtype=torch.float32).cuda()
    ids = torch.randint(0, 1000, (2, 70), generator=torch.Generator().manual_seed(seed)).cuda()
    with torch.no_grad():
        for length in (1, 7, 70):  # batch-1 kernel, small-batch kernel, dense path (2 x 70 = 140 rows)
            got = model(ids[:, :length]).logits.float()
            want = reference(ids[:, :length]).logits
            assert torch.isfinite(got).all(), f"seed {seed} length {length}"
            err = _relative_error(got, want)
            assert err < 2e-2, f"seed {seed} length {length}: logits relative error {err} vs float32"
    prompt = ids[:1, :5]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert out.shape == (1, 17) and torch.equal(out[:, :5], prompt), f"seed {seed}: {out}"
    # Each greedy token must be the reference model's best, up to float16 rounding of the logits
    # (teacher-forced on the generated sequence, so one near-tie cannot derail the rest).
    with torch.no_grad():
        ref_logits = reference(out).logits[0, 4:-1]
    chosen = ref_logits.gather(1, out[0, 5:, None])[:, 0]
    gap = ref_logits.max(dim=1).values - chosen
    assert (gap < 0.15).all(), f"seed {seed}: generated {out[0, 5:].tolist()}, logit gaps {gap.tolist()}"


def _dequantize_rotated(layer: HiggsLinear, dtype: torch.dtype, ld: int, offset: int) -> torch.Tensor:
    """The dense path's rotated weights written at element `offset` of a NaN-poisoned buffer with
    row stride `ld` (returned as the whole `out_features × ld` view)."""
    x = torch.zeros(1, layer.in_features, dtype=dtype, device="cuda")
    args = hcuda._layer_args(layer, x)
    buf = torch.full((offset + layer.out_features * ld,), float("nan"), dtype=dtype, device="cuda")
    w_rot = buf[offset:].view(layer.out_features, ld)
    higgs_rs._core.cuda_dequantize_rotated(
        *args[:3], w_rot.data_ptr(), ld, layer.in_features, layer.out_features, *args[4:-1],
        hcuda._dtype_name(dtype), torch.cuda.current_stream().cuda_stream, 0, tiled=args[-1],
    )
    torch.cuda.synchronize()
    return w_rot


@needs_gpu
@pytest.mark.parametrize(
    "shape",
    [
        (37, 14, 2, 4, 2, 32),  # padded 14: 8-value units, then 3 pairs per row
        (19, 10, 2, 2, 2, 32),  # padded 10: one pair per row after the units
        (45, 100, 1, 3, 12, 32),  # padded 108, 3-bit p = 1
        (48, 1536, 2, 3, None, 128),  # tiled 3-bit
        (32, 256, 1, 2, 128, 32),  # tiled 2-bit p = 1
        (130, 1280, 1, 4, 1280, 64),
    ],
    ids=lambda s: "x".join(str(v) for v in s),
)
def test_dense_dequantize_odd_widths_and_unaligned_outputs(shape: tuple) -> None:
    """The dequantize kernel's 16-byte path (aligned rows), its pair tail (padded % 8 != 0) and its
    pair path (rows not 16-byte aligned) write the same values and nothing past the padded width;
    the dense path matches float64 in f16 and bf16."""
    seed = _seed()
    layer, w_deq = _layer(*shape, seed)
    padded = layer.padded_in_features
    x = torch.randn(70, layer.in_features, generator=torch.Generator().manual_seed(seed))
    for dtype, tol in ((torch.float16, 1e-3), (torch.bfloat16, 1e-2)):
        layer(x[:1].to("cuda", dtype))  # first use: codes may be tiled
        y = hcuda.lut_linear(layer, x.to("cuda", dtype), dense_min_batch=1)
        assert torch.isfinite(y).all(), f"{shape} {dtype} seed {seed}"
        err = _relative_error(y, x.double().cuda() @ w_deq.double().t())
        assert err < tol, f"{shape} {dtype} seed {seed}: dense path relative error {err}"
        ld_vec = -(-(padded + 8) // 8) * 8
        vector = _dequantize_rotated(layer, dtype, ld_vec, 0)
        pairs = _dequantize_rotated(layer, dtype, padded + 2, 2)
        assert torch.isfinite(vector[:, :padded]).all(), f"{shape} {dtype}: unwritten rotated weights"
        assert torch.equal(vector[:, :padded], pairs[:, :padded]), f"{shape} {dtype} seed {seed}"
        assert vector[:, padded:].isnan().all() and pairs[:, padded:].isnan().all(), "wrote past the width"
