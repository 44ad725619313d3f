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
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{path}: tensors the model does not have: {unexpected[:5]}")
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{path}: the checkpoint lacks {still_meta[:5]}")
    return model.eval()


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
    # Buffers the checkpoint does not store (rotary tables) are rebuilt on the CPU.
    _materialize_buffers(model)
    return _finish(model, state, path)


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers created on meta (rotary inverse frequencies) are recomputed on CPU."""
    for module in model.modules():
        if hasattr(module, "rope_init_fn") and getattr(module, "inv_freq", None) is not None:
            if module.inv_freq.is_meta:
                inv_freq, scaling = module.rope_init_fn(module.config, torch.device("cpu"))
                module.register_buffer("inv_freq", inv_freq, persistent=False)
                module.original_inv_freq = inv_freq
                module.attention_scaling = scaling


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
            torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
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
        from . import _core

        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"HiggsLinear on CUDA takes float16 or bfloat16 activations, not {x.dtype}")
        x = x.contiguous()
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        workspace = torch.empty(x.shape[0], self.padded_in_features, dtype=torch.float32, device=x.device)
        _core.cuda_lut_linear(
            x.data_ptr(),
            out.data_ptr(),
            workspace.data_ptr(),
            x.shape[0],
            self.in_features,
            self.codes.data_ptr(),
            self.scales.data_ptr(),
            self.grid.data_ptr(),
            0 if self.signs is None else self.signs.data_ptr(),
            self.out_features,
            self.codes.shape[1],
            self.scales.shape[1],
            self.p,
            self.n,
            self.hadamard_size,
            self.group_size,
            "bf16" if x.dtype == torch.bfloat16 else "f16",
            torch.cuda.current_stream(x.device).cuda_stream,
            x.device.index or 0,
        )
        return out
