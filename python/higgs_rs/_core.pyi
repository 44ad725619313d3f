"""Types of the Rust extension module."""

import os
from typing import Literal

import numpy as np
import numpy.typing as npt

__version__: str

class HiggsFormatError(ValueError):
    """A malformed, truncated or inconsistent file."""

class QuantizedTensor:
    @staticmethod
    def from_parts(
        codes: npt.NDArray[np.uint8],
        scales: npt.NDArray[np.float16],
        cols: int,
        p: int,
        n: int,
        hadamard_size: int,
        group_size: int,
        seed: int | None = None,
    ) -> QuantizedTensor: ...
    @property
    def codes(self) -> npt.NDArray[np.uint8]: ...
    @property
    def scales(self) -> npt.NDArray[np.float16]: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def p(self) -> int: ...
    @property
    def n(self) -> int: ...
    @property
    def bits(self) -> float: ...
    @property
    def hadamard_size(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def padded_cols(self) -> int: ...
    @property
    def bits_per_weight(self) -> float: ...
    @property
    def relative_mse(self) -> float: ...
    @property
    def grid_id(self) -> str: ...

def quantize_tensor(
    array: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16],
    *,
    p: int,
    n: int,
    hadamard_size: int | None = None,
    group_size: int = 64,
    seed: int | None = 0,
    is_bf16: bool = False,
    threads: int | None = None,
    scale_search: Literal["fast", "full", "rms"] = "fast",
) -> QuantizedTensor: ...
def dequantize(tensor: QuantizedTensor, threads: int | None = None) -> npt.NDArray[np.float32]: ...
def grid_points(p: int, n: int) -> npt.NDArray[np.float32]: ...
def available_grids() -> list[tuple[int, int]]: ...
def hadamard_transform(array: npt.NDArray[np.float32], order: int, inverse: bool = False) -> None: ...
def random_signs(seed: int, len: int) -> npt.NDArray[np.float32]: ...
def is_supported_hadamard_order(order: int) -> bool: ...
def simd_path() -> str: ...
def lut_linear(
    x: npt.NDArray[np.float32],
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float16],
    grid: npt.NDArray[np.float32],
    signs: npt.NDArray[np.float32] | None,
    hadamard_size: int,
    group_size: int,
    threads: int | None = None,
) -> npt.NDArray[np.float32]:
    """``x @ W.T`` (float32 ``batch × rows``) for HIGGS-packed ``W`` on the CPU, without
    materializing ``W``."""

class CpuLutPlan:
    """A HIGGS layer prepared once for the CPU kernels (layout, kernel, lookup tables); codes and
    scales are passed to each call. Arrays are float32, or uint16 holding bfloat16 bits."""

    def __init__(
        self,
        codes: npt.NDArray[np.uint8],
        scales: npt.NDArray[np.float16],
        grid: npt.NDArray[np.float32],
        signs: npt.NDArray[np.float32] | None,
        cols: int,
        hadamard_size: int,
        group_size: int,
        bf16_grid: bool = False,
    ) -> None: ...
    @property
    def kernel_path(self) -> str: ...
    @property
    def rotated_width(self) -> int: ...
    def forward(
        self,
        x: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
        codes: npt.NDArray[np.uint8],
        scales: npt.NDArray[np.float16],
        out: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
        bias: npt.NDArray[np.float32] | None = None,
    ) -> None:
        """``out = x @ W.T (+ bias)``; small products on the calling thread, mid-sized ones on the
        attached OpenMP team (``cpu_openmp_attach``), large ones on the rayon pool."""
    def dequantize_rotated(
        self,
        codes: npt.NDArray[np.uint8],
        scales: npt.NDArray[np.float16],
        out: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    ) -> None:
        """``out`` (``rows × rotated_width``) = the rotated weights, for a dense GEMM."""
    def rotate(
        self,
        x: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
        out: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    ) -> None:
        """``out`` (``batch × rotated_width``) = the rows of ``x`` rotated like the weights."""

def cpu_openmp_attach(path: str | os.PathLike[str]) -> str | None:
    """Split ``CpuLutPlan.forward``'s mid-sized products over the OpenMP team that the loaded
    library ``path`` (e.g. ``libtorch_cpu.so``) resolves ``GOMP_parallel`` to; returns that
    runtime's file."""

def cpu_openmp_settings(enabled: bool | None = None, min_work: int | None = None) -> tuple[bool, int]:
    """Turn the attached team on/off, set the work (code bytes × batch rows) from which a product
    is split; returns (in use, threshold)."""

# CUDA (cuda_lut_linear, cuda_hadamard, cuda_dequantize_rotated, cuda_rope exist only in builds with the
# `cuda` feature; pointers are device addresses from torch's data_ptr()).
def cuda_available() -> bool: ...
def cuda_status() -> str: ...
def cuda_groups_launch(batch: int, group_size: int) -> bool: ...
def cuda_lut_linear(
    x: int,
    out: int,
    workspace: int,
    workspace_bytes: int,
    batch: int,
    in_features: int,
    out_features: int,
    codes: int,
    scales: int,
    grid: int,
    signs: int,
    row_bytes: int,
    groups: int,
    p: int,
    n: int,
    hadamard_size: int,
    group_size: int,
    dtype: str,
    stream: int,
    device: int,
    mt: int = 0,
    splits: int = 0,
    tiled: bool = False,
    counters: int = 0,
    counters_bytes: int = 0,
    rotated: bool = False,
    rotated_overlap: bool = False,
    siblings: list[tuple[int, int, int, int]] = ...,
    addend: int = 0,
) -> int: ...
def cuda_hadamard(
    x: int,
    out: int,
    signs: int,
    batch: int,
    in_features: int,
    hadamard_size: int,
    out_width: int,
    dtype: str,
    stream: int,
    device: int,
    norm_weight: int = 0,
    up: int = 0,
    pre_out: int = 0,
    eps: float = 0.0,
) -> None: ...
def cuda_dequantize_rotated(
    codes: int,
    scales: int,
    grid: int,
    out: int,
    ld: int,
    in_features: int,
    out_features: int,
    row_bytes: int,
    groups: int,
    p: int,
    n: int,
    hadamard_size: int,
    group_size: int,
    dtype: str,
    stream: int,
    device: int,
    tiled: bool = False,
) -> None: ...
def cuda_rope(
    q: tuple[int, int, int, tuple[int, int, int]],
    k: tuple[int, int, int, tuple[int, int, int]],
    cos: tuple[int, tuple[int, int]],
    sin: tuple[int, tuple[int, int]],
    batch: int,
    seq: int,
    head_dim: int,
    dtype: str,
    stream: int,
    device: int,
) -> None: ...
def allocate(
    costs: list[list[int]],
    errors: list[list[float]],
    budget: int,
    *,
    second_costs: list[list[int]] | None = None,
    second_budget: int | None = None,
    max_cells: int = 67108864,
) -> dict[str, object]:
    """One option per layer minimizing Σ errors under Σ costs <= budget (and the second budget):
    {"choices", "cost", "error", "lower_bound", "exact", "unit"}."""
    ...

def stored_bits(
    rows: int, cols: int, p: int, n: int, hadamard_size: int | None = None, group_size: int = 64
) -> int: ...
