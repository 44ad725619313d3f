"""Prototypes of other ways to CHOOSE HIGGS codes and scales, in the unchanged stored format.

The format stays what ``higgs_rs`` stores and dequantizes: per row, [random signs], Hadamard
blocks, one f16 scale per group of ``g`` rotated values, p-tuples of (rotated value / scale)
replaced by grid indices; dequantized as grid point × scale. Only the choice differs:

- ``rms``: s = f16(RMS of the group), nearest grid points (what ``quantize_tensor`` does today).
- ``ls``: alternate nearest-point assignment and the least-squares scale of the group,
  s = Σ x·q / Σ q² (x the rotated values, q the assigned grid coordinates), f16-rounded;
  keep each group's best (codes, scale) seen.
- ``search``: try scales RMS × m for a set of multipliers m, each with its nearest points and
  its least-squares scale; keep each group's best, then refine with ``ls``.

Codes are packed into the stored layout and handed to ``QuantizedTensor.from_parts``; the
matrix the model gets is ``higgs_rs.dequantize`` of that, so what is measured is the format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from peers import Quantized, Quantizer

_GRIDS: dict[tuple[int, int], np.ndarray] = {}


def grid(p: int, n: int) -> np.ndarray:
    if (p, n) not in _GRIDS:
        import higgs_rs

        _GRIDS[(p, n)] = np.asarray(higgs_rs.grid_points(p, n), dtype=np.float32).reshape(n, p)
    return _GRIDS[(p, n)]


def nearest(points: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest grid point for each row of ``points`` (N × p)."""
    import torch

    n, p = table.shape
    if p == 1:
        order = np.argsort(table[:, 0])
        sorted_levels = table[order, 0]
        mids = (sorted_levels[1:] + sorted_levels[:-1]) / 2
        return order[np.searchsorted(mids, points[:, 0])].astype(np.int64)
    t = torch.from_numpy(table)
    norms = (t * t).sum(1)
    x = torch.from_numpy(np.ascontiguousarray(points))
    out = torch.empty(x.shape[0], dtype=torch.int64)
    chunk = max(1, (1 << 24) // n)
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk]
        out[start : start + chunk] = (norms - 2 * xs @ t.T).argmin(1)
    return out.numpy()


