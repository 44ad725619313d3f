"""PyTorch side: load HIGGS checkpoints into transformers models."""

from __future__ import annotations

import os
from typing import Any

import torch

from . import dequantize
from .checkpoint import HiggsCheckpoint

PathLike = str | os.PathLike[str]


def _config_without_quantization(ckpt: HiggsCheckpoint) -> Any:
    """The model's transformers config, minus our ``quantization_config`` (transformers does not know it)."""
    from transformers import AutoConfig

    config_dict = dict(ckpt.config)
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    return AutoConfig.for_model(model_type, **config_dict)


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
    activation and plain-weight dtype (default: float32 on CPU, float16 on CUDA).
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    ckpt = HiggsCheckpoint(path)
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
    model = _finish(model, state, path)
    return model.to(device)


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
    of ``skip``), replacing each with a ``HiggsLinear`` on the same device. Returns the model."""
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
        scales stay f16, grid and signs f32 (the format and the kernels depend on it)."""
        originals = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                # Move the untouched original: converting back would lose precision.
                self._buffers[name] = original.to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, p={self.p}, n={self.n}, "
            f"hadamard_size={self.hadamard_size}, group_size={self.group_size}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.codes.is_cuda:
            y = self._forward_cuda(x2)
        else:
            y = self._forward_cpu(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        from . import _core

        xf = x.detach().to(torch.float32).contiguous()
        y = _core.lut_linear(
            xf.numpy(),
            self.codes.numpy(),
            self.scales.numpy(),
            self.grid.numpy(),
            None if self.signs is None else self.signs.numpy(),
            self.hadamard_size,
            self.group_size,
        )
        return torch.from_numpy(y).to(x.dtype)

    def _forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        # The fused CUDA path (Hadamard kernel + LUT-GEMM on the codes) lives in higgs_rs.cuda.
        from .cuda import lut_linear

        return lut_linear(self, x)
