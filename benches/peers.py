"""Peer quantizers for ``benches/compare.py``, each through its own package's quantize function.

Every quantizer takes one fp32 weight matrix (out × in, NumPy) and returns the dequantized fp32
matrix and the bits its stored format takes (codes, scales, zero points, super-block scales;
per-format constant tables such as NF4's 16 levels or a grid's points are not counted, for any
method). A width a format cannot take raises :class:`Unsupported`, never a silent substitute.

- bitsandbytes NF4 / FP4: ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` on CPU.
- HQQ: ``hqq.core.quantize.Quantizer`` (half-quadratic zero/scale optimization), with scale and
  zero rounded to f16 as ``HQQLinear`` stores them.
- llama.cpp: ``ggml_quantize_chunk`` and the type's ``to_float`` from the ggml shared library
  that ``llama-cpp-python`` builds (ctypes), no importance matrix (data-free).
- RTN: plain round-to-nearest, asymmetric, f16 scale and zero per group (NumPy).
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class Unsupported(Exception):
    """The format cannot take this matrix (e.g. a row width that is not a multiple of its block)."""


class PeerMissing(Exception):
    """The peer's package is not installed (or cannot be loaded)."""


@dataclass
class Quantized:
    """A quantized matrix as the harness sees it."""

    weight: np.ndarray  # dequantized, fp32, the original shape
    stored_bits: int  # bits of the stored format for this matrix
    note: str = ""  # e.g. the fallback type a llama.cpp rule picked


# (weight, layer name) -> result; the name lets a method give layers different settings.
Quantizer = Callable[[np.ndarray, str], Quantized]


# ---------------------------------------------------------------------------------------------
# plain round-to-nearest


def rtn_asymmetric(bits: int, group_size: int) -> Quantizer:
    """Round to nearest, asymmetric (min/max), f16 scale and f16 zero per group of a row."""

    def quantize(w: np.ndarray, name: str = "") -> Quantized:
        rows, cols = w.shape
        if cols % group_size:
            raise Unsupported(f"width {cols} is not a multiple of the group size {group_size}")
        levels = (1 << bits) - 1
        g = w.reshape(rows, cols // group_size, group_size).astype(np.float32)
        low, high = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
        scale = ((high - low) / levels).astype(np.float16).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0))
        zero = low.astype(np.float16).astype(np.float32)
        codes = np.clip(np.rint((g - zero) / scale), 0, levels)
        back = (codes * scale + zero).reshape(rows, cols)
        groups = rows * cols // group_size
        return Quantized(back.astype(np.float32), rows * cols * bits + groups * 32)

    return quantize


# ---------------------------------------------------------------------------------------------
# bitsandbytes


def bnb_4bit(quant_type: str, block_size: int, double_quant: bool) -> Quantizer:
    """bitsandbytes ``quantize_4bit`` on CPU (absmax per block; double quant: absmax in 8 bits)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PeerMissing("bitsandbytes is not installed (pip install bitsandbytes)")
    import torch
    from bitsandbytes import functional as bnb_f

    def quantize(w: np.ndarray, name: str = "") -> Quantized:
        tensor = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        packed, state = bnb_f.quantize_4bit(
            tensor, blocksize=block_size, quant_type=quant_type, compress_statistics=double_quant
        )
        back = bnb_f.dequantize_4bit(packed, state).float().numpy()
        bits = packed.numel() * packed.element_size() * 8
        bits += state.absmax.numel() * state.absmax.element_size() * 8
        if state.nested:
            bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8
            bits += 32  # the fp32 offset
        return Quantized(back, bits)

    return quantize


# ---------------------------------------------------------------------------------------------
# HQQ


def hqq(bits: int, group_size: int) -> Quantizer:
    """HQQ's own quantizer with its default settings for (bits, group_size), along the input axis."""
    if importlib.util.find_spec("hqq") is None:
        raise PeerMissing("hqq is not installed (pip install hqq)")
    import torch
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.core.quantize import Quantizer as HqqQuantizer

    params = dict(BaseQuantizeConfig(nbits=bits, group_size=group_size)["weight_quant_params"])

    def quantize(w: np.ndarray, name: str = "") -> Quantized:
        tensor = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        packed, meta = HqqQuantizer.quantize(
            tensor,
            nbits=params["nbits"],
            channel_wise=params["channel_wise"],
            group_size=params["group_size"],
            optimize=params["optimize"],
            round_zero=params["round_zero"],
            axis=params["axis"],
            device="cpu",
            compute_dtype=torch.float32,
        )
        # HQQLinear keeps scale and zero in the compute dtype (f16): round them as stored.
        meta["scale"] = meta["scale"].half().float()
        meta["zero"] = meta["zero"].half().float()
        back = HqqQuantizer.dequantize(packed, meta).float().reshape(w.shape).numpy()
        bits = (
            packed.numel() * packed.element_size() * 8 + (meta["scale"].numel() + meta["zero"].numel()) * 16
        )
        return Quantized(back, bits)

    return quantize


