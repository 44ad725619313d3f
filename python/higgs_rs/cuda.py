"""CUDA glue: finding NVRTC, per-stream workspaces, and the launches behind ``HiggsLinear`` on a GPU.

The kernels (``src/cuda``) are compiled with NVRTC on first use and launched on PyTorch's current
stream without synchronizing. Small batches (up to ``DENSE_MIN_BATCH - 1`` rows) run the fused
path: a Hadamard kernel rotates the activations into a cached workspace, then a tensor-core
LUT-GEMM reads the packed codes once (``lut_gemv`` up to 8 / (128 / group size) rows, which applies
the group scales once per 128 inputs, ``lut_mma`` above). Larger batches dequantize the rotated
weights once and use PyTorch's GEMM.

On the first call on a GPU, a layer's codes are repacked once, on the device, into the tiled order
the LUT-GEMM reads best (16-row x 128-value tiles stored contiguously: a warp's loads are 512
contiguous bytes) when the shape allows it (rows a multiple of 16, padded width a multiple of 128).
The repacked tensor replaces the ``codes`` buffer (no second copy is kept); ``state_dict()``,
pickling and moves (``.to``, ``.cpu``) put the codes back in their stored order, so checkpoints
never see the tiled order. ``HIGGS_CUDA_TILE=0`` keeps the stored order (for comparisons).

Layers that read the same input share its rotation: q/k/v (and gate/up) of a decoder layer are
called one after another on one tensor, and all layers of a checkpoint share one signs tensor. The
rotated activations start the per-stream workspace; the last rotation written there is remembered
(a strong reference to the input, its in-place version counter, and the rotation: signs, widths,
Hadamard size, dtype, batch), and a call on the same input view with the same version and rotation
launches only the LUT-GEMM (signs compare by value: a checkpoint's layers hold equal signs in
separate tensors). Inside a CUDA graph capture only rotations of the same capture are
reused (the graph replays the launches as recorded). Inference tensors (no version counter) are
always rotated. ``HIGGS_CUDA_SHARE_ROT=0`` rotates in every call (for comparisons).

A call that reuses the rotation launches its LUT-GEMM as a programmatic dependent of the kernel
before it (usually the previous call's LUT-GEMM, which lets it start early), so its table build and
first code loads overlap that kernel's tail. Those reads happen before the earlier kernel has
finished, so this is done only when the layer's codes, scales and grid are the very tensors of its
previous call here, with the same in-place versions (no repack, no ``copy_``/``load_state_dict``
since: nothing that could still be in flight writes them); never on a layer's first call, for
inference tensors (no version counter) or with ``HIGGS_CUDA_PDLROT=0``.

A decoder layer's RMSNorm before such layers (``fuse_norms``; ``HiggsRMSNorm``) normalizes and
rotates in one kernel: it writes the normalized rows (its output, as usual) and their rotation for
the layers it feeds into the workspace, remembered as the rotation of its output, so the q/k/v (or
gate/up) call that follows launches only its LUT-GEMM. Nothing is assumed: the call checks the
rotation entry as for any shared rotation, and rotates itself when it does not match (another
input, other signs, a regrown workspace). Likewise an MLP's ``silu(gate) * up`` and the rotation
for its down projection (``fuse_mlps``; ``HiggsGatedMLP``). ``HIGGS_CUDA_FUSE_NORM=0`` computes
both with PyTorch (for comparisons). A decoder layer's residual adds (``fuse_residuals``) are
added by the o and down projections' LUT-GEMMs as they write their outputs (``lut_linear``'s
``addend``; ``HIGGS_CUDA_FUSE_RESIDUAL=0``: PyTorch adds them).

Sibling layers (``group_layers``; ``group_projections`` finds q/k/v and gate/up, and
``higgs_rs.load`` and ``patch`` call it) run as one launch inside CUDA graph captures
(``GROUP_MODE``): the first of them called on an input computes all of their outputs (one
rotation, one table build, one split-K tail instead of three), and the others' calls on the same
input (same view, version and rotation; same graph capture) return their precomputed output,
provided their codes, scales and grid are still the tensors and versions of that launch. Eager
calls stay layer by layer (the grouped call's Python costs more than the launches it saves),
except a group's first eager call per dtype, which compiles its kernel before a capture needs
it. Only decode-sized batches group (those ``lut_gemv`` takes: up to 4 rows at group size 64),
without ``mt``/``splits`` overrides, for tensors with a version counter. ``HIGGS_CUDA_GROUP=1``
groups eager calls too, ``=0`` never groups (for comparisons).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import weakref
from typing import TYPE_CHECKING, Any

from . import _core

if TYPE_CHECKING:
    import torch

#: Batches of at least this many rows take the dequantize + library GEMM path.
DENSE_MIN_BATCH = 65

_nvrtc_tried = False
_workspaces: dict[tuple[int, int], Any] = {}
#: Split-K counters per (device, stream): zero-filled once, the kernels leave them zero.
_counters: dict[tuple[int, int], Any] = {}
#: Per (device, stream): the rotation the workspace holds (see ``_rotation_entry``).
_rotations: dict[tuple[int, int], tuple[Any, ...]] = {}
#: ``HIGGS_CUDA_SHARE_ROT=0``: run the Hadamard kernel in every call.
_SHARE_ROTATION = os.environ.get("HIGGS_CUDA_SHARE_ROT", "") != "0"
#: Calls (or graph-captured calls) that reused the previous call's rotation: for tests and benches.
shared_rotations = 0
#: Of those, the ones launched as a programmatic dependent of the kernel before (see the notes).
overlapped_rotations = 0
#: Sign vectors seen (their float32 bytes) -> a small id: layers loaded from one checkpoint hold
#: equal signs in separate tensors, and rotate alike.
_signs_ids: dict[bytes, int] = {}
#: Key in a layer's ``__dict__``: (signs tensor, its version, its id in ``_signs_ids``).
_SIGNS_MARK = "_higgs_cuda_signs_id"
#: Streams a CUDA graph was captured on (see ``_rotation_entry``).
_captured_streams: set[tuple[int, int]] = set()
#: ``cuStreamGetCaptureInfo`` through ctypes (None: not looked up yet, False: unavailable).
_capture_info: Any = None
#: ``HIGGS_CUDA_FUSE_NORM=0``: ``rms_norm_rotate`` and ``silu_mul_rotate`` decline, the norm and
#: the MLP activation run in PyTorch.
_FUSE_NORM = os.environ.get("HIGGS_CUDA_FUSE_NORM", "") != "0"
#: Fused launches (``rms_norm_rotate``, ``silu_mul_rotate``): for tests and benches.
fused_prologues = 0
#: ``HIGGS_CUDA_FUSE_RESIDUAL=0``: ``HiggsLinear`` adds a residual with PyTorch, not in the kernel.
_FUSE_RESIDUAL = os.environ.get("HIGGS_CUDA_FUSE_RESIDUAL", "") != "0"
#: LUT-GEMM launches that added an ``addend`` (a residual): for tests and benches.
fused_residuals = 0
#: ``HIGGS_CUDA_TILE=0``: leave the codes in their stored order on the GPU.
_TILE_CODES = os.environ.get("HIGGS_CUDA_TILE", "") != "0"
#: Key in a layer's ``__dict__``: (weak reference to the codes tensor, its version) when that
#: tensor holds the codes in tiled order. An in-place write (``load_state_dict``) bumps the version
#: and so marks the buffer as stored order again.
_TILED_MARK = "_higgs_cuda_tiled"
#: Per layer (weakly held, so copies and pickles of a layer carry nothing): weak references to its
#: codes, scales and grid tensors and their versions at its previous fused-path call (see
#: ``_weights_unchanged``).
_weights_seen: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()
#: Key in a grouped layer's ``__dict__``: its ``_Group`` (left out of pickles and deep copies by
#: ``HiggsLinear.__getstate__``, so a copy never computes with the original's layers). A plain
#: attribute: eager calls read it at ~0.1 µs, where a weak-keyed dictionary costs ~1 µs a lookup.
GROUP_ATTR = "_higgs_cuda_group"
#: Per (device, stream): the rotation entry of the last grouped launch's input and, per member
#: not yet called, (its output, its weights' state at the launch).
_group_outputs: dict[tuple[int, int], tuple[Any, dict[Any, tuple[Any, Any]]]] = {}
#: (batch, group size) -> whether such calls launch sibling layers together.
_groups_launch_cache: dict[tuple[int, int], bool] = {}
#: When sibling layers run as one launch (``HIGGS_CUDA_GROUP``): "graph" (default) inside CUDA
#: graph captures, where the grouped call's extra Python (~50 µs a group on the device machine's
#: CPU, more than the launches it saves) is paid once, at capture; "always" (``=1``); "never"
#: (``=0``).
GROUP_MODE = {"0": "never", "1": "always"}.get(os.environ.get("HIGGS_CUDA_GROUP", ""), "graph")
#: Grouped launches, and calls answered by one: for tests and benches.
grouped_launches = 0
grouped_hits = 0
#: The child names whose layers read the same input in transformers' decoder layers.
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _preload_nvrtc() -> None:
    """Load an NVRTC the dynamic loader may not find by name (the wheel PyTorch ships), so the
    extension's ``dlopen("libnvrtc.so.13")`` resolves to the already loaded library."""
    global _nvrtc_tried
    if _nvrtc_tried or not sys.platform.startswith("linux"):
        return
    _nvrtc_tried = True
    for name in ("libnvrtc.so.13", "libnvrtc.so.12"):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            pass
    patterns = (
        "nvidia/cu13/lib/libnvrtc.so.13*",
        "nvidia/cuda_nvrtc/lib/libnvrtc.so.1[23]*",
        "nvidia/cu12/lib/libnvrtc.so.12*",
    )
    for base in sys.path:
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(base, pattern))):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    return
                except OSError:
                    continue


