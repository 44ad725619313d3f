"""The one-tensor API: quantize_tensor / dequantize from NumPy and torch."""

from __future__ import annotations

import numpy as np
import pytest

import higgs_rs


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


def test_roundtrip_error_matches_reported_mse() -> None:
    w = gaussian(48, 1536)
    q = higgs_rs.quantize_tensor(w, bits=4, p=2)
    assert q.shape == (48, 1536)
    assert q.hadamard_size == 1536  # 12 * 128: whole row, no padding
    assert q.bits_per_weight == pytest.approx(4.25)
    back = higgs_rs.dequantize(q)
    rel = float(((back - w) ** 2).sum() / (w**2).sum())
    assert rel == pytest.approx(q.relative_mse, rel=1e-5)
    assert 0.006 < rel < 0.0095


@pytest.mark.parametrize(("p", "bits"), [(1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4), (3, 4), (4, 3.25)])
def test_every_grid_shape_roundtrips(p: int, bits: float) -> None:
    w = gaussian(8, 576, seed=p)
    q = higgs_rs.quantize_tensor(w, bits=bits, p=p)
    assert q.n == 2 ** round(p * bits)
    back = higgs_rs.dequantize(q)
    rel = float(((back - w) ** 2).sum() / (w**2).sum())
    # Roughly the Gaussian rate-distortion 2^(-2 bits), within a factor of 3.
    assert rel < 3 * 2 ** (-2 * bits)
    assert rel == pytest.approx(q.relative_mse, rel=1e-4)


def test_from_parts_rebuilds_the_same_tensor() -> None:
    w = gaussian(7, 100)
    q = higgs_rs.quantize_tensor(w, bits=3, p=1, hadamard_size=64, group_size=32, seed=5)
    assert q.padded_cols == 128
    r = higgs_rs.QuantizedTensor.from_parts(
        q.codes, q.scales, 100, q.p, q.n, q.hadamard_size, q.group_size, q.seed
    )
    np.testing.assert_array_equal(higgs_rs.dequantize(r), higgs_rs.dequantize(q))
    with pytest.raises(ValueError, match="codes hold"):
        higgs_rs.QuantizedTensor.from_parts(q.codes[:, :-1], q.scales, 100, 1, 8, 64, 32, 5)


def test_same_bytes_any_thread_count() -> None:
    w = gaussian(64, 1024, seed=3)
    a = higgs_rs.quantize_tensor(w, threads=1)
    b = higgs_rs.quantize_tensor(w, threads=2)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)


@pytest.mark.parametrize(("p", "bits"), [(2, 4), (4, 3.25)])
def test_scale_searches_same_format_ranked_errors(p: int, bits: float) -> None:
    w = gaussian(32, 576, seed=6)
    w[::7] *= 5.0  # a few outlier rows
    errors = {}
    quantized = {}
    for search in ("rms", "fast", "full"):
        q = higgs_rs.quantize_tensor(w, bits=bits, p=p, scale_search=search)
        assert q.bits_per_weight == pytest.approx(4.25 if p == 2 else 3.5)
        back = higgs_rs.dequantize(q)
        rel = float(((back - w) ** 2).sum() / (w**2).sum())
        assert rel == pytest.approx(q.relative_mse, rel=1e-4)
        errors[search] = rel
        quantized[search] = q
    assert errors["fast"] < 0.95 * errors["rms"]
    assert errors["full"] <= errors["fast"]
    default = higgs_rs.quantize_tensor(w, bits=bits, p=p)
    np.testing.assert_array_equal(default.codes, quantized["fast"].codes)
    np.testing.assert_array_equal(default.scales, quantized["fast"].scales)
    with pytest.raises(ValueError, match='"quick" is not one of'):
        higgs_rs.quantize_tensor(w, bits=bits, p=p, scale_search="quick")  # type: ignore[arg-type]


def test_float16_input_and_strided_input() -> None:
    w = gaussian(16, 512, seed=4)
    a = higgs_rs.quantize_tensor(w.astype(np.float16))
    b = higgs_rs.quantize_tensor(w.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(a.codes, b.codes)
    wide = gaussian(16, 1024, seed=4)
    c = higgs_rs.quantize_tensor(wide[:, ::2])  # not contiguous: copied, same result
    d = higgs_rs.quantize_tensor(np.ascontiguousarray(wide[:, ::2]))
    np.testing.assert_array_equal(c.codes, d.codes)


def test_torch_tensors_including_bfloat16() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(32, 576, generator=torch.Generator().manual_seed(0))
    bf = t.to(torch.bfloat16)
    a = higgs_rs.quantize_tensor(bf)
    b = higgs_rs.quantize_tensor(bf.float().numpy())
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    c = higgs_rs.quantize_tensor(t)
    d = higgs_rs.quantize_tensor(t.numpy())
    np.testing.assert_array_equal(c.codes, d.codes)


def test_bad_input_gets_a_clear_error() -> None:
    w = gaussian(4, 64)
    w[1, 7] = np.inf
    with pytest.raises(ValueError, match="row 1, column 7"):
        higgs_rs.quantize_tensor(w)
    with pytest.raises(ValueError, match="2-D"):
        higgs_rs.quantize_tensor(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        higgs_rs.quantize_tensor(np.zeros((0, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="dtype int64"):
        higgs_rs.quantize_tensor(np.zeros((4, 64), dtype=np.int64))
    with pytest.raises(ValueError, match="whole number"):
        higgs_rs.quantize_tensor(gaussian(4, 64), bits=3.3)
    with pytest.raises(ValueError, match="Hadamard size 44"):
        higgs_rs.quantize_tensor(gaussian(4, 64), hadamard_size=44)
    with pytest.raises(NotImplementedError, match="available"):
        higgs_rs.quantize_tensor(gaussian(4, 64), bits=6, p=2)


def test_hadamard_transform_is_orthonormal() -> None:
    x = gaussian(3, 576, seed=9)
    y = x.copy()
    higgs_rs._core.hadamard_transform(y, 576)
    np.testing.assert_allclose((y**2).sum(1), (x**2).sum(1), rtol=1e-5)
    higgs_rs._core.hadamard_transform(y, 576, inverse=True)
    np.testing.assert_allclose(y, x, atol=1e-5)
    assert higgs_rs.is_supported_hadamard_order(14336)
    assert not higgs_rs.is_supported_hadamard_order(44)
    s = higgs_rs.random_signs(7, 1000)
    assert set(np.unique(s)) == {-1.0, 1.0}
    np.testing.assert_array_equal(s, higgs_rs.random_signs(7, 1000))


def test_selfcheck_runs() -> None:
    from higgs_rs.cli import main

    assert main(["selfcheck", "--rows", "256", "--cols", "1024"]) == 0