def rotate(w: np.ndarray, block: int, padded: int, seed: int | None) -> np.ndarray:
    import higgs_rs

    rows, cols = w.shape
    x = np.zeros((rows, padded), dtype=np.float32)
    x[:, :cols] = w
    if seed is not None:
        x *= np.asarray(higgs_rs.random_signs(seed, padded), dtype=np.float32)
    higgs_rs._core.hadamard_transform(x, block)
    return x


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows × tuples) into LSB-first little-endian bit streams, each row whole bytes."""
    rows, tuples = codes.shape
    bit_planes = ((codes[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(rows, tuples * bits)
    return np.packbits(bit_planes, axis=1, bitorder="little")


@dataclass
class Choice:
    codes: np.ndarray  # rows × tuples
    scales: np.ndarray  # rows × groups, float16
    group_err: np.ndarray  # rows × groups, Σ (x − s q)² in rotated coordinates


def _groups(padded: int, g: int) -> np.ndarray:
    return np.arange(0, padded, g)


def _assign(x: np.ndarray, scales16: np.ndarray, table: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codes for x / scale, and q (the assigned coordinates, rows × padded)."""
    rows, padded = x.shape
    n, p = table.shape
    s = np.repeat(scales16.astype(np.float32), g, axis=1)[:, :padded]
    inv = np.where(s > 0, 1.0 / np.where(s > 0, s, 1), 0).astype(np.float32)
    y = x * inv
    tuples = -(-padded // p)
    ext = np.zeros((rows, tuples * p), dtype=np.float32)
    ext[:, :padded] = y
    codes = nearest(ext.reshape(-1, p), table).reshape(rows, tuples)
    q = table[codes].reshape(rows, tuples * p)[:, :padded]
    return codes, q


def _group_sums(a: np.ndarray, g: int) -> np.ndarray:
    return np.add.reduceat(a, _groups(a.shape[1], g), axis=1)


def _error(x: np.ndarray, q: np.ndarray, scales16: np.ndarray, g: int) -> np.ndarray:
    s = np.repeat(scales16.astype(np.float32), g, axis=1)[:, : x.shape[1]]
    d = x.astype(np.float64) - s.astype(np.float64) * q
    return _group_sums(d * d, g)


def _ls_scale(x: np.ndarray, q: np.ndarray, g: int, fallback: np.ndarray) -> np.ndarray:
    num = _group_sums(x.astype(np.float64) * q, g)
    den = _group_sums(q.astype(np.float64) * q, g)
    s = np.where(den > 0, num / np.where(den > 0, den, 1), fallback)
    return np.maximum(s, 0).astype(np.float16)


def choose(
    x: np.ndarray, table: np.ndarray, g: int, mode: str, iters: int = 4, multipliers: tuple[float, ...] = ()
) -> Choice:
    rms = np.sqrt(
        _group_sums(x.astype(np.float64) ** 2, g) / np.diff(np.append(_groups(x.shape[1], g), x.shape[1]))
    )
    s16 = rms.astype(np.float16)
    codes, q = _assign(x, s16, table, g)
    best = Choice(codes, s16, _error(x, q, s16, g))
    if mode == "rms":
        return best

    def consider(codes: np.ndarray, q: np.ndarray, s16: np.ndarray) -> None:
        err = _error(x, q, s16, g)
        better = err < best.group_err
        if not better.any():
            return
        best.group_err = np.where(better, err, best.group_err)
        best.scales = np.where(better, s16, best.scales)
        # A tuple belongs to the group of its first coordinate for the choice of codes (p | g in
        # every setting used here, so tuples never straddle groups).
        p = table.shape[1]
        tuple_group = (np.arange(codes.shape[1]) * p) // g
        best.codes = np.where(better[:, tuple_group], codes, best.codes)

    if mode == "search":
        for m in multipliers:
            s_try = (rms * m).astype(np.float16)
            c, q = _assign(x, s_try, table, g)
            consider(c, q, s_try)
            s_ls = _ls_scale(x, q, g, rms)
            consider(c, q, s_ls)
    # Alternate: least-squares scale for the current codes, nearest codes for that scale.
    for _ in range(iters):
        q = table[best.codes].reshape(x.shape[0], -1)[:, : x.shape[1]]
        s_ls = _ls_scale(x, q, g, rms)
        consider(best.codes, q, s_ls)
        c, q = _assign(x, best.scales, table, g)
        consider(c, q, best.scales)
    return best


def prototype(
    bits: float,
    p: int,
    group_size: int,
    seed: int | None,
    mode: str,
    iters: int = 4,
    multipliers: tuple[float, ...] = (),
    hadamard_size: int | None = None,
    per_layer: Callable[[str], tuple[float, int]] | None = None,
) -> Quantizer:
    """A quantizer: codes/scales chosen in NumPy by ``mode``, stored format, Rust dequantize.

    ``per_layer(name) -> (bits, p)`` overrides the grid per layer (mixed bit widths).
    """
    import higgs_rs

    def quantize(w: np.ndarray, name: str = "") -> Quantized:
        b, pp = per_layer(name) if per_layer else (bits, p)
        n = 2 ** round(b * pp)
        probe = higgs_rs.quantize_tensor(
            w[:1], bits=b, p=pp, hadamard_size=hadamard_size, group_size=group_size, seed=seed, threads=1
        )
        block, padded = probe.hadamard_size, probe.padded_cols
        table = grid(pp, n)
        x = rotate(w, block, padded, seed)
        choice = choose(x, table, group_size, mode, iters, multipliers)
        packed = pack(choice.codes.astype(np.int64), round(np.log2(n)))
        q = higgs_rs.QuantizedTensor.from_parts(
            packed, np.ascontiguousarray(choice.scales), w.shape[1], pp, n, block, group_size, seed
        )
        back = higgs_rs.dequantize(q)
        return Quantized(back, packed.nbytes * 8 + choice.scales.size * 16)

    return quantize


@dataclass
class Variant:
    name: str
    make: Callable[[], Quantizer]
    detail: str = ""


SEARCH = tuple(np.round(np.arange(0.80, 1.31, 0.05), 3))


def variants() -> list[Variant]:
    """The choice ``quantize_tensor`` made before the scale search (RMS scales), for before/after
    rows, and the NumPy least-squares-only choice."""
    out = []
    for bits, p, h, g, seed in (
        (4, 2, None, 64, 0),
        (4, 2, None, 32, 0),
        (4, 2, None, 1536, 0),
        (4, 1, None, 64, 0),
        (3, 2, None, 64, 0),
        (2, 2, None, 64, 0),
        (4, 2, None, 64, None),
    ):
        n = 2 ** (bits * p)
        rot = "row" if h is None else str(h)
        signs = "RHT" if seed is not None else "no signs"
        out.append(
            Variant(
                f"HIGGS-rms p{p} n{n} H={rot} g{g} {signs}",
                lambda b=bits, p=p, g=g, s=seed: prototype(b, p, g, s, "rms"),
                detail="scale = RMS of the group (the choice before the search)",
            )
        )
    out.append(
        Variant(
            "HIGGS-ls p2 n256 H=row g64 RHT",
            lambda: prototype(4, 2, 64, 0, "ls"),
            detail="least-squares scale alternated with assignment, no multiplier search",
        )
    )
    return out
