"""PyTorch side: load HIGGS checkpoints into transformers models."""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any

import numpy as np
import torch

from . import cuda as _cuda
from . import dequantize
from .checkpoint import HiggsCheckpoint
from .cuda import GROUP_ATTR, group_projections

PathLike = str | os.PathLike[str]


def _config_without_quantization(ckpt: HiggsCheckpoint) -> Any:
    """The model's transformers config, minus our ``quantization_config`` (transformers does not know it)."""
    from transformers import AutoConfig

    config_dict = dict(ckpt.config)
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    return AutoConfig.for_model(model_type, **config_dict)


def _default_dtype(ckpt: HiggsCheckpoint, device: torch.device) -> torch.dtype:
    """float16 on CUDA; on the CPU float32 for a float32 checkpoint, else bfloat16."""
    if device.type == "cuda":
        return torch.float16
    stored = ckpt.config.get("dtype", ckpt.config.get("torch_dtype"))
    return torch.float32 if stored == "float32" else torch.bfloat16


def _empty_model(ckpt: HiggsCheckpoint, dtype: torch.dtype) -> torch.nn.Module:
    """The model's modules on the meta device: no full-precision weights are ever allocated."""
    from transformers import AutoModelForCausalLM

    config = _config_without_quantization(ckpt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _finish(model: torch.nn.Module, state: dict[str, torch.Tensor], path: PathLike) -> torch.nn.Module:
    _rebuild_meta_buffers(model)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{path}: tensors the model does not have: {unexpected[:5]}")
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{path}: the checkpoint lacks {still_meta[:5]}")
    return model.eval()


def is_higgs_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a directory whose config.json names ``quant_method: higgs_rs``."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "higgs_rs"


def load_plain(path: PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An ordinary (not HIGGS) transformers causal LM from a checkpoint directory, for comparison."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def load_dequantized(path: PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers model whose HIGGS weights are dequantized into ordinary ``nn.Linear`` layers.

    For evaluating quality; ``higgs_rs.load`` runs the codes directly instead.
    """
    ckpt = HiggsCheckpoint(path)
    model = _empty_model(ckpt, dtype)
    state = {name: ckpt.get(name).to(dtype) for name in ckpt.plain_tensors()}
    for module in ckpt.modules:
        weight = torch.from_numpy(dequantize(ckpt.quantized(module)))
        state[f"{module}.weight"] = weight.to(dtype)
    return _finish(model, state, path)


def load(
    path: PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """A transformers causal LM whose quantized linear layers are ``HiggsLinear`` modules.

    The model is built on the meta device and only the checkpoint's tensors are materialized, so
    full-precision weights of the quantized layers never exist in memory. ``dtype`` is the
    activation and plain-weight dtype (default: float16 on CUDA; on the CPU the checkpoint's own
    dtype, as transformers' ``dtype="auto"``, except that float16 becomes bfloat16 (the fast CPU
    path); float32 for exact comparisons). The q/k/v and gate/up projections are grouped
    (``higgs_rs.cuda.group_projections``): on a GPU each group runs as one launch, and the RMSNorm
    before each group normalizes and rotates in one kernel (``fuse_norms``), as does each MLP's
    activation for its down projection (``fuse_mlps``); the decoder layers' residual adds run in
    the o and down projections' kernels (``fuse_residuals``), and the rotary embedding runs in one
    kernel (``fuse_rope``).
    """
    device = torch.device(device)
    ckpt = HiggsCheckpoint(path)
    if dtype is None:
        dtype = _default_dtype(ckpt, device)
    model = _empty_model(ckpt, dtype)
    modules_config = ckpt.quantization_config["modules"]
    for name, spec in ckpt.modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        layer = HiggsLinear(
            spec.in_features,
            spec.out_features,
            p=spec.p,
            n=spec.n,
            hadamard_size=spec.hadamard_size,
            group_size=spec.group_size,
            padded_in_features=spec.padded_in_features,
            row_bytes=int(modules_config[name]["row_bytes"]),
            bias=getattr(old, "bias", None) is not None,
            has_signs=ckpt.seed is not None,
            device="meta",
        )
        setattr(parent, child, layer)
    state: dict[str, torch.Tensor] = {}
    for name in ckpt.plain_tensors():
        state[name] = ckpt.get(name).to(device=device, dtype=dtype)
    signs = ckpt.get("higgs.signs").to(torch.float32) if ckpt.seed is not None else None
    grids: dict[str, torch.Tensor] = {}
    for name, spec in ckpt.modules.items():
        if spec.grid not in grids:
            grids[spec.grid] = ckpt.get(spec.grid).to(device)
        state[f"{name}.codes"] = ckpt.get(f"{name}.higgs_codes").to(device)
        state[f"{name}.scales"] = ckpt.get(f"{name}.higgs_scales").to(device)
        state[f"{name}.grid"] = grids[spec.grid]
        if signs is not None:
            state[f"{name}.signs"] = signs[: spec.padded_in_features].to(device)
    model = _finish(model, state, path).to(device)
    group_projections(model)
    fuse_norms(model)
    fuse_mlps(model)
    fuse_residuals(model)
    fuse_rope(model)
    return model


# Rows from which the CPU path dequantizes a transient tile of rotated weights and runs torch's
# GEMM instead of the LUT product. Measured per layer on SmolLM2's shapes (576/1536 wide), one
# thread: even at about 16 rows in f32 and 32 in bf16, the LUT product faster below, the GEMM
# (dequantizing costs ~0.5 ns per weight in f32, ~1 ns in bf16) faster above.
CPU_GEMM_MIN_BATCH = 24

# Where HiggsLinear caches its CPU plans (f32 and bf16 activations), outside the state dict.
_CPU_PLAN_SLOTS = ("_cpu_plan_cache", "_cpu_plan_cache_bf16")

# The OpenMP runtime the CPU LUT products were attached to (torch's own), once per process:
# None before the first try, "" when none could be (see `_attach_torch_openmp`).
_TORCH_OPENMP: str | None = None


def _attach_torch_openmp() -> str:
    """Split mid-sized CPU LUT products (decode) over torch's own OpenMP team, whose workers spin
    between torch's ops, instead of keeping them on the calling thread; rayon's threads would
    compete with those spinning workers for the same cores. Only torch's runtime will do (a
    process can hold several copies of libgomp, e.g. sentencepiece's, each with its own team):
    the entry points are resolved through ``libtorch_cpu``. Off with ``HIGGS_CPU_OPENMP=0``, when
    torch's parallel backend is not OpenMP, or off Linux. Returns the runtime's path or ""."""
    global _TORCH_OPENMP
    if _TORCH_OPENMP is not None:
        return _TORCH_OPENMP
    _TORCH_OPENMP = ""
    if os.environ.get("HIGGS_CPU_OPENMP", "") == "0":
        return ""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return ""
    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if line.rstrip().endswith("/libtorch_cpu.so")}
    except OSError:
        return ""
    from . import _core

    for library in sorted(loaded):
        try:
            _TORCH_OPENMP = str(_core.cpu_openmp_attach(library) or library)
            break
        except (NotImplementedError, ValueError):
            continue
    return _TORCH_OPENMP


def _numpy(tensor: torch.Tensor) -> Any:
    """A NumPy view of a contiguous CPU tensor; bf16 as uint16 bits (NumPy has no bfloat16)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy()
    return tensor.numpy()


def _version(tensor: torch.Tensor) -> int:
    """The in-place edit counter of a tensor (-1 for inference tensors, which keep none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _rebuild_meta_buffers(model: torch.nn.Module) -> None:
    """Modules whose buffers were computed on the meta device (rotary tables) are rebuilt on CPU."""
    for name, module in list(model.named_modules()):
        has_meta_buffer = any(b is not None and b.is_meta for b in module._buffers.values())
        if has_meta_buffer and not any(True for _ in module.parameters()) and hasattr(module, "config"):
            fresh = type(module)(module.config)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def patch(
    model: torch.nn.Module,
    bits: float = 4,
    p: int = 2,
    hadamard_size: int | None = None,
    group_size: int = 64,
    seed: int | None = 0,
    skip: tuple[str, ...] = ("lm_head", "embed"),
    threads: int | None = None,
) -> torch.nn.Module:
    """Quantize an in-memory model's ``nn.Linear`` layers in place (those whose name contains none
    of ``skip``), replacing each with a ``HiggsLinear`` on the same device, groups the q/k/v and
    gate/up projections (one launch each on a GPU) and fuses the norms before them, the MLP
    activations, the residual adds and the rotary embedding (``fuse_norms``, ``fuse_mlps``,
    ``fuse_residuals``, ``fuse_rope``).
    Returns the model."""
    from . import quantize_tensor

    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip)
    ]
    for name, module in targets:
        weight = module.weight.detach()
        q = quantize_tensor(
            weight.cpu(),
            bits=bits,
            p=p,
            hadamard_size=hadamard_size,
            group_size=group_size,
            seed=seed,
            threads=threads,
        )
        bias = None if module.bias is None else module.bias.detach().float().cpu()
        layer = HiggsLinear.from_quantized(q, bias=bias, device="cpu").to(weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    group_projections(model)
    fuse_norms(model)
    fuse_mlps(model)
    fuse_residuals(model)
    fuse_rope(model)
    return model


class HiggsLinear(torch.nn.Module):
    """A linear layer stored as HIGGS codes: ``y = x @ W.T + b`` without materializing ``W``.

    The activations are rotated like the weights were (signs, Hadamard per block, zero padding),
    then a LUT matrix product runs on the packed codes: in Rust on the CPU, or with the CUDA
    kernels when the buffers are on a GPU. Codes, scales, grid and signs are buffers, so
    ``state_dict`` round-trips.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        p: int,
        n: int,
        hadamard_size: int,
        group_size: int,
        padded_in_features: int,
        row_bytes: int,
        bias: bool = False,
        has_signs: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.p, self.n = p, n
        self.hadamard_size = hadamard_size
        self.group_size = group_size
        self.padded_in_features = padded_in_features
        groups = -(-padded_in_features // group_size)
        self.register_buffer("codes", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("grid", torch.zeros(n, p, dtype=torch.float32, device=device))
        self.register_buffer(
            "signs",
            torch.ones(padded_in_features, dtype=torch.float32, device=device) if has_signs else None,
        )
        self.bias = (
            torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_quantized(
        cls, q: Any, bias: torch.Tensor | None = None, device: torch.device | str | None = "cpu"
    ) -> HiggsLinear:
        """From a ``higgs_rs.QuantizedTensor``."""
        from . import grid_points, random_signs

        rows, cols = q.shape
        layer = cls(
            cols,
            rows,
            p=q.p,
            n=q.n,
            hadamard_size=q.hadamard_size,
            group_size=q.group_size,
            padded_in_features=q.padded_cols,
            row_bytes=q.codes.shape[1],
            bias=bias is not None,
            has_signs=q.seed is not None,
            device=device,
        )
        with torch.no_grad():
            layer.codes.copy_(torch.from_numpy(q.codes))
            layer.scales.copy_(torch.from_numpy(q.scales))
            layer.grid.copy_(torch.from_numpy(grid_points(q.p, q.n)))
            if q.seed is not None:
                layer.signs.copy_(torch.from_numpy(random_signs(q.seed, q.padded_cols)))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def _apply(self, fn: Any, recurse: bool = True) -> HiggsLinear:
        """``.to(device)`` moves the buffers, but ``.half()`` / ``.to(dtype)`` must not change them:
        scales stay f16, grid and signs f32 (the format and the kernels depend on it). Codes the
        CUDA path holds tiled go back to their stored order first."""
        # The CPU plans hold the old buffers (and NumPy views of them): drop them with the move.
        for slot in _CPU_PLAN_SLOTS:
            self.__dict__.pop(slot, None)
        if "_higgs_cuda_tiled" in self.__dict__:
            from .cuda import restore_stored_order

            restore_stored_order(self)
        originals = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                # Move the untouched original: converting back would lose precision.
                self._buffers[name] = original.to(device=moved.device)
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy`` leave out the CPU plan (a Rust object; rebuilt on use) and
        the sibling group (a copy is not grouped with the original's layers)."""
        state = self.__dict__.copy()
        for slot in _CPU_PLAN_SLOTS:
            state.pop(slot, None)
        state.pop(GROUP_ATTR, None)
        if state.pop("_higgs_cuda_tiled", None) is not None:
            from .cuda import stored_codes

            codes = stored_codes(self)
            state.pop("_higgs_cuda_args", None)
            if codes is not None:
                state["_buffers"] = {**state["_buffers"], "codes": codes}
        return state

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        """The codes are saved in their stored order, also while the CUDA path holds them tiled."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "_higgs_cuda_tiled" in self.__dict__:
            from .cuda import stored_codes

            codes = stored_codes(self)
            if codes is not None:
                destination[prefix + "codes"] = codes

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, p={self.p}, n={self.n}, "
            f"hadamard_size={self.hadamard_size}, group_size={self.group_size}, bias={self.bias is not None}"
        )

    # Never traced by torch.compile (its Rust/CUDA calls are opaque to dynamo): a graph break,
    # run as in eager mode, instead of a trace that specializes on every shape (~0.5 µs a call).
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + b``; with ``residual``, ``residual + (x @ W.T + b)`` (a decoder layer's
        residual add, rounded as PyTorch rounds it), which on a GPU the LUT-GEMM adds as it
        writes its output: one kernel less."""
        # A fused decoder layer hands its o projection the residual for the duration of its
        # attention call (see `fuse_residuals`): taken once, so the layer knows it was added.
        slot = self.__dict__.get(_RESIDUAL_SLOT)
        if slot and residual is None:
            residual = slot.pop()
        # Buffers and the bias through the dicts: `self.codes` goes through nn.Module.__getattr__
        # (~1 µs a lookup), and a decode step makes hundreds of these calls.
        bias = self._parameters.get("bias", self.__dict__.get("bias"))
        if self._buffers["codes"].is_cuda:
            shape = x.shape
            out_shape = (*shape[:-1], self.out_features)
            addend = None
            if (
                residual is not None
                and bias is None
                and residual.shape == out_shape
                and residual.dtype == x.dtype
                and residual.device == x.device
                # The kernel keeps no autograd graph, and gradients flow through a residual.
                and not (torch.is_grad_enabled() and residual.requires_grad)
                and _cuda._FUSE_RESIDUAL
            ):
                addend = residual.reshape(-1, self.out_features)
            y = self._forward_cuda(x.reshape(-1, self.in_features), addend)
            if bias is not None:
                y = y + bias.to(y.dtype)
            y = y.reshape(out_shape)
            if residual is None or addend is not None:
                return y
            return residual + y
        y = self._forward_cpu(x)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y if residual is None else residual + y

    def _cpu_plan(self, bf16: bool = False) -> tuple[Any, Any, Any]:
        """The Rust plan (kernel and tables resolved once) and NumPy views of codes and scales,
        rebuilt when a buffer was replaced (``.to``, ``load_state_dict``) or edited in place.
        With ``bf16``, the plan for bf16 activations: grid points rounded to bf16 (bf16
        precision like ``F.linear`` in bf16, and a faster lookup)."""
        # Per call, so cheap: the buffer objects (replaced by `.to`, `load_state_dict(assign=True)`)
        # and the in-place edit counters of the two the plan copies (grid, signs).
        buffers = self._buffers
        codes_t, scales_t = buffers["codes"], buffers["scales"]
        grid, signs = buffers["grid"], buffers["signs"]
        slot = _CPU_PLAN_SLOTS[bf16]
        cached = self.__dict__.get(slot)
        if (
            cached is not None
            and cached[0] is codes_t
            and cached[1] is scales_t
            and cached[2] is grid
            and cached[3] is signs
            and cached[4] == _version(grid)
            and cached[5] == (None if signs is None else _version(signs))
        ):
            return cached[6]
        from . import _core

        _attach_torch_openmp()
        codes, scales = codes_t.numpy(), scales_t.numpy()
        plan = _core.CpuLutPlan(
            codes,
            scales,
            grid.numpy(),
            None if signs is None else signs.numpy(),
            self.in_features,
            self.hadamard_size,
            self.group_size,
            bf16_grid=bf16,
        )
        result = (plan, codes, scales)
        self.__dict__[slot] = (
            codes_t,
            scales_t,
            grid,
            signs,
            _version(grid),
            None if signs is None else _version(signs),
            result,
        )
        return result

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """The Rust LUT product for small batches; for ``CPU_GEMM_MIN_BATCH`` rows or more, the
        rotated weights are dequantized into a transient tile and torch's GEMM runs on it (the
        LUT product pays its table lookups per block of 8 rows, a GEMM reuses each weight
        across the whole batch). bf16 activations run in bf16 precision (like ``F.linear`` in
        bf16): converted in Rust, grid points rounded to bf16 for the LUT product, weights and
        activations bf16 in the GEMM. Other dtypes run in f32. ``x`` may have leading
        dimensions."""
        if x.requires_grad:
            x = x.detach()
        shape, wanted = x.shape, x.dtype
        if not shape or shape[-1] != self.in_features:
            raise ValueError(
                f"HiggsLinear({self.in_features} → {self.out_features}) got input of shape {tuple(shape)}"
            )
        out_shape = (*shape[:-1], self.out_features)
        bf16 = wanted == torch.bfloat16
        plan, codes, scales = self._cpu_plan(bf16)
        # Conversions only when needed: even no-op `.to()` / `.contiguous()` / `.reshape()`
        # calls cost ~1 µs each, and a decode step makes hundreds of these calls.
        if not bf16 and wanted != torch.float32:
            x = x.to(torch.float32)
        if not x.is_contiguous():
            x = x.contiguous()
        batch = x.numel() // self.in_features
        if batch >= CPU_GEMM_MIN_BATCH:
            dtype = torch.bfloat16 if bf16 else torch.float32
            width = plan.rotated_width
            w_rot = torch.empty(self.out_features, width, dtype=dtype)
            x_rot = torch.empty(batch, width, dtype=dtype)
            plan.dequantize_rotated(codes, scales, _numpy(w_rot))
            plan.rotate(_numpy(x.view(batch, self.in_features)), _numpy(x_rot))
            out = torch.mm(x_rot, w_rot.t()).view(out_shape)
        else:
            # Leading dimensions folded on the NumPy side (a NumPy reshape costs a third of a
            # torch view).
            x_np = _numpy(x).reshape(batch, self.in_features)
            out_np = np.empty(out_shape, np.uint16 if bf16 else np.float32)
            plan.forward(x_np, codes, scales, out_np.reshape(batch, self.out_features))
            out = torch.from_numpy(out_np)
            if bf16:
                out = out.view(torch.bfloat16)
        if out.dtype != wanted:
            out = out.to(wanted)
        return out

    def _forward_cuda(self, x: torch.Tensor, addend: torch.Tensor | None = None) -> torch.Tensor:
        # The fused CUDA path (Hadamard kernel + LUT-GEMM on the codes) lives in higgs_rs.cuda.
        return _cuda.lut_linear(self, x, addend=addend)


#: RMSNorm classes computed as ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(dtype)``
#: (transformers' Llama family), which ``fuse_norms`` replaces. Gemma's (``1 + weight``) is not one.
LLAMA_STYLE_NORMS = frozenset(
    {"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
)
#: (norm, the module reading its output) child paths in transformers' decoder layers (Phi-3 stores
#: q/k/v and gate/up as one projection each).
NORM_CONSUMERS = (
    ("input_layernorm", "self_attn.q_proj"),
    ("input_layernorm", "self_attn.qkv_proj"),
    ("post_attention_layernorm", "mlp.gate_proj"),
    ("post_attention_layernorm", "mlp.gate_up_proj"),
)
#: Key in a ``HiggsRMSNorm``'s ``__dict__``: a weak reference to the ``HiggsLinear`` it feeds.
_CONSUMER_ATTR = "_higgs_norm_consumer"


class HiggsRMSNorm(torch.nn.Module):
    """An RMSNorm whose output feeds HIGGS layers: ``weight ⊙ x / sqrt(mean(x²) + eps)`` over the
    last dimension, rounded as transformers' Llama norm does (``x · inv`` in float32, rounded to
    ``x``'s dtype, then times ``weight``). On a GPU one kernel normalizes and also rotates the
    result for the layer it feeds (``higgs_rs.cuda.rms_norm_rotate``), whose call (with its
    siblings) then skips its own Hadamard kernel; elsewhere, and where that path does not apply,
    it computes the same formula with PyTorch. Its state dict is the norm's (``weight``)."""

    def __init__(self, weight: torch.nn.Parameter, eps: float | None, consumer: HiggsLinear) -> None:
        super().__init__()
        self.weight = weight
        #: None: the machine epsilon of the input's dtype (as ``torch.nn.RMSNorm``).
        self.eps = eps
        self.__dict__[_CONSUMER_ATTR] = weakref.ref(consumer)

    @property
    def variance_epsilon(self) -> float | None:
        """transformers' name for ``eps``."""
        return self.eps

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"

    def __getstate__(self) -> dict[str, Any]:
        """Pickles and deep copies leave out the link to the layer it feeds (a weak reference):
        a copy normalizes with PyTorch until ``fuse_norms`` links it again."""
        state = self.__dict__.copy()
        state.pop(_CONSUMER_ATTR, None)
        return state

    # Not traced by torch.compile (the fused kernel is opaque to dynamo), like HiggsLinear.forward:
    # one graph break instead of a trace through the launch's Python.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        ref = self.__dict__.get(_CONSUMER_ATTR)
        consumer = None if ref is None else ref()
        # The kernel keeps no autograd graph: where gradients are wanted, PyTorch computes it.
        tracked = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.is_cuda and consumer is not None and not tracked:
            from .cuda import rms_norm_rotate

            y = rms_norm_rotate(x, self.weight, eps, consumer)
            if y is not None:
                return y
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return self.weight * h.to(dtype)


def _is_llama_style_norm(module: Any) -> bool:
    if type(module).__name__ in LLAMA_STYLE_NORMS:
        return isinstance(getattr(module, "variance_epsilon", None), float)
    return (
        type(module) is torch.nn.RMSNorm and module.weight is not None and len(module.normalized_shape) == 1
    )


def fuse_norms(model: torch.nn.Module, pairs: tuple[tuple[str, str], ...] = NORM_CONSUMERS) -> int:
    """Replace each Llama-style RMSNorm of ``model`` whose output feeds a ``HiggsLinear`` (``pairs``:
    (norm, reader) child paths of one module, by default a transformers decoder layer's two norms
    and the q and gate projections) with a ``HiggsRMSNorm`` holding the same weight, so that on a
    GPU the norm and the rotation for its readers run as one kernel. Returns how many were
    replaced. ``torch.nn.RMSNorm`` is computed in float32 and rounded once; its replacement
    rounds as transformers' Llama norm does (at most two units in the last place apart,
    as ``tests/test_norm.py`` checks)."""
    count = 0
    for module in list(model.modules()):
        for norm_name, reader_name in pairs:
            norm = module._modules.get(norm_name)
            if norm is None or not _is_llama_style_norm(norm):
                continue
            try:
                reader = module.get_submodule(reader_name)
            except AttributeError:
                continue
            if not isinstance(reader, HiggsLinear) or norm.weight.shape != (reader.in_features,):
                continue
            eps = getattr(norm, "variance_epsilon", None) if type(norm) is not torch.nn.RMSNorm else norm.eps
            setattr(module, norm_name, HiggsRMSNorm(norm.weight, eps, reader))
            count += 1
    return count


#: MLP classes computed as ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (transformers' Llama
#: family), which ``fuse_mlps`` replaces when ``act_fn`` is SiLU.
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


class HiggsGatedMLP(torch.nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with HIGGS projections: on a GPU one kernel
    computes ``silu(gate) * up`` and rotates it for ``down_proj`` (``higgs_rs.cuda.silu_mul_rotate``),
    whose call then skips its own Hadamard kernel; elsewhere PyTorch computes the product. The
    same children (and state dict) as the MLP it replaces."""

    def __init__(
        self, gate_proj: HiggsLinear, up_proj: HiggsLinear, down_proj: HiggsLinear, act_fn: Any
    ) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    # As HiggsRMSNorm.forward: one graph break under torch.compile.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of ``x``; with ``residual``, ``residual + mlp(x)`` (added by the down
        projection's kernel, see ``HiggsLinear.forward``)."""
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.is_cuda:
            from .cuda import silu_mul_rotate

            product = silu_mul_rotate(gate, up, self.down_proj)
            if product is not None:
                return self.down_proj(product, residual)
        return self.down_proj(self.act_fn(gate) * up, residual)


def _is_silu(module: Any) -> bool:
    return isinstance(module, torch.nn.SiLU) or type(module).__name__ == "SiLUActivation"


def fuse_mlps(model: torch.nn.Module, classes: frozenset[str] = GATED_MLPS) -> int:
    """Replace each MLP of ``model`` whose class is in ``classes`` (computed as
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``), whose three projections are ``HiggsLinear``
    and whose ``act_fn`` is SiLU, with a ``HiggsGatedMLP`` over the same modules. Returns how many
    were replaced."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if child is None or type(child).__name__ not in classes:
                continue
            parts = [child._modules.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
            act = child._modules.get("act_fn", getattr(child, "act_fn", None))
            if not all(isinstance(p, HiggsLinear) for p in parts) or not _is_silu(act):
                continue
            gate, up, down = parts
            if gate.out_features != up.out_features or down.in_features != gate.out_features:
                continue
            setattr(module, name, HiggsGatedMLP(gate, up, down, act))
            count += 1
    return count


#: Decoder layer classes computed as transformers' Llama layer (``h = x + attn(norm1(x))``,
#: ``out = h + mlp(norm2(h))``, the attention ending in its ``o_proj``), whose residual adds
#: ``fuse_residuals`` moves into the o and down projections.
RESIDUAL_DECODERS = frozenset(
    {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
)
#: Key in an o projection's ``__dict__``: a one-item list holding the residual its next call adds
#: (set by a fused decoder layer around its attention call).
_RESIDUAL_SLOT = "_higgs_pending_residual"


class _ResidualFusedDecoder:
    """The forward of a transformers Llama-family decoder layer with both residual adds computed
    by the projections before them: the attention's ``o_proj`` (handed the residual for the
    attention call) and the MLP's down projection (``HiggsGatedMLP``). On a GPU their LUT-GEMMs
    write ``residual + y`` (PyTorch's rounding), two kernels less per layer. Mixed into a
    subclass of the layer's own class (``fuse_residuals``), so ``isinstance`` and transformers'
    output recording still see the original class."""

    _higgs_unfused: type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        o_proj = attn._modules.get("o_proj")
        # Positional extras could mean another signature: the layer's own forward takes them.
        if args or not isinstance(o_proj, HiggsLinear):
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if torch.compiler.is_compiling():
            # Traced by dynamo: the hand-over to o_proj is Python state it should not trace, so
            # the attention's add is traced (the MLP's below is still the kernel's).
            hidden_states = residual + attn(hidden_states=hidden_states, **kwargs)[0]
        else:
            slot = [residual]
            o_proj.__dict__[_RESIDUAL_SLOT] = slot
            try:
                hidden_states = attn(hidden_states=hidden_states, **kwargs)[0]
            finally:
                o_proj.__dict__.pop(_RESIDUAL_SLOT, None)
            if slot:  # the o projection did not run: add as the layer would
                hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if isinstance(mlp, HiggsGatedMLP):
            return mlp(hidden_states, residual)
        return residual + mlp(hidden_states)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickles and deep copies are of the layer's own class: a copy adds with PyTorch until
        ``fuse_residuals`` fuses it again."""
        # Protocol 2's reduction, (copyreg.__newobj__, (class,), state, ...), rebuilt through
        # `_new_unfused`: pickle refuses a __newobj__ of another class than the object's.
        reduced = super().__reduce_ex__(max(2, protocol))
        return (_new_unfused, (self._higgs_unfused,), *reduced[2:])


def _new_unfused(cls: type) -> Any:
    return cls.__new__(cls)


@functools.cache
def _fused_decoder_class(cls: type) -> type:
    """The fused subclass of a decoder layer class (one per class)."""
    return type(f"Higgs{cls.__name__}", (_ResidualFusedDecoder, cls), {"_higgs_unfused": cls})


def fuse_residuals(model: torch.nn.Module, classes: frozenset[str] = RESIDUAL_DECODERS) -> int:
    """Make each decoder layer of ``model`` whose class is in ``classes`` and whose attention's
    ``o_proj`` is a ``HiggsLinear`` compute its two residual adds inside the o and down
    projections (the down one where the MLP is a ``HiggsGatedMLP``): the layer's class becomes a
    subclass of its own with that forward (same modules, attributes and state dict). Only for
    layers whose forward returns a tensor (transformers ≥ 4.56's convention). Returns how many
    were changed."""
    import inspect

    count = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, _ResidualFusedDecoder) or cls.__name__ not in classes:
            continue
        attn = module._modules.get("self_attn")
        if attn is None or not isinstance(attn._modules.get("o_proj"), HiggsLinear):
            continue
        if inspect.signature(cls.forward).return_annotation not in (torch.Tensor, "torch.Tensor"):
            continue
        module.__class__ = _fused_decoder_class(cls)
        count += 1
    return count


#: Attention classes whose module's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` is
#: transformers' Llama rotary embedding, which ``fuse_rope`` computes in one kernel on a GPU.
ROPE_ATTENTIONS = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"})


def _rope_in_one_kernel(original: Any) -> Any:
    """``original`` (a transformers ``apply_rotary_pos_emb``) computed by ``higgs_rs.cuda.rope``
    where that applies (CUDA float16/bfloat16 tensors, ``unsqueeze_dim=1``, no autograd, not
    being traced by ``torch.compile``, which fuses it itself), else by ``original``: the same
    bits either way."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, *args: Any, **kwargs: Any) -> Any:
        plain = not args and (not kwargs or kwargs == {"unsqueeze_dim": 1})
        if plain and q.is_cuda and not torch.compiler.is_compiling():
            out = _cuda.rope(q, k, cos, sin)
            if out is not None:
                return out
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__higgs_original__ = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def fuse_rope(model: torch.nn.Module, classes: frozenset[str] = ROPE_ATTENTIONS) -> int:
    """Compute the rotary embedding of ``model``'s attention layers whose class is in ``classes``
    in one kernel on a GPU (``higgs_rs.cuda.rope``; about ten small kernels otherwise, which in a
    captured decode step cost more than the launch they become). transformers calls its modeling
    module's ``apply_rotary_pos_emb`` by name, so that function is replaced in the module, for
    every model of those classes in the process; the replacement gives the same bits and falls
    back to the original wherever the kernel does not apply (CPU, float32, autograd,
    ``torch.compile``), so other models see no difference. ``HIGGS_CUDA_FUSE_ROPE=0`` keeps the
    original. Returns how many modeling modules were changed (0 when already done)."""
    import sys

    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ not in classes:
            continue
        modeling = sys.modules.get(cls.__module__)
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is None or hasattr(original, "__higgs_original__"):
            continue
        modeling.apply_rotary_pos_emb = _rope_in_one_kernel(original)
        count += 1
    return count