def cuda_available() -> bool:
    """Whether the CUDA kernels can run: a CUDA build of higgs_rs, the NVIDIA driver, NVRTC and a
    GPU of compute capability 8.0 or newer. ``cuda_status()`` says why not."""
    _preload_nvrtc()
    return _core.cuda_available()


def cuda_status() -> str:
    """The GPU the kernels use, or the reason they cannot run here."""
    _preload_nvrtc()
    return _core.cuda_status()


def _require_kernels() -> None:
    """Fail early, with the reason, where the kernels cannot run."""
    _preload_nvrtc()
    if not hasattr(_core, "cuda_lut_linear"):
        raise RuntimeError(_core.cuda_status())


def _dtype_name(dtype: torch.dtype) -> str:
    import torch

    if dtype == torch.float16:
        return "f16"
    if dtype == torch.bfloat16:
        return "bf16"
    raise ValueError(f"HiggsLinear on CUDA takes float16 or bfloat16 activations, not {dtype}")


def _check_buffers(layer: Any, x: torch.Tensor) -> None:
    import torch

    for name, dtype in (("codes", torch.uint8), ("scales", torch.float16), ("grid", torch.float32)):
        t = getattr(layer, name)
        if t.device != x.device or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(
                f"HiggsLinear.{name} must be a contiguous {dtype} tensor on {x.device}; "
                f"it is {t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}"
            )
    signs = layer.signs
    if signs is not None and (
        signs.device != x.device
        or signs.dtype != torch.float32
        or not signs.is_contiguous()
        or signs.numel() < layer.padded_in_features
    ):
        raise ValueError(
            f"HiggsLinear.signs must be {layer.padded_in_features} contiguous float32 values on {x.device}"
        )


