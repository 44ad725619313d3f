"""HiggsLinear on the CPU: the LUT product on packed codes against dequantize-then-matmul."""

from __future__ import annotations

import numpy as np
import pytest

import higgs_rs
from higgs_rs import _core

torch = pytest.importorskip("torch")
from higgs_rs.torch import HiggsLinear  # noqa: E402

# (rows, cols, bits, p, hadamard_size, group_size, seed): odd output sizes, padded widths
# (100 with Hadamard 64, 1000 with 8), whole-row non-power-of-two orders (576, 1536), scalar and
# vector grids of several bit widths, with and without signs.
CASES = [
    (37, 256, 4, 2, None, 64, 0),
    (5, 100, 4, 2, 64, 64, 3),
    (8, 100, 4, 2, 64, 64, None),
    (7, 100, 3, 1, 64, 32, 5),
    (11, 576, 4, 1, None, 64, 1),
    (9, 1000, 3, 2, 8, 64, None),
    (3, 1536, 2, 2, None, 32, 2),
    (6, 130, 2, 1, 2, 48, 6),
    (4, 96, 2, 3, 32, 24, 7),
    (5, 256, 2, 4, None, 64, 8),
]


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got − expected| over max |expected|, in float64."""
    got64, expected64 = got.double(), expected.double()
    return float((got64 - expected64).abs().max() / expected64.abs().max())


@pytest.mark.parametrize(("rows", "cols", "bits", "p", "hadamard_size", "group_size", "seed"), CASES)
# Batch 40 takes the batched path (dequantized rotated weights and torch's GEMM).
@pytest.mark.parametrize("batch", [1, 5, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_dequantize_then_linear(
    rows: int,
    cols: int,
    bits: float,
    p: int,
    hadamard_size: int | None,
    group_size: int,
    seed: int | None,
    batch: int,
    with_bias: bool,
) -> None:
    q = higgs_rs.quantize_tensor(
        weights(rows, cols), bits=bits, p=p, hadamard_size=hadamard_size, group_size=group_size, seed=seed
    )
    generator = torch.Generator().manual_seed(rows * cols + batch)
    bias = torch.randn(rows, generator=generator) if with_bias else None
    layer = HiggsLinear.from_quantized(q, bias=bias)
    x = torch.randn(batch, cols, generator=generator)
    expected = torch.nn.functional.linear(x, torch.from_numpy(higgs_rs.dequantize(q)), bias)
    y = layer(x)
    assert y.dtype == torch.float32
    assert y.shape == (batch, rows)
    assert relative_error(y, expected) < 1e-5


def test_bfloat16_and_float16_activations() -> None:
    q = higgs_rs.quantize_tensor(weights(24, 576, seed=8), bits=4, p=2)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(1))
    layer = HiggsLinear.from_quantized(q, bias=bias)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2))
    expected = torch.nn.functional.linear(x, torch.from_numpy(higgs_rs.dequantize(q)), bias)
    for dtype in (torch.bfloat16, torch.float16):
        y = layer(x.to(dtype))
        assert y.dtype == dtype
        # bf16 runs in bf16 precision (input and grid points rounded, like F.linear in bf16); f16
        # input is rounded, the product runs in f32.
        assert relative_error(y, expected) < (2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_batched_bfloat16_path() -> None:
    from higgs_rs.torch import CPU_GEMM_MIN_BATCH

    q = higgs_rs.quantize_tensor(weights(48, 576, seed=13), bits=4, p=2)
    layer = HiggsLinear.from_quantized(q)
    x = torch.randn(CPU_GEMM_MIN_BATCH + 3, 576, generator=torch.Generator().manual_seed(7))
    xb = x.to(torch.bfloat16)
    expected = torch.nn.functional.linear(xb.float(), torch.from_numpy(higgs_rs.dequantize(q)))
    y = layer(xb)
    assert y.dtype == torch.bfloat16
    # Rotated weights and activations are rounded to bf16 (like F.linear in bf16).
    assert relative_error(y, expected) < 3e-2
    # A row's LUT product (batch below the threshold) agrees to bf16 precision.
    assert relative_error(y[:2], layer(xb[:2])) < 2e-2


def test_cpu_plan_follows_buffer_changes_and_copies() -> None:
    import copy
    import pickle

    q1 = higgs_rs.quantize_tensor(weights(8, 64, seed=14), bits=4, p=2, seed=1)
    q2 = higgs_rs.quantize_tensor(weights(8, 64, seed=15), bits=2, p=2, seed=2)
    layer, other = HiggsLinear.from_quantized(q1), HiggsLinear.from_quantized(q2)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    y1, y2 = layer(x), other(x)
    # Same shapes, other grid and signs: the cached plan must not survive the in-place copy.
    with torch.no_grad():
        layer.grid.copy_(torch.from_numpy(higgs_rs.grid_points(2, 256)))
        layer.signs.copy_(other.signs)
    assert not torch.equal(layer(x), y1)
    twin = copy.deepcopy(other)
    torch.testing.assert_close(twin(x), y2, rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(other))(x), y2, rtol=0, atol=0)


def test_cpu_plan_checks_its_arguments() -> None:
    q = higgs_rs.quantize_tensor(weights(5, 100, seed=16), bits=4, p=2, hadamard_size=64)
    grid, signs = higgs_rs.grid_points(2, 256), higgs_rs.random_signs(0, q.padded_cols)
    plan = _core.CpuLutPlan(q.codes, q.scales, grid, signs, 100, 64, 64)
    assert plan.kernel_path in ("avx512/planes-sym", "avx2", "scalar")
    bf16_plan = _core.CpuLutPlan(q.codes, q.scales, grid, signs, 100, 64, 64, bf16_grid=True)
    assert bf16_plan.kernel_path in ("avx512/planes-bf16-sym", "avx2", "scalar")
    x = np.ones((2, 100), np.float32)
    out = np.zeros((2, 5), np.float32)
    plan.forward(x, q.codes, q.scales, out)
    expected = _core.lut_linear(x, q.codes, q.scales, grid, signs, 64, 64)
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="float32"):
        plan.forward(x, q.codes, q.scales, np.zeros((2, 5), np.float64))
    with pytest.raises(ValueError, match="output holds 5"):
        plan.forward(x, q.codes, q.scales, out[:1])
    with pytest.raises(ValueError, match="codes hold"):
        plan.forward(x, q.codes[:4], q.scales, out)
    with pytest.raises(ValueError, match="bias holds 4"):
        plan.forward(x, q.codes, q.scales, out, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="rotated values"):
        plan.dequantize_rotated(q.codes, q.scales, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="codes hold"):
        _core.CpuLutPlan(q.codes[:, :-1].copy(), q.scales, grid, signs, 100, 64, 64)


def test_leading_dimensions_and_empty_batch() -> None:
    q = higgs_rs.quantize_tensor(weights(10, 64, seed=9), bits=4, p=2)
    layer = HiggsLinear.from_quantized(q)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y.reshape(6, 10), layer(x.reshape(6, 64)), rtol=0, atol=0)
    assert layer(torch.zeros(0, 64)).shape == (0, 10)


def test_leading_dimensions_on_every_path() -> None:
    """3-D, 1-D and strided inputs, f32 and bf16, LUT and batched paths, with a bias: the same
    rows as the 2-D call."""
    q = higgs_rs.quantize_tensor(weights(10, 64, seed=17), bits=4, p=2)
    bias = torch.randn(10, generator=torch.Generator().manual_seed(18))
    layer = HiggsLinear.from_quantized(q, bias=bias)
    generator = torch.Generator().manual_seed(19)
    for dtype in (torch.float32, torch.bfloat16):
        for lead in ((2, 3), (2, 20)):  # 6 rows: LUT product; 40: the batched path
            x = torch.randn(*lead, 64, generator=generator).to(dtype)
            y = layer(x)
            assert y.shape == (*lead, 10)
            assert y.dtype == dtype
            torch.testing.assert_close(y.reshape(-1, 10), layer(x.reshape(-1, 64)), rtol=0, atol=0)
        one = torch.randn(64, generator=generator).to(dtype)
        assert layer(one).shape == (10,)
        torch.testing.assert_close(layer(one), layer(one[None])[0], rtol=0, atol=0)
        strided = torch.randn(64, 6, generator=generator).to(dtype).t()
        torch.testing.assert_close(layer(strided), layer(strided.contiguous()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.zeros(2, 128))


def test_state_dict_round_trips_into_a_fresh_layer() -> None:
    rows, cols = 13, 100
    q = higgs_rs.quantize_tensor(
        weights(rows, cols, seed=10), bits=3, p=1, hadamard_size=64, group_size=32, seed=4
    )
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(4))
    layer = HiggsLinear.from_quantized(q, bias=bias)
    fresh = HiggsLinear(
        cols,
        rows,
        p=q.p,
        n=q.n,
        hadamard_size=q.hadamard_size,
        group_size=q.group_size,
        padded_in_features=q.padded_cols,
        row_bytes=q.codes.shape[1],
        bias=True,
        has_signs=True,
    )
    x = torch.randn(4, cols, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert set(layer.state_dict()) == {"codes", "scales", "grid", "signs", "bias"}


def test_same_output_for_any_thread_count() -> None:
    q = higgs_rs.quantize_tensor(weights(67, 576, seed=11), bits=4, p=2)
    x = np.random.default_rng(6).standard_normal((3, 576), dtype=np.float32)
    signs = higgs_rs.random_signs(0, q.padded_cols)
    grid = higgs_rs.grid_points(q.p, q.n)
    args = (x, q.codes, q.scales, grid, signs, q.hadamard_size, q.group_size)
    one = _core.lut_linear(*args, threads=1)
    np.testing.assert_array_equal(one, _core.lut_linear(*args, threads=2))
    np.testing.assert_array_equal(one[1:2], _core.lut_linear(x[1:2], *args[1:], threads=2))
    # Strided (non-contiguous) activations are copied, with the same result.
    wide = np.repeat(x, 2, axis=1)
    np.testing.assert_array_equal(one, _core.lut_linear(wide[:, ::2], *args[1:]))


def test_sizes_from_user_buffers_are_checked() -> None:
    q = higgs_rs.quantize_tensor(weights(5, 100, seed=12), bits=4, p=2, hadamard_size=64)
    x = np.zeros((2, 100), dtype=np.float32)
    signs = higgs_rs.random_signs(0, q.padded_cols)
    grid = higgs_rs.grid_points(2, 256)
    good = (q.codes, q.scales, grid, signs, 64, 64)
    assert _core.lut_linear(x, *good).shape == (2, 5)
    with pytest.raises(ValueError, match="scales have 4 rows but codes have 5"):
        _core.lut_linear(x, q.codes, q.scales[:4], grid, signs, 64, 64)
    with pytest.raises(ValueError, match="codes hold"):
        _core.lut_linear(x, q.codes[:, :-1], q.scales, grid, signs, 64, 64)
    with pytest.raises(ValueError, match="scales hold 10 values; 5 rows × 4 groups"):
        _core.lut_linear(x, q.codes, q.scales, grid, signs, 64, 32)
    with pytest.raises(ValueError, match="signs hold 100"):
        _core.lut_linear(x, q.codes, q.scales, grid, signs[:100], 64, 64)
    with pytest.raises(ValueError, match="power of two"):
        _core.lut_linear(x, q.codes, q.scales, grid[:200], signs, 64, 64)
    with pytest.raises(ValueError, match="Hadamard size 44"):
        _core.lut_linear(x, *good[:4], 44, 64)
    with pytest.raises(ValueError, match="codes hold"):
        # 129 input features pad to 192: 96 codes per row, not the 64 stored.
        _core.lut_linear(np.zeros((1, 129), np.float32), *good)
    bad_grid = grid.copy()
    bad_grid[3, 1] = np.inf
    with pytest.raises(ValueError, match="grid point 3"):
        _core.lut_linear(x, q.codes, q.scales, bad_grid, signs, 64, 64)
    with pytest.raises(ValueError, match="threads"):
        _core.lut_linear(x, *good, threads=0)


def test_dtype_conversion_keeps_the_stored_format() -> None:
    w = np.random.default_rng(7).standard_normal((16, 64), dtype=np.float32)
    q = higgs_rs.quantize_tensor(w, bits=4, p=2)
    layer = HiggsLinear.from_quantized(q, bias=torch.zeros(16))
    layer.half()
    assert layer.scales.dtype == torch.float16 and layer.grid.dtype == torch.float32
    assert layer.bias.dtype == torch.float16
    layer.float()
    assert layer.scales.dtype == torch.float16 and layer.signs.dtype == torch.float32
    x = torch.randn(2, 64)
    reference = torch.nn.functional.linear(x, torch.from_numpy(higgs_rs.dequantize(q)))
    torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-4)
