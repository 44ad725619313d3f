"""Whole checkpoints: quantize a Hugging Face safetensors model, read a HIGGS checkpoint back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _core, grid_size

PathLike = str | os.PathLike[str]


def quantize_checkpoint(
    src: PathLike,
    dst: PathLike | None,
    bits: float = 4,
    p: int = 2,
    hadamard_size: int | None = None,
    group_size: int = 64,
    seed: int | None = 0,
    skip: Sequence[str] = (),
    overrides: Mapping[str, tuple[float, int, int | None, int]] | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    max_shard_size: int = 5_000_000_000,
    scale_search: str = "fast",
) -> dict[str, Any]:
    """Quantize every linear weight of a safetensors checkpoint with HIGGS.

    Embeddings, norms, biases and ``lm_head`` are copied bit-exact (so are tensors whose name
    contains one of ``skip``). ``overrides`` maps weight names to ``(bits, p, hadamard_size,
    group_size)`` for mixed widths. Output shards, tokenizer files and ``config.json`` (with
    ``quantization_config``, written last) go to ``dst``; temporary names until complete.
    Returns a summary (``plan`` text, sizes, bits per weight, seconds, per-tensor relative MSE).
    ``scale_search`` ("fast", "full", "rms") picks how each group's scale is chosen, as in
    ``quantize_tensor``.
    """
    raw_overrides = {
        name: (op, grid_size(ob, op), oh, og) for name, (ob, op, oh, og) in (overrides or {}).items()
    }
    return _core.quantize_checkpoint(
        os.fspath(src),
        None if dst is None else os.fspath(dst),
        p=p,
        n=grid_size(bits, p),
        hadamard_size=hadamard_size,
        group_size=group_size,
        seed=seed,
        skip=list(skip),
        overrides=raw_overrides,
        threads=threads,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress,
        max_shard_bytes=max_shard_size,
        scale_search=scale_search,
    )


@dataclass(frozen=True)
class ModuleSpec:
    """How one linear module was quantized (an entry of ``quantization_config["modules"]``)."""

    name: str
    p: int
    n: int
    hadamard_size: int
    group_size: int
    in_features: int
    out_features: int
    padded_in_features: int
    grid: str


class HiggsCheckpoint:
    """A HIGGS checkpoint directory opened for reading (needs torch; safetensors memory-maps it)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{self.path} has no config.json: not a model directory, or an unfinished output"
            )
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        qc = self.config.get("quantization_config") or {}
        if qc.get("quant_method") != "higgs_rs":
            raise _core.HiggsFormatError(f"{config_path}: quantization_config.quant_method is not 'higgs_rs'")
        if qc.get("format_version") != 1:
            raise _core.HiggsFormatError(
                f"{config_path}: HIGGS format version {qc.get('format_version')!r}; this package reads 1"
            )
        self.quantization_config: dict[str, Any] = qc
        self.seed: int | None = qc.get("seed")
        self.modules: dict[str, ModuleSpec] = {
            name: ModuleSpec(
                name=name,
                **{k: spec[k] for k in ModuleSpec.__dataclass_fields__ if k != "name"},
            )
            for name, spec in qc.get("modules", {}).items()
        }
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        self._files = [_MappedSafetensors(self.path / f) for f in files]
        self._where = {name: f for f in self._files for name in f.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> Any:
        """One stored tensor, as a torch CPU tensor viewing the memory-mapped file (no copy; pages
        are read on first use and writes stay private)."""
        if name not in self._where:
            raise _core.HiggsFormatError(f"{self.path}: tensor {name!r} is missing")
        return self._where[name].get_tensor(name)

    def quantized(self, module: str) -> _core.QuantizedTensor:
        spec = self.modules[module]
        return _core.QuantizedTensor.from_parts(
            self.get(f"{module}.higgs_codes").numpy(),
            self.get(f"{module}.higgs_scales").numpy(),
            spec.in_features,
            spec.p,
            spec.n,
            spec.hadamard_size,
            spec.group_size,
            self.seed,
        )

    def plain_tensors(self) -> Iterator[str]:
        """Names of the tensors copied as they were (not HIGGS parts, grids or signs)."""
        for name in self._where:
            if not name.startswith("higgs.") and not name.endswith((".higgs_codes", ".higgs_scales")):
                yield name


# safetensors dtype names → torch dtypes (names as the format specifies them).
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}


class _MappedSafetensors:
    """One safetensors file mapped copy-on-write; tensors are zero-copy views into the mapping.

    ``safe_open(...).get_tensor`` copies every tensor out of its own mapping, so loading held
    each tensor twice (the copy and the touched file pages): peak RSS ~2× the checkpoint. Views
    keep it at ~1× (file pages, shared with the page cache). A tensor whose offset is not
    aligned to its element size is copied instead (the kernels read aligned slices).
    """

    def __init__(self, path: Path) -> None:
        import mmap

        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _core.HiggsFormatError(f"{path}: {size} bytes, too short for a safetensors header")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        header_len = int.from_bytes(self._map[:8], "little")
        if header_len > size - 8:
            raise _core.HiggsFormatError(f"{path}: header of {header_len} bytes runs past the file end")
        try:
            header = json.loads(bytes(self._map[8 : 8 + header_len]))
        except ValueError as e:
            raise _core.HiggsFormatError(f"{path}: the header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise _core.HiggsFormatError(f"{path}: the header is not a JSON object")
        header.pop("__metadata__", None)
        self._base = 8 + header_len
        self._data_len = size - self._base
        self._entries: dict[str, dict[str, Any]] = header

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, name: str) -> Any:
        import torch

        entry = self._entries[name]
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype = getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
            shape = [int(d) for d in entry["shape"]]
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise _core.HiggsFormatError(f"{where}: malformed header entry {entry!r}") from e
        itemsize = torch.empty(0, dtype=dtype).element_size()
        count = 1
        for d in shape:
            if d < 0:
                raise _core.HiggsFormatError(f"{where}: negative dimension in shape {shape}")
            count *= d
        if not 0 <= start <= end <= self._data_len or end - start != count * itemsize:
            raise _core.HiggsFormatError(
                f"{where}: data offsets [{start}, {end}) do not hold {shape} {entry['dtype']} "
                f"values inside the {self._data_len}-byte data section"
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self._base + start
        tensor = torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset).view(shape)
        return tensor if offset % itemsize == 0 else tensor.clone()