def _workspace(device: torch.device, stream: int, nbytes: int) -> torch.Tensor:
    """A scratch buffer per (device, stream) for the rotated activations and split-K partials,
    grown on demand (a new buffer: no rotation to reuse) and reused: calls on one stream run in
    order."""
    import torch

    key = (device.index or 0, stream)
    ws = _workspaces.get(key)
    if ws is None or ws.numel() < nbytes:
        size = max(nbytes, 0 if ws is None else 2 * ws.numel(), 1 << 20)
        ws = torch.zeros(size, dtype=torch.uint8, device=device)
        _workspaces[key] = ws
    return ws


def _split_k_counters(device: torch.device, stream: int, out_features: int) -> torch.Tensor:
    """The zero-filled split-K counters of a stream: 16 bytes per 16 output rows bound what any
    call needs (a block covers at least 16 rows: one row tile, with in-block K slices)."""
    import torch

    key = (device.index or 0, stream)
    counters = _counters.get(key)
    need = -(-out_features // 16) * 16
    if counters is None or counters.numel() < need:
        counters = torch.zeros(max(need, 1 << 16), dtype=torch.uint8, device=device)
        _counters[key] = counters
    return counters


def _capture_id(stream: int) -> int | None:
    """The id of the CUDA graph capture running on ``stream`` (driver API), or None."""
    global _capture_info
    if _capture_info is None:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuStreamGetCaptureInfo
            fn.restype = ctypes.c_int
            _capture_info = fn
        except (OSError, AttributeError):
            _capture_info = False
    if not _capture_info:
        return None
    status = ctypes.c_int(0)
    capture_id = ctypes.c_uint64(0)
    # The first three parameters are the same in every version of this entry point; the later
    # (optional) outputs are passed as NULL.
    rc = _capture_info(
        ctypes.c_void_p(stream), ctypes.byref(status), ctypes.byref(capture_id), None, None, None, None
    )
    return capture_id.value if rc == 0 and status.value == 1 else None


def _stream_capturing() -> bool:
    return sys.modules["torch"]._C._cuda_isCurrentStreamCapturing()


def _signs_id(layer: Any) -> Any:
    """What identifies the layer's signs across layers: their values (read once per signs tensor
    and version), or their address where they cannot be read now (inside a graph capture) or
    their in-place edits go unseen (inference tensors)."""

    signs = layer._buffers.get("signs")
    if signs is None:
        return None
    cached = layer.__dict__.get(_SIGNS_MARK)
    version = _tensor_version(signs)
    if cached is not None and cached[0] is signs and cached[1] == version:
        return cached[2]
    if signs.is_inference() or _stream_capturing():
        return ("address", signs.data_ptr(), signs.numel())
    ident = _signs_ids.setdefault(signs.detach().cpu().numpy().tobytes(), len(_signs_ids))
    layer.__dict__[_SIGNS_MARK] = (signs, version, ident)
    return ident


def _rotation_entry(
    layer: Any, x: torch.Tensor, dtype: str, key: tuple[int, int]
) -> tuple[Any, ...] | None:
    """What identifies the rotation of ``x`` by ``layer``: (the input's root tensor, data address,
    shape, strides, version, signs id, widths, Hadamard size, dtype, capture id), or None
    where it cannot be shared. ``forward`` reshapes its input (a new view per call), so the input
    is identified by its root tensor (views share the version counter) and the view's geometry."""
    try:
        version = x._version
    except RuntimeError:  # inference tensors keep no version counter: in-place edits go unseen
        return None
    capture = None
    if _stream_capturing():
        # A graph captured on this stream may be replayed at any time, rewriting the workspace
        # behind the back of eager calls: those do not share rotations on this stream any more.
        _captured_streams.add(key)
        capture = _capture_id(key[1])
        if capture is None:
            return None
    elif key in _captured_streams:
        return None
    base = x._base
    return (
        x if base is None else base,
        x.data_ptr(),
        x.shape,
        x.stride(),
        version,
        _signs_id(layer),
        layer.in_features,
        layer.padded_in_features,
        layer.hadamard_size,
        dtype,
        capture,
    )


def _same_rotation(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[0] is b[0] and a[1:] == b[1:]


def _current_stream(device: torch.device) -> int:
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device.index or 0)
    return torch.cuda.current_stream(device).cuda_stream


def _tensor_version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return 0


def codes_are_tiled(layer: Any) -> bool:
    """Whether ``layer.codes`` currently holds the codes in the tiled order (see the module notes)."""
    mark = layer.__dict__.get(_TILED_MARK)
    codes = layer._buffers.get("codes")
    return mark is not None and codes is not None and mark[0]() is codes and mark[1] == _tensor_version(codes)


def _tile_shape(layer: Any) -> tuple[int, int, int, int] | None:
    """(row tiles, super-steps, chunk bytes, row bytes) when the layer's codes can be tiled."""
    rows, row_bytes = layer.codes.shape
    bits_total = layer.n.bit_length() - 1
    if layer.p not in (1, 2) or layer.n != 1 << bits_total or bits_total % layer.p:
        return None
    bits = bits_total // layer.p
    steps = layer.padded_in_features // 128
    chunk = 4 * bits
    if rows % 16 or layer.padded_in_features % 128 or row_bytes != steps * 4 * chunk or not 2 <= bits <= 4:
        return None
    return rows // 16, steps, chunk, row_bytes


def _to_tiled(codes: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    # Stored order (row tile, half, row, step, chunk, byte) -> tiled (row tile, step, half, row, chunk, byte).
    tiles, steps, chunk, row_bytes = shape
    return codes.view(tiles, 2, 8, steps, 4, chunk).permute(0, 3, 1, 2, 4, 5).contiguous().view(-1, row_bytes)


def _to_stored(codes: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    tiles, steps, chunk, row_bytes = shape
    return codes.view(tiles, steps, 2, 8, 4, chunk).permute(0, 2, 3, 1, 4, 5).contiguous().view(-1, row_bytes)


def stored_codes(layer: Any) -> torch.Tensor | None:
    """A new tensor with the codes in their stored (checkpoint) order when they are tiled, else None."""
    if not codes_are_tiled(layer):
        return None
    shape = _tile_shape(layer)
    assert shape is not None, "tiled codes of an untileable shape"
    return _to_stored(layer.codes, shape)


def restore_stored_order(layer: Any) -> None:
    """Put the codes back in their stored order (before a move, a dtype change or pickling)."""
    codes = stored_codes(layer)
    if codes is not None:
        layer._buffers["codes"] = codes
    layer.__dict__.pop(_TILED_MARK, None)


def _tile_codes(layer: Any) -> bool:
    """Repack the codes into tiled order once (on their device); whether they are tiled now."""
    import torch

    if codes_are_tiled(layer):
        return True
    layer.__dict__.pop(_TILED_MARK, None)
    codes = layer._buffers.get("codes")
    if not _TILE_CODES or codes is None or not codes.is_cuda or codes.dtype != torch.uint8:
        return False
    shape = _tile_shape(layer)
    if shape is None or not codes.is_contiguous() or torch.cuda.is_current_stream_capturing():
        return False
    with torch.no_grad():
        tiled = _to_tiled(codes, shape)
    layer._buffers["codes"] = tiled
    layer.__dict__[_TILED_MARK] = (weakref.ref(tiled), _tensor_version(tiled))
    return True


def _layer_args(layer: Any, x: torch.Tensor) -> tuple[Any, ...]:
    """(codes, scales, grid, signs addresses, row_bytes, groups, p, n, hadamard_size, group_size, tiled),
    with the buffers checked once per set of buffers (a cache on the layer, keyed by address), and
    whether the codes are tiled (repacked here on the first call)."""
    # Buffers through `_buffers`: `layer.codes` goes through nn.Module.__getattr__ (~1 µs each).
    buffers = layer._buffers
    tiled = _tile_codes(layer) if buffers["codes"].is_cuda else False
    signs = buffers.get("signs")
    ptrs = (
        buffers["codes"].data_ptr(),
        buffers["scales"].data_ptr(),
        buffers["grid"].data_ptr(),
        0 if signs is None else signs.data_ptr(),
    )
    device = x.device
    cached = layer.__dict__.get("_higgs_cuda_args")
    if cached is not None and cached[0] == ptrs and cached[1] == device and cached[2][-1] == tiled:
        return cached[2]
    _check_buffers(layer, x)
    args = (
        *ptrs,
        layer.codes.shape[1],
        layer.scales.shape[1],
        layer.p,
        layer.n,
        layer.hadamard_size,
        layer.group_size,
        tiled,
    )
    layer.__dict__["_higgs_cuda_args"] = (ptrs, device, args)
    return args


def _weights_unchanged(layer: Any) -> bool:
    """Whether the layer's codes, scales and grid are the tensors of its previous call here, with
    the same in-place versions (so nothing launched since wrote them); records them for the next
    call. False on the first call and for inference tensors (their writes leave no trace)."""
    buffers = layer._buffers
    tensors = (buffers["codes"], buffers["scales"], buffers["grid"])
    try:
        state = tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors keep no version counter
        _weights_seen.pop(layer, None)
        return False
    mark = _weights_seen.get(layer)
    same = (
        mark is not None
        and mark[1] == state
        and all(ref() is t for ref, t in zip(mark[0], tensors, strict=True))
    )
    if not same:
        _weights_seen[layer] = (tuple(weakref.ref(t) for t in tensors), state)
    return same


def _group_key(layer: Any) -> tuple[Any, ...]:
    """What sibling layers must share: input width and rotation, grid, groups."""
    signs = layer._buffers.get("signs")
    return (
        layer.in_features,
        layer.padded_in_features,
        layer.hadamard_size,
        layer.group_size,
        layer.p,
        layer.n,
        signs is None,
    )


class _Group:
    """A sibling group: weak references to its members in order, and the activation dtypes its
    grouped kernel has run with eagerly (so a capture never compiles one: in "graph" mode a
    group's first eager call on a dtype is grouped)."""

    __slots__ = ("members", "warmed")

    def __init__(self, members: tuple[Any, ...]) -> None:
        self.members = members
        self.warmed: set[str] = set()


def siblings_of(layer: Any) -> list[Any] | None:
    """The live members of ``layer``'s group, in order (``layer`` among them), or None."""
    group = layer.__dict__.get(GROUP_ATTR)
    if group is None:
        return None
    members = [ref() for ref in group.members]
    return None if any(m is None for m in members) else members


def group_layers(layers: Any) -> None:
    """Compute these layers (2 or 3 ``HiggsLinear`` that read the same input, e.g. a decoder
    layer's q/k/v projections) in one launch on a GPU; see the module notes. They must have the
    same input width, Hadamard size, group size and grid. A layer belongs to one group at a time
    (grouping again replaces its group)."""
    layers = list(layers)
    if not 2 <= len(layers) <= 3:
        raise ValueError(f"a group holds 2 or 3 layers; got {len(layers)}")
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError("a layer appears twice in the group")
    first = _group_key(layers[0])
    for layer in layers[1:]:
        if _group_key(layer) != first:
            raise ValueError(
                "grouped layers must share input width, Hadamard size, group size, grid (p, n) and signs; "
                f"got {first} and {_group_key(layer)}"
            )
        if not _signs_equal(layers[0], layer):
            raise ValueError("grouped layers must rotate their input alike: their signs differ")
    group = _Group(tuple(weakref.ref(layer) for layer in layers))
    for layer in layers:
        layer.__dict__[GROUP_ATTR] = group


def _signs_equal(a: Any, b: Any) -> bool:
    sa, sb = a._buffers.get("signs"), b._buffers.get("signs")
    if sa is None or sb is None:
        return sa is None and sb is None
    return sa.shape == sb.shape and bool((sa.detach().cpu() == sb.detach().cpu()).all())


def group_projections(model: Any) -> int:
    """Group the q/k/v and the gate/up projections of every module of ``model`` that has them all
    as ``HiggsLinear`` with matching shapes (``PROJECTION_GROUPS``). Returns the number of groups."""
    from .torch import HiggsLinear

    count = 0
    for module in model.modules():
        for names in PROJECTION_GROUPS:
            layers = [module._modules.get(name) for name in names]
            if (
                all(isinstance(layer, HiggsLinear) for layer in layers)
                and len({_group_key(layer) for layer in layers}) == 1
                and all(_signs_equal(layers[0], layer) for layer in layers[1:])
            ):
                group_layers(layers)
                count += 1
    return count


def _groups_launch(batch: int, group_size: int) -> bool:
    """Whether this batch runs grouped launches (the decode-sized ``lut_gemv`` path), cached."""
    key = (batch, group_size)
    known = _groups_launch_cache.get(key)
    if known is None:
        known = _groups_launch_cache[key] = _core.cuda_groups_launch(batch, group_size)
    return known


def _weights_state(layer: Any) -> tuple[Any, ...] | None:
    """The layer's codes, scales and grid tensors with their in-place versions (None for
    inference tensors: their writes leave no trace)."""
    buffers = layer._buffers
    try:
        return tuple((t, t._version) for t in (buffers["codes"], buffers["scales"], buffers["grid"]))
    except RuntimeError:
        return None


def _same_weights(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    if a is None or b is None:
        return False
    return all(x[0] is y[0] and x[1] == y[1] for x, y in zip(a, b, strict=True))


def _group_of(layer: Any, group: _Group, x: torch.Tensor) -> list[Any] | None:
    """The live members of ``layer``'s group (``layer`` first), where all can run in one launch
    on ``x``'s device, else None."""
    members = [layer]
    for ref in group.members:
        other = ref()
        if other is None:
            return None
        if other is not layer:
            codes = other._buffers.get("codes")
            if codes is None or codes.device != x.device or other._buffers["scales"].device != x.device:
                return None
            members.append(other)
    return members


def lut_linear(
    layer: Any,
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    mt: int = 0,
    splits: int = 0,
    dense_min_batch: int = DENSE_MIN_BATCH,
    addend: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for a ``HiggsLinear`` whose buffers are on a GPU; ``x`` is ``batch × in_features``
    float16/bfloat16 on the same device. Writes into ``out`` (``batch × out_features``, same
    dtype, contiguous) when given. ``mt``/``splits`` override the kernel's launch heuristics.
    ``addend`` (``batch × out_features``, same dtype and device): returns ``addend + x @ W.T``
    with PyTorch's two roundings, the sum computed by the LUT-GEMM as it writes its output (a
    decoder layer's residual add without a kernel of its own)."""
    import torch

    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"expected activations of shape (batch, {layer.in_features}); got {tuple(x.shape)}")
    _require_kernels()
    dtype = _dtype_name(x.dtype)
    args = _layer_args(layer, x)
    x_in = x
    x = x.contiguous()
    batch = x.shape[0]
    where = x.device  # a new torch.device object per access
    if out is not None and (
        out.shape != (batch, layer.out_features) or out.dtype != x.dtype or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous {x.dtype} tensor of shape ({batch}, {layer.out_features})"
        )
    if addend is not None:
        shape = (batch, layer.out_features)
        if addend.shape != shape or addend.dtype != x.dtype or addend.device != x.device:
            raise ValueError(
                f"addend must be a {x.dtype} tensor of shape ({batch}, {layer.out_features}) on "
                f"{x.device}; got {addend.dtype} {tuple(addend.shape)} on {addend.device}"
            )
        addend = addend.contiguous()
    if out is None and (batch == 0 or batch >= dense_min_batch):
        out = torch.empty(batch, layer.out_features, dtype=x.dtype, device=where)
    if batch == 0:
        return out
    device = where.index or 0
    stream = _current_stream(where)
    if batch >= dense_min_batch:
        padded = layer.padded_in_features
        x_rot = torch.empty(batch, padded, dtype=x.dtype, device=where)
        _core.cuda_hadamard(
            x.data_ptr(), x_rot.data_ptr(), args[3], batch, layer.in_features, layer.hadamard_size, padded,
            dtype, stream, device,
        )
        w_rot = torch.empty(layer.out_features, padded, dtype=x.dtype, device=where)
        _core.cuda_dequantize_rotated(
            *args[:3], w_rot.data_ptr(), padded, layer.in_features, layer.out_features, *args[4:-1],
            dtype, stream, device, tiled=args[-1],
        )
        if addend is None:
            return torch.matmul(x_rot, w_rot.t(), out=out)
        # Not written into `out` first: it may be the addend itself.
        return torch.add(addend, torch.matmul(x_rot, w_rot.t()), out=out)
    global shared_rotations, overlapped_rotations, grouped_launches, grouped_hits, fused_residuals
    key = (device, stream)
    group = layer.__dict__.get(GROUP_ATTR) if GROUP_MODE != "never" and mt == 0 and splits == 0 else None
    if group is not None and (addend is not None or not _groups_launch(batch, layer.group_size)):
        group = None
    entry = _rotation_entry(layer, x_in, dtype, key) if _SHARE_ROTATION or group is not None else None
    rotation = entry if _SHARE_ROTATION else None
    siblings: list[Any] = []
    sibling_list: list[tuple[int, int, int, int]] = []
    sibling_outs: list[Any] = []
    if group is not None and entry is not None:
        # The rotation entry names the input (view, version, shape, dtype, capture): a match means
        # the same activations, so the output computed with this layer's weights of then.
        done = _group_outputs.get(key)
        if done is not None and layer in done[1] and _same_rotation(done[0], entry):
            y, state = done[1].pop(layer)
            if _same_weights(state, _weights_state(layer)):
                grouped_hits += 1
                return y if out is None else out.copy_(y)
        # The entry's last field is the capture id (None: an eager call).
        launch_all = GROUP_MODE == "always" or entry[-1] is not None or dtype not in group.warmed
        members = _group_of(layer, group, x) if launch_all else None
        if members is not None:
            sibling_args = [_layer_args(other, x) for other in members[1:]]
            # All tiled or none (a layer whose shape does not tile keeps the stored order), and one
            # rotation (signs compared by value, once per signs tensor and version).
            signs = _signs_id(layer)
            if all(a[-1] == args[-1] for a in sibling_args) and all(
                _signs_id(other) == signs for other in members[1:]
            ):
                siblings = members[1:]
                sibling_outs = [
                    torch.empty(batch, other.out_features, dtype=x.dtype, device=where) for other in siblings
                ]
                sibling_list = [
                    (a[0], a[1], y.data_ptr(), other.out_features)
                    for a, y, other in zip(sibling_args, sibling_outs, siblings, strict=True)
                ]
    if out is None:
        out = torch.empty(batch, layer.out_features, dtype=x.dtype, device=where)
    rows = layer.out_features + sum(other.out_features for other in siblings)
    counters = _split_k_counters(where, stream, rows)
    previous = _rotations.pop(key, None)
    # Only a call that may reuse the rotation can overlap (and pays for the check): every layer
    # of the launch must be unchanged (its LUT-GEMM reads their weights before it waits). A list,
    # not a generator: every member records its state for its next call.
    unchanged = (
        rotation is not None
        and previous is not None
        and all([_weights_unchanged(m) for m in (layer, *siblings)])
    )
    ws = _workspaces.get(key)
    for _ in range(2):
        # The workspace holds this rotation when the last call on the stream wrote it into this
        # very buffer (a regrown workspace holds none).
        rotated = (
            rotation is not None
            and previous is not None
            and previous[0] is ws
            and _same_rotation(previous[1], rotation)
        )
        need = _core.cuda_lut_linear(
            x.data_ptr(),
            out.data_ptr(),
            0 if ws is None else ws.data_ptr(),
            0 if ws is None else ws.numel(),
            batch,
            layer.in_features,
            layer.out_features,
            *args[:-1],
            dtype,
            stream,
            device,
            mt=mt,
            splits=splits,
            tiled=args[-1],
            counters=counters.data_ptr(),
            counters_bytes=counters.numel(),
            rotated=rotated,
            rotated_overlap=rotated and unchanged,
            siblings=sibling_list,
            addend=0 if addend is None else addend.data_ptr(),
        )
        if need == 0:
            fused_residuals += addend is not None
            shared_rotations += rotated
            overlapped_rotations += rotated and unchanged
            if siblings:
                grouped_launches += 1
                group.warmed.add(dtype)
                _group_outputs[key] = (
                    entry,
                    {
                        other: (o, _weights_state(other))
                        for other, o in zip(siblings, sibling_outs, strict=True)
                    },
                )
            if rotation is not None:
                # Holds the input (its root tensor) alive: its address cannot be reused meanwhile.
                _rotations[key] = (ws, rotation, x_in)
            return out
        ws = _workspace(where, stream, need)
    raise RuntimeError(f"the CUDA workspace could not be sized ({need} bytes asked)")


def hadamard(
    x: torch.Tensor, hadamard_size: int, signs: torch.Tensor | None = None, width: int = 0
) -> torch.Tensor:
    """The activation rotation the LUT-GEMM applies: each row of ``x`` (float16/bfloat16, on a GPU)
    zero-padded to a multiple of ``hadamard_size``, multiplied by ``signs`` and transformed per
    block; ``width`` (default: the padded width) adds zero columns."""
    import torch

    _require_kernels()
    dtype = _dtype_name(x.dtype)
    x = x.contiguous()
    padded = -(-x.shape[1] // hadamard_size) * hadamard_size
    width = width or padded
    out = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
    if signs is not None:
        signs = signs.to(device=x.device, dtype=torch.float32).contiguous()
        if signs.numel() < padded:
            raise ValueError(f"signs hold {signs.numel()} values; the padded width is {padded}")
    _core.cuda_hadamard(
        x.data_ptr(),
        out.data_ptr(),
        0 if signs is None else signs.data_ptr(),
        x.shape[0],
        x.shape[1],
        hadamard_size,
        width,
        dtype,
        _current_stream(x.device),
        x.device.index or 0,
    )
    return out


def rms_norm_rotate(x: torch.Tensor, weight: torch.Tensor, eps: float, consumer: Any) -> torch.Tensor | None:
    """``weight ⊙ x / sqrt(mean(x²) + eps)`` over the last dimension (transformers' Llama rounding:
    ``x · inv`` rounded to ``x``'s dtype, then times ``weight``) in one kernel that also rotates the
    result for ``consumer`` (a ``HiggsLinear`` that reads it next) into the stream's workspace, so
    that call and its siblings' skip their Hadamard kernel (see the module notes). Returns the
    normalized tensor, or None where this path does not apply (not float16/bfloat16 on the
    consumer's GPU, a weight of another dtype or shape, a batch the dense path takes, tensors
    without a version counter, ``HIGGS_CUDA_FUSE_NORM=0``): the caller normalizes as usual."""
    hidden = consumer.in_features
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.device != x.device:
        return None
    return _prologue_rotate(x, consumer, norm_weight=weight.contiguous(), eps=float(eps))


def silu_mul_rotate(gate: torch.Tensor, up: torch.Tensor, consumer: Any) -> torch.Tensor | None:
    """``silu(gate) ⊙ up`` (rounded as PyTorch's two kernels do) in one kernel that also rotates the
    product for ``consumer`` (the MLP's down projection) into the stream's workspace, as
    ``rms_norm_rotate`` does for a norm. None where this path does not apply (then compute it as
    usual): ``up`` of another shape, dtype or device, or what ``rms_norm_rotate`` declines."""
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        return None
    return _prologue_rotate(gate, consumer, up=up.contiguous())


def _prologue_rotate(x: torch.Tensor, consumer: Any, **prologue: Any) -> torch.Tensor | None:
    """The rows the rotation kernel's ``prologue`` computes from ``x`` (``cuda_hadamard``'s
    ``norm_weight``/``eps`` or ``up``), rotated for ``consumer`` into the workspace and remembered
    as the rotation of the returned tensor; None where the fused path does not apply."""
    import torch

    global fused_prologues
    hidden = consumer.in_features
    if (
        not (_FUSE_NORM and _SHARE_ROTATION)
        or not x.is_cuda
        or x.dtype not in (torch.float16, torch.bfloat16)
        or x.shape[-1] != hidden
        or consumer._buffers["codes"].device != x.device
    ):
        return None
    batch = x.numel() // hidden
    if not 0 < batch < DENSE_MIN_BATCH:
        return None
    _require_kernels()
    dtype = _dtype_name(x.dtype)
    args = _layer_args(consumer, x)
    x = x.contiguous()
    y = torch.empty_like(x)
    # The view the consumer's forward makes (``reshape(-1, in_features)``): the rotation entry
    # names it as that call will.
    y_rows = y.reshape(-1, hidden)
    where = x.device
    stream = _current_stream(where)
    key = (where.index or 0, stream)
    entry = _rotation_entry(consumer, y_rows, dtype, key)
    if entry is None:
        return None
    # The LUT-GEMM reads the rotation as batch rows of the padded width rounded up to 128.
    kp = -(-consumer.padded_in_features // 128) * 128
    ws = _workspace(where, stream, batch * kp * x.element_size())
    pointers = {k: v.data_ptr() if isinstance(v, torch.Tensor) else v for k, v in prologue.items()}
    _core.cuda_hadamard(
        x.data_ptr(),
        ws.data_ptr(),
        args[3],
        batch,
        hidden,
        consumer.hadamard_size,
        kp,
        dtype,
        stream,
        key[0],
        pre_out=y.data_ptr(),
        **pointers,
    )
    # Holds the output (its root tensor) alive: its address cannot be reused meanwhile.
    _rotations[key] = (ws, entry, y_rows)
    fused_prologues += 1
    return y


#: ``HIGGS_CUDA_FUSE_ROPE=0``: ``rope`` declines, transformers' rotary embedding runs as it is.
_FUSE_ROPE = os.environ.get("HIGGS_CUDA_FUSE_ROPE", "") != "0"
#: Fused rotary embedding launches: for tests and benches.
fused_ropes = 0
#: Whether ``rope`` can launch its kernel here (None: not checked yet). Checked once, because
#: ``fuse_rope`` replaces transformers' function for every model in the process: where the
#: kernels cannot run (a build without CUDA, no NVRTC), every call must fall back, not raise.
_ROPE_READY: bool | None = None


def _rope_ready() -> bool:
    global _ROPE_READY
    if _ROPE_READY is None:
        _ROPE_READY = hasattr(_core, "cuda_rope") and cuda_available()
    return _ROPE_READY


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (``unsqueeze_dim=1``) in one kernel,
    the same bits: ``q·cos + rotate_half(q)·sin`` and the same for ``k``, each product and the
    sum rounded to the dtype as PyTorch rounds them. ``q`` and ``k`` are ``(batch, heads, seq,
    head_dim)`` (any strides, head_dim contiguous), ``cos`` and ``sin`` ``(batch or 1, seq,
    head_dim)``; all float16 or all bfloat16 on one GPU, no autograd. The outputs are
    ``(batch, seq, heads, head_dim)`` in memory, viewed as ``(batch, heads, seq, head_dim)``
    (the order of a transposed projection output). Returns None where that does not hold or the
    kernels cannot run here (the caller computes it)."""
    global fused_ropes
    import torch

    if not _FUSE_ROPE or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return None
    batch, q_heads, seq, dim = q.shape
    tensors = (q, k, cos, sin)
    if (
        not q.is_cuda
        or q.dtype not in (torch.float16, torch.bfloat16)
        or any(t.dtype != q.dtype or t.device != q.device or t.stride(-1) != 1 for t in tensors)
        or k.shape[0] != batch
        or k.shape[2:] != (seq, dim)
        or cos.shape != sin.shape
        or cos.shape[1:] != (seq, dim)
        or cos.shape[0] not in (1, batch)
        or dim % 2
        or batch * seq == 0
        or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        or not _rope_ready()
    ):
        return None
    k_heads = k.shape[1]
    q_out = torch.empty(batch, seq, q_heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(batch, seq, k_heads, dim, dtype=q.dtype, device=q.device)

    def position_strides(t: torch.Tensor) -> tuple[int, int]:
        return (0 if t.shape[0] == 1 else t.stride(0), t.stride(1))

    device = q.device
    _core.cuda_rope(
        (q.data_ptr(), q_out.data_ptr(), q_heads, (q.stride(0), q.stride(1), q.stride(2))),
        (k.data_ptr(), k_out.data_ptr(), k_heads, (k.stride(0), k.stride(1), k.stride(2))),
        (cos.data_ptr(), position_strides(cos)),
        (sin.data_ptr(), position_strides(sin)),
        batch,
        seq,
        dim,
        _dtype_name(q.dtype),
        _current_stream(device),
        device.index or 0,
    )
    fused_ropes += 1
    return q_out.transpose(1, 2), k_out.transpose(1, 2)