# ---------------------------------------------------------------------------------------------
# llama.cpp (ggml) through ctypes

GGML_TYPES = {
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "Q2_K": 10,
    "Q3_K": 11,
    "Q4_K": 12,
    "Q5_K": 13,
    "Q6_K": 14,
    "IQ4_NL": 20,
    "IQ3_S": 21,
    "IQ4_XS": 23,
}

# llama.cpp's own rule for a tensor whose width its type cannot take (tensor_type_fallback in
# vendor/llama.cpp/src/llama-quant.cpp of the installed llama-cpp-python).
GGML_FALLBACK = {
    "IQ3_S": "IQ4_NL",
    "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_GGML: ctypes.CDLL | None = None


def ggml_library() -> ctypes.CDLL:
    """The ggml base library that llama-cpp-python built and ships."""
    global _GGML
    if _GGML is not None:
        return _GGML
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise PeerMissing(
            'llama-cpp-python is not installed (CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python)'
        )
    root = Path(spec.origin).parent
    candidates = sorted(root.rglob("libggml-base.*")) + sorted(root.rglob("libggml.*"))
    if not candidates:
        raise PeerMissing(f"no libggml-base shared library under {root}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    _GGML = lib
    return lib


def ggml_block(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type."""
    traits = ggml_library().ggml_get_type_traits(GGML_TYPES[type_name]).contents
    return int(traits.blck_size), int(traits.type_size)


def _ggml_roundtrip(type_name: str, w: np.ndarray) -> Quantized:
    lib = ggml_library()
    type_id = GGML_TYPES[type_name]
    block, block_bytes = ggml_block(type_name)
    rows, cols = w.shape
    if cols % block:
        raise Unsupported(f"{type_name}: width {cols} is not a multiple of its block of {block}")
    if lib.ggml_quantize_requires_imatrix(type_id):
        raise Unsupported(f"{type_name} needs an importance matrix (not data-free)")
    lib.ggml_quantize_init(type_id)
    src = np.ascontiguousarray(w, dtype=np.float32)
    row_bytes = cols // block * block_bytes
    dst = np.zeros(rows * row_bytes, dtype=np.uint8)
    written = lib.ggml_quantize_chunk(type_id, src.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk({type_name}) wrote {written} bytes, expected {dst.nbytes}")
    traits = lib.ggml_get_type_traits(type_id).contents
    to_float = _TO_FLOAT(traits.to_float)
    back = np.empty(rows * cols, dtype=np.float32)
    to_float(dst.ctypes.data, back.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * cols)
    return Quantized(back.reshape(rows, cols), dst.nbytes * 8)


def ggml_type(type_name: str, fallback: bool) -> Quantizer:
    """A llama.cpp type; with ``fallback``, widths it cannot take get llama.cpp's fallback type."""
    ggml_library()  # raise PeerMissing now, not per layer

    def quantize(w: np.ndarray, name: str = "") -> Quantized:
        block, _ = ggml_block(type_name)
        if fallback and w.shape[1] % block and type_name in GGML_FALLBACK:
            other = GGML_FALLBACK[type_name]
            result = _ggml_roundtrip(other, w)
            result.note = other
            return result
        return _ggml_roundtrip(type_name, w)

    return quantize


def ggml_bits_per_weight(type_name: str) -> float:
    """Bits per weight of a ggml type from its block size and bytes per block."""
    block, block_bytes = ggml_block(type_name)
    return block_bytes * 8 / block


def relative_mse(w: np.ndarray, back: np.ndarray) -> float:
    """‖Ŵ − W‖² / ‖W‖² in float64."""
    w64 = w.astype(np.float64)
    norm = float(np.sum(w64 * w64))
    err = float(np.sum((back.astype(np.float64) - w64) ** 2))
    return err / norm if norm > 0 else err if math.isfinite(err) else math.inf
