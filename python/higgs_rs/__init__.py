"""higgs_rs: data-free LLM quantization with HIGGS (Hadamard rotation + Gaussian MSE-optimal grids).

The work happens in the Rust extension ``higgs_rs._core``; this package converts arguments
(NumPy arrays, torch CPU tensors) and holds the command line and the PyTorch hooks.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _core
from ._core import (
    HiggsFormatError,
    QuantizedTensor,
    available_grids,
    grid_points,
    is_supported_hadamard_order,
    random_signs,
    simd_path,
)
from .cuda import cuda_available, cuda_status

__version__: str = _core.__version__

__all__ = [
    "HiggsFormatError",
    "HiggsLinear",
    "load",
    "load_dequantized",
    "patch",
    "quantize_checkpoint",
    "QuantizedTensor",
    "available_grids",
    "cuda_available",
    "cuda_status",
    "dequantize",
    "generate",
    "grid_points",
    "grid_size",
    "is_supported_hadamard_order",
    "quantize_tensor",
    "random_signs",
    "simd_path",
]


def grid_size(bits: float, p: int) -> int:
    """Grid points for ``bits`` per weight in ``p`` dimensions: ``2 ** (p * bits)``, a whole power of two."""
    code_bits = bits * p
    if abs(code_bits - round(code_bits)) > 1e-9 or not 1 <= round(code_bits) <= 16:
        raise ValueError(
            f"{bits} bits per weight with p = {p} gives {code_bits} bits per code; "
            "it must be a whole number from 1 to 16"
        )
    return 1 << round(code_bits)


def _as_array(array: Any) -> tuple[np.ndarray, bool]:
    """A NumPy view of ``array`` (NumPy or torch CPU tensor), and whether it holds bfloat16 bits."""
    module = type(array).__module__
    if module.startswith("torch"):
        import torch

        tensor = array.detach()
        if tensor.device.type != "cpu":
            raise ValueError(f"quantize_tensor takes CPU tensors; this one is on {tensor.device}")
        if tensor.dtype == torch.bfloat16:
            # NumPy has no bfloat16: hand over the raw bits (a view, no copy).
            return tensor.contiguous().view(torch.int16).numpy().view(np.uint16), True
        if tensor.dtype not in (torch.float32, torch.float16):
            tensor = tensor.float()
        return tensor.numpy(), False
    array = np.asarray(array)
    if array.dtype not in (np.float32, np.float16):
        raise ValueError(
            f"quantize_tensor takes float32, float16 or bfloat16 weights; got dtype {array.dtype}"
        )
    return array, False


def quantize_tensor(
    array: Any,
    bits: float = 4,
    p: int = 2,
    hadamard_size: int | None = None,
    group_size: int = 64,
    seed: int | None = 0,
    threads: int | None = None,
    scale_search: Literal["fast", "full", "rms"] = "fast",
) -> QuantizedTensor:
    """Quantize a 2-D weight matrix (out × in) with HIGGS.

    Args:
        array: NumPy array or torch CPU tensor, float32 / float16 / bfloat16, shape (rows, cols).
            Read without a copy when C-contiguous.
        bits: code bits per weight; with ``p`` it picks the grid ``n = 2 ** (p * bits)``.
        p: grid dimension (1 scalar; 2, 3, 4 vector grids).
        hadamard_size: Hadamard order; None rotates whole rows when the width is a supported
            order (m * 2**k, m in 1, 12, 20, 28 and their pairwise products), else the largest
            supported divisor; a size that does not divide the width zero-pads each row
            (the padded codes count in ``bits_per_weight``).
        group_size: rotated weights per f16 scale.
        seed: seed of the random signs applied before the rotation; None for none.
        threads: worker threads (None: all cores). The output does not depend on it.
        scale_search: how each group's f16 scale is chosen (same format either way): "fast"
            (default) tries 6 multiples of the group's RMS with least-squares refits; "full"
            tries 11 (about 1 % less weight MSE, slower); "rms" takes the RMS (fastest, about
            24 % more weight MSE).
    """
    values, is_bf16 = _as_array(array)
    if values.ndim != 2:
        raise ValueError(f"quantize_tensor takes a 2-D matrix; got shape {tuple(values.shape)}")
    return _core.quantize_tensor(
        values,
        p=p,
        n=grid_size(bits, p),
        hadamard_size=hadamard_size,
        group_size=group_size,
        seed=seed,
        is_bf16=is_bf16,
        threads=threads,
        scale_search=scale_search,
    )


def dequantize(tensor: QuantizedTensor, threads: int | None = None) -> np.ndarray:
    """The float32 matrix a quantized tensor stands for."""
    return _core.dequantize(tensor, threads=threads)


from .checkpoint import quantize_checkpoint  # noqa: E402  (needs grid_size above)

_TORCH_API = ("HiggsLinear", "load", "load_dequantized", "patch")


def __getattr__(name: str) -> Any:
    """The PyTorch API (``load``, ``patch``, ``HiggsLinear``, ``generate``) imports torch only when
    first used."""
    if name in _TORCH_API:
        from . import torch as torch_api

        return getattr(torch_api, name)
    if name == "generate":
        from .generation import generate

        return generate
    raise AttributeError(f"module 'higgs_rs' has no attribute {name!r}")
