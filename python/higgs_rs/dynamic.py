"""Dynamic HIGGS: per-layer bit widths from the linearity theorem.

The rise in loss of a quantized model is close to Σ_l α_l·t_l², with t_l² = ‖Ŵ_l − W_l‖² / ‖W_l‖²
the relative error of layer l and α_l its sensitivity (ARCHITECTURE.md). This module

1. measures α_l without task data (``measure_sensitivities``): Gaussian noise of relative size t²
   goes into one linear layer at a time, and the change of the mean next-token loss on a short
   text gives α_l = Δloss / t². Each noise draw is used twice, +ε and −ε, which cancels the
   first-order term of the loss change and leaves the second-order one the theorem is about.
   Only the blocks from the noised one on are rerun (their input is cached). Cached as JSON;
2. measures t_l² and the stored bits of every layer under every option by quantizing it
   (``measure_errors``; cached);
3. times every option with the CPU LUT kernel, for the latency budget (``measure_latencies``);
4. picks one option per layer minimizing Σ α_l·t_l² under an average bits-per-weight budget
   and/or a latency budget (``allocate``: the exact knapsack dynamic program of ``_core``);
5. hands ``quantize_checkpoint`` the ``overrides`` it takes (``Allocation.overrides``).

``plan_dynamic`` runs all of it for a checkpoint directory; ``higgs-rs quantize --dynamic`` calls it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import _core, quantize_tensor

PathLike = str | os.PathLike[str]

#: Relative noise power injected to measure α (about the error of a 4-bit HIGGS grid).
DEFAULT_NOISE = 0.01
#: Format version of the cached JSON files (bump when what they hold changes meaning).
CACHE_VERSION = 1
#: Latency costs are counted in units of this many seconds (10 ns) in the knapsack.
LATENCY_UNIT_S = 1e-8


@dataclass(frozen=True)
class Option:
    """One way to quantize a layer: grid (p, n), scale group size, Hadamard order (None: whole rows)."""

    p: int
    n: int
    group_size: int = 64
    hadamard_size: int | None = None

    @property
    def code_bits(self) -> float:
        """Code bits per weight, before scales: log2(n) / p."""
        return math.log2(self.n) / self.p

    @property
    def label(self) -> str:
        h = "" if self.hadamard_size is None else f"h{self.hadamard_size}"
        return f"p{self.p}n{self.n}g{self.group_size}{h}"

    def override(self) -> tuple[float, int, int | None, int]:
        """The ``(bits, p, hadamard_size, group_size)`` tuple ``quantize_checkpoint(overrides=...)`` takes."""
        return (self.code_bits, self.p, self.hadamard_size, self.group_size)


#: Grids offered by default: 3, 3, 3.25, 4, 4, 5, 6, 8 code bits (those of this build that load).
DEFAULT_GRIDS: tuple[tuple[int, int], ...] = (
    (2, 64),
    (4, 4096),
    (4, 8192),
    (3, 4096),
    (2, 256),
    (2, 1024),
    (1, 64),
    (1, 256),
)
#: 2-bit grids, offered on request: the linearity theorem is weakest there.
LOW_BIT_GRIDS: tuple[tuple[int, int], ...] = ((2, 16), (3, 64), (4, 256))
DEFAULT_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)


def usable_grids() -> list[tuple[int, int]]:
    """The grids of this build that load (a build made while a grid file was still being generated
    lists it but cannot use it)."""
    usable = []
    for p, n in _core.available_grids():
        try:
            _core.grid_points(p, n)
        except ValueError:
            continue
        usable.append((p, n))
    return usable


def default_options(
    include_2bit: bool = False,
    group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
    grids: Sequence[tuple[int, int]] | None = None,
) -> list[Option]:
    """Every (grid, group size) pair among the shipped grids: the choices each layer gets."""
    shipped = set(usable_grids())
    wanted = (
        list(grids)
        if grids is not None
        else list(DEFAULT_GRIDS) + (list(LOW_BIT_GRIDS) if include_2bit else [])
    )
    missing = [g for g in wanted if g not in shipped]
    if grids is not None and missing:
        raise ValueError(f"grids {missing} are not shipped with this build; available: {sorted(shipped)}")
    return [Option(p, n, g) for (p, n) in wanted if (p, n) in shipped for g in group_sizes]


# ---------------------------------------------------------------------------------------------
# Caching


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


_FILE_DIGESTS: dict[tuple[str, int, int], bytes] = {}


def model_fingerprint(model_dir: PathLike) -> str:
    """A content hash of a checkpoint directory (config.json and every .safetensors file).

    Each file's hash is remembered for this process by path, size and modification time."""
    root = Path(model_dir).resolve()
    digest = hashlib.sha256()
    files = sorted(root.glob("*.safetensors")) + [root / "config.json"]
    for file in files:
        if not file.is_file():
            continue
        stat = file.stat()
        key = (str(file), stat.st_size, stat.st_mtime_ns)
        if key not in _FILE_DIGESTS:
            with file.open("rb") as handle:
                _FILE_DIGESTS[key] = hashlib.file_digest(handle, "sha256").digest()
        digest.update(file.name.encode() + b"\0" + _FILE_DIGESTS[key])
    return digest.hexdigest()[:24]


def _cache_file(kind: str, key: Mapping[str, Any]) -> Path:
    from .models import cache_dir

    return cache_dir() / "dynamic" / f"{kind}-{_digest(key)[:20]}.json"


def _read_cache(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("key") == json.loads(json.dumps(key, default=str)) else None


def _write_cache(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    staging.replace(path)


# ---------------------------------------------------------------------------------------------
# Which tensors the pipeline quantizes


def quantized_weights(model_dir: PathLike, skip: Sequence[str] = ()) -> dict[str, tuple[int, int]]:
    """Names and shapes (rows, cols) of the tensors ``quantize_checkpoint`` would quantize."""
    from .checkpoint import quantize_checkpoint

    plan = quantize_checkpoint(model_dir, None, bits=4, p=2, skip=skip, dry_run=True, progress=False)["plan"]
    shapes: dict[str, tuple[int, int]] = {}
    for line in plan.splitlines():
        match = re.match(r"^(\S+)\s+\S+\s+\[(\d+),\s*(\d+)\]\s+HIGGS p=", line)
        if match:
            shapes[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    if not shapes:
        raise ValueError(f"{model_dir}: no tensor to quantize (the plan lists none)")
    return shapes


# ---------------------------------------------------------------------------------------------
# 1. Sensitivities α_l


@dataclass
class Sensitivities:
    """α_l = Δloss / t² of every quantized layer, and how they were measured."""

    alphas: dict[str, float]
    #: Standard error of each α over noise draws (NaN with one draw).
    stderr: dict[str, float]
    base_loss: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    #: α of each antithetic draw (the first ``k`` draws are what ``draws=k`` would give).
    per_draw: dict[str, list[float]] = field(default_factory=dict)


def _calibration_tokens(tokenizer: Any, text: str, seq_len: int, windows: int) -> Any:
    """The last ``windows`` windows of the text: evaluation (``eval.tokenize_windows``) reads the
    first ones, so on WikiText-2 the α's never see the tokens perplexity is measured on."""
    from .eval import tokenize_windows

    every = tokenize_windows(tokenizer, text, seq_len, 1 << 62)
    return every[-windows:]


def _block_index(name: str, blocks_prefix: str) -> int | None:
    match = re.match(re.escape(blocks_prefix) + r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


class _SuffixRunner:
    """The mean next-token loss of a causal LM, rerunning only the blocks from ``b`` on.

    The hidden state entering each block is cached from one clean forward pass; rerunning block
    ``b`` onwards means handing the model its blocks ``b:`` and that state as ``inputs_embeds``
    (rotary positions and the causal mask come out the same). Checked against a full forward
    pass when built; models where the check fails are run whole instead.
    """

    def __init__(self, model: Any, tokens: Any, batch_size: int) -> None:
        import torch

        self.model, self.tokens, self.batch_size = model, tokens, batch_size
        self.device = next(model.parameters()).device
        self.base_model = getattr(model, "model", None)
        layers = getattr(self.base_model, "layers", None)
        self.layers = layers if isinstance(layers, torch.nn.ModuleList) else None
        self.blocks_prefix = "model.layers"
        self.hidden: list[list[Any]] = []
        self.base_loss = self._full_loss(record=self.layers is not None)
        if self.layers is not None:
            middle = len(self.layers) // 2
            if not math.isclose(self.loss_from(middle), self.base_loss, rel_tol=1e-5, abs_tol=1e-6):
                self.layers, self.hidden = None, []

    def _nll(self, logits: Any, batch: Any) -> tuple[float, int]:
        import torch

        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        return float(nll), batch[:, 1:].numel()

    def _full_loss(self, record: bool = False) -> float:
        import torch

        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, self.tokens.shape[0], self.batch_size):
                batch = self.tokens[start : start + self.batch_size].to(self.device)
                out = self.model(batch, output_hidden_states=record, use_cache=False)
                if record:
                    # hidden_states[b] enters block b (the last entry is after the final norm).
                    self.hidden.append([h.detach() for h in out.hidden_states[: len(self.layers)]])
                nll, n = self._nll(out.logits, batch)
                total, count = total + nll, count + n
        return total / count

    def loss_from(self, block: int | None) -> float:
        """Mean NLL with the current weights, rerunning blocks ``block:`` (None: the whole model)."""
        import torch

        if self.layers is None or block is None:
            return self._full_loss()
        all_layers = self.layers
        total, count = 0.0, 0
        try:
            self.base_model.layers = torch.nn.ModuleList(list(all_layers)[block:])
            with torch.no_grad():
                for i, start in enumerate(range(0, self.tokens.shape[0], self.batch_size)):
                    batch = self.tokens[start : start + self.batch_size].to(self.device)
                    out = self.model(inputs_embeds=self.hidden[i][block], use_cache=False)
                    nll, n = self._nll(out.logits, batch)
                    total, count = total + nll, count + n
        finally:
            self.base_model.layers = all_layers
        return total / count


def measure_sensitivities(
    model_dir: PathLike,
    text: str | None = None,
    *,
    names: Iterable[str] | None = None,
    windows: int = 4,
    seq_len: int = 256,
    noise: float = DEFAULT_NOISE,
    draws: int = 1,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 4,
    cache: bool = True,
    progress: bool = False,
) -> Sensitivities:
    """α_l of every quantized layer (or of ``names``), from noise injected one layer at a time.

    Layer l's weight gets ``W + ε`` and ``W − ε``, with ε Gaussian and scaled per row to
    ``‖ε_row‖² = noise · ‖W_row‖²`` (HIGGS errors scale with each group's RMS the same way);
    α_l is the mean loss change over the ``draws`` pairs divided by the realized ‖ε‖²/‖W‖².
    The loss is the mean next-token NLL over the text's last ``windows × seq_len`` tokens
    (``text``: a string; None for WikiText-2). Costs ``2 · draws`` partial forward passes per
    layer; the result is cached under the model cache keyed by model, text and settings.
    """
    import torch
    from transformers import AutoTokenizer

    from .eval import load_text
    from .torch import load_plain

    text = load_text() if text is None else text
    all_names = sorted(quantized_weights(model_dir))
    selected = sorted(names) if names is not None else all_names
    unknown = sorted(set(selected) - set(all_names))
    if unknown:
        raise ValueError(f"{model_dir}: not quantized layers of this model: {unknown[:5]}")
    settings = {"windows": windows, "seq_len": seq_len, "noise": noise, "draws": draws, "seed": seed}
    key = {
        "version": CACHE_VERSION,
        "model": model_fingerprint(model_dir),
        "text": hashlib.sha256(text.encode()).hexdigest()[:24],
        "names": _digest(selected),
        **settings,
    }
    path = _cache_file("alphas", key)
    if cache and (hit := _read_cache(path, key)) is not None:
        return Sensitivities(
            hit["alphas"],
            hit["stderr"],
            hit["base_loss"],
            hit["seconds"],
            hit["settings"],
            hit.get("per_draw", {}),
        )

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = _calibration_tokens(tokenizer, text, seq_len, windows)
    model = load_plain(model_dir, dtype=torch.float32).to(device)
    runner = _SuffixRunner(model, tokens, batch_size)
    modules = dict(model.named_modules())
    alphas: dict[str, float] = {}
    stderr: dict[str, float] = {}
    per_draw: dict[str, list[float]] = {}
    iterator: Iterable[str] = selected
    if progress:
        from tqdm import tqdm

        iterator = tqdm(selected, desc="sensitivities", unit="layer")
    for index, name in enumerate(iterator):
        module_name = name.removesuffix(".weight")
        weight = modules[module_name].weight
        original = weight.detach().clone()
        w64 = original.double()
        row_rms = w64.pow(2).mean(dim=1, keepdim=True).sqrt()
        block = _block_index(name, runner.blocks_prefix)
        changes = []
        for draw in range(draws):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 101 + draw)
            z = torch.randn(original.shape, generator=generator, dtype=torch.float64)
            eps = (math.sqrt(noise) * row_rms.cpu() * z).to(device)
            realized = float(eps.pow(2).sum() / w64.pow(2).sum())
            pair = []
            with torch.no_grad():
                for sign in (1.0, -1.0):
                    weight.copy_((w64 + sign * eps).to(weight.dtype))
                    pair.append(runner.loss_from(block) - runner.base_loss)
                weight.copy_(original)
            changes.append(0.5 * (pair[0] + pair[1]) / realized)
        alphas[name] = sum(changes) / len(changes)
        per_draw[name] = changes
        if len(changes) > 1:
            mean = alphas[name]
            var = sum((c - mean) ** 2 for c in changes) / (len(changes) - 1)
            stderr[name] = math.sqrt(var / len(changes))
        else:
            stderr[name] = math.nan
    seconds = time.perf_counter() - start
    result = Sensitivities(
        alphas, stderr, runner.base_loss, seconds, {**settings, "device": device}, per_draw
    )
    if cache:
        _write_cache(path, {"key": key, **asdict(result)})
    return result


# ---------------------------------------------------------------------------------------------
# 2. Errors t² and stored bits of every option


@dataclass
class ErrorTable:
    """Relative MSE t² and stored bits of every layer under every option."""

    options: list[Option]
    shapes: dict[str, tuple[int, int]]
    #: relative_mse[name][k]: ‖Ŵ − W‖² / ‖W‖² of layer ``name`` quantized with ``options[k]``.
    relative_mse: dict[str, list[float]]
    #: stored_bits[name][k]: codes and scales as stored (``QuantSpec::layout``).
    stored_bits: dict[str, list[int]]
    seconds: float = 0.0


def _checkpoint_tensors(model_dir: PathLike) -> dict[str, Any]:
    """Name → an open safetensors handle holding it."""
    from safetensors import safe_open

    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    handles = [safe_open(str(root / f), framework="pt") for f in files]
    return {name: h for h in handles for name in h.keys()}


def measure_errors(
    model_dir: PathLike,
    options: Sequence[Option],
    *,
    names: Iterable[str] | None = None,
    seed: int | None = 0,
    sample_rows: int | None = 128,
    threads: int | None = None,
    cache: bool = True,
    progress: bool = False,
) -> ErrorTable:
    """Quantize every layer with every option (``seed``: the random signs, as in the checkpoint).

    t² is measured on ``sample_rows`` evenly spaced rows of each layer (None: all rows): rows are
    quantized independently, so the sample's relative MSE estimates the layer's (within about 2%
    on SmolLM2 with 128 rows) at a fraction of the cost, which matters for the slow p = 4 grids.
    The stored bits are exact (``QuantSpec::layout`` of the full shape).
    """
    import numpy as np
    import torch

    shapes = quantized_weights(model_dir)
    if names is not None:
        shapes = {n: shapes[n] for n in sorted(names)}
    key = {
        "version": CACHE_VERSION,
        "model": model_fingerprint(model_dir),
        "options": [asdict(o) for o in options],
        "names": _digest(sorted(shapes)),
        "seed": seed,
        "sample_rows": sample_rows,
    }
    path = _cache_file("errors", key)
    if cache and (hit := _read_cache(path, key)) is not None:
        return ErrorTable(
            [Option(**o) for o in hit["options"]],
            {k: (v[0], v[1]) for k, v in hit["shapes"].items()},
            hit["relative_mse"],
            hit["stored_bits"],
            hit["seconds"],
        )
    start = time.perf_counter()
    where = _checkpoint_tensors(model_dir)
    relative_mse: dict[str, list[float]] = {}
    stored: dict[str, list[int]] = {}
    iterator: Iterable[str] = list(shapes)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(list(shapes), desc="layer errors", unit="layer")
    for name in iterator:
        weight = where[name].get_tensor(name)
        rows, cols = shapes[name]
        if sample_rows is not None and sample_rows < rows:
            picked = np.linspace(0, rows - 1, sample_rows).round().astype(np.int64)
            weight = weight.index_select(0, torch.from_numpy(picked)).contiguous()
        relative_mse[name], stored[name] = [], []
        for o in options:
            q = quantize_tensor(
                weight,
                bits=o.code_bits,
                p=o.p,
                hadamard_size=o.hadamard_size,
                group_size=o.group_size,
                seed=seed,
                threads=threads,
            )
            relative_mse[name].append(q.relative_mse)
            stored[name].append(_core.stored_bits(rows, cols, o.p, o.n, o.hadamard_size, o.group_size))
    table = ErrorTable(list(options), shapes, relative_mse, stored, time.perf_counter() - start)
    if cache:
        _write_cache(path, {"key": key, **asdict(table)})
    return table


# ---------------------------------------------------------------------------------------------
# 3. Latencies


def measure_latencies(
    shapes: Iterable[tuple[int, int]],
    options: Sequence[Option],
    *,
    batch: int = 1,
    rounds: int = 6,
    repeats: int = 5,
    seed: int | None = 0,
    threads: int | None = None,
) -> dict[tuple[int, int], list[float]]:
    """Seconds one ``HiggsLinear`` forward pass takes on the CPU, per weight shape and option.

    The LUT kernel's time does not depend on the weights' values, so each shape is timed once on
    a Gaussian matrix. Each (shape, option) is timed ``repeats`` times in each of ``rounds``
    round-robin passes over all of them, and the fastest call counts: on shared cores a burst of
    other work then slows every option alike instead of one option's whole measurement.
    """
    import numpy as np
    import torch

    from .torch import HiggsLinear

    rng = np.random.default_rng(0)
    cases = []
    for rows, cols in sorted(set(shapes)):
        weights = rng.standard_normal((rows, cols), dtype=np.float32)
        x = torch.from_numpy(rng.standard_normal((batch, cols), dtype=np.float32))
        for o in options:
            q = quantize_tensor(
                weights,
                bits=o.code_bits,
                p=o.p,
                hadamard_size=o.hadamard_size,
                group_size=o.group_size,
                seed=seed,
                threads=threads,
            )
            cases.append(((rows, cols), HiggsLinear.from_quantized(q), x))
    best = [math.inf] * len(cases)
    with torch.no_grad():
        for _, layer, x in cases:
            layer(x)  # warm-up: first-call allocations and tables
        for _ in range(rounds):
            for i, (_, layer, x) in enumerate(cases):
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    layer(x)
                    best[i] = min(best[i], time.perf_counter() - t0)
    latencies: dict[tuple[int, int], list[float]] = {}
    for (shape, _, _), seconds in zip(cases, best, strict=True):
        latencies.setdefault(shape, []).append(seconds)
    return latencies


def parse_latency_budget(value: str) -> tuple[float, bool]:
    """``"0.9x"`` → (0.9, ratio); ``"4ms"``, ``"800us"``, ``"0.004s"``, ``"0.004"`` → (seconds, not ratio)."""
    text = value.strip().lower()
    units = {"x": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "s": 1.0}
    suffix = next((u for u in units if text.endswith(u)), "")
    try:
        amount = float(text[: len(text) - len(suffix)])
    except ValueError:
        raise ValueError(
            f"latency budget {value!r}: give seconds (0.004, 4ms, 800us) "
            "or a ratio to uniform 4-bit HIGGS (0.9x)"
        ) from None
    if not amount > 0:
        raise ValueError(f"latency budget {value!r} must be positive")
    return (amount, True) if suffix == "x" else (amount * units.get(suffix, 1.0), False)


# ---------------------------------------------------------------------------------------------
# 4. Allocation


@dataclass
class Allocation:
    """The option chosen for every layer, and what it is predicted to cost."""

    choices: dict[str, Option]
    #: Σ α_l t_l²: the predicted rise of the mean next-token loss (nats).
    predicted_loss_increase: float
    #: A lower bound on the best achievable Σ α t² (LP relaxation or Lagrangian dual).
    lower_bound: float
    #: Whether the choice is proven optimal for the given α's, t²'s and costs.
    exact: bool
    stored_bits: int
    weights: int
    #: Σ of the chosen options' CPU latencies (seconds), when latencies were given.
    latency: float | None = None

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.weights

    def overrides(self) -> dict[str, tuple[float, int, int | None, int]]:
        """``{weight name: (bits, p, hadamard_size, group_size)}`` for ``quantize_checkpoint``."""
        return {name: o.override() for name, o in self.choices.items()}

    def predicted_perplexity(self, base_perplexity: float) -> float:
        return base_perplexity * math.exp(self.predicted_loss_increase)

    def describe(self) -> str:
        counts = Counter(o.label for o in self.choices.values())
        spread = ", ".join(f"{label}: {count}" for label, count in sorted(counts.items()))
        latency = "" if self.latency is None else f", CPU latency {self.latency * 1e3:.3f} ms"
        return (
            f"dynamic allocation: {self.bits_per_weight:.4f} bits/weight{latency}, predicted loss +"
            f"{self.predicted_loss_increase:.5f} ({'optimal' if self.exact else 'not proven optimal'}; bound "
            f"{self.lower_bound:.5f}); layers per option: {spread}"
        )


def allocate(
    table: ErrorTable,
    alphas: Mapping[str, float],
    *,
    bits_per_weight: float | None = None,
    latency_budget: float | None = None,
    latencies: Mapping[tuple[int, int], Sequence[float]] | None = None,
    max_cells: int | None = None,
) -> Allocation:
    """One option per layer minimizing Σ α_l·t_l² with the average stored bits per weight at most
    ``bits_per_weight`` and/or Σ latency at most ``latency_budget`` seconds.

    Negative α's (noise in the measurement of a layer that barely matters) count as zero. The
    bits budget is solved exactly; with a latency budget too, the latency is handled by a
    Lagrange multiplier (``Allocation.exact`` says whether optimality is proven).
    """
    if bits_per_weight is None and latency_budget is None:
        raise ValueError("give a bits-per-weight budget, a latency budget, or both")
    if latency_budget is not None and latencies is None:
        raise ValueError("a latency budget needs the options' latencies (measure_latencies)")
    names = list(table.shapes)
    missing = [n for n in names if n not in alphas]
    if missing:
        raise ValueError(f"no sensitivity for {len(missing)} layers, e.g. {missing[:3]}")
    weights = sum(r * c for r, c in table.shapes.values())
    errors = [[max(alphas[n], 0.0) * t2 for t2 in table.relative_mse[n]] for n in names]
    bit_costs = [list(table.stored_bits[n]) for n in names]
    latency_costs = None
    if latencies is not None:
        latency_costs = [[round(s / LATENCY_UNIT_S) for s in latencies[table.shapes[n]]] for n in names]

    kwargs: dict[str, Any] = {} if max_cells is None else {"max_cells": max_cells}
    if bits_per_weight is not None:
        budget = math.floor(bits_per_weight * weights)
        if latency_budget is not None:
            kwargs.update(
                second_costs=latency_costs, second_budget=math.floor(latency_budget / LATENCY_UNIT_S)
            )
        result = _core.allocate(bit_costs, errors, budget, **kwargs)
    else:
        result = _core.allocate(latency_costs, errors, math.floor(latency_budget / LATENCY_UNIT_S), **kwargs)
    choices = {n: table.options[k] for n, k in zip(names, result["choices"], strict=True)}
    stored = sum(table.stored_bits[n][k] for n, k in zip(names, result["choices"], strict=True))
    latency = None
    if latencies is not None:
        latency = sum(latencies[table.shapes[n]][k] for n, k in zip(names, result["choices"], strict=True))
    return Allocation(
        choices=choices,
        predicted_loss_increase=result["error"],
        lower_bound=result["lower_bound"],
        exact=result["exact"],
        stored_bits=stored,
        weights=weights,
        latency=latency,
    )


def uniform_allocation(table: ErrorTable, alphas: Mapping[str, float], option: Option) -> Allocation:
    """Every layer on ``option`` (it must be in the table): the baseline dynamic allocation beats."""
    k = table.options.index(option)
    names = list(table.shapes)
    return Allocation(
        choices={n: option for n in names},
        predicted_loss_increase=sum(max(alphas[n], 0.0) * table.relative_mse[n][k] for n in names),
        lower_bound=math.nan,
        exact=False,
        stored_bits=sum(table.stored_bits[n][k] for n in names),
        weights=sum(r * c for r, c in table.shapes.values()),
    )


# ---------------------------------------------------------------------------------------------
# 5. The whole plan for a checkpoint


#: The uniform spec latency ratios refer to: HIGGS p=2 n=256 (4 bits), groups of 64, whole rows.
REFERENCE_OPTION = Option(2, 256, 64)


def plan_dynamic(
    model_dir: PathLike,
    *,
    bits_per_weight: float | None = None,
    latency_budget: str | float | None = None,
    text: str | None = None,
    options: Sequence[Option] | None = None,
    hadamard_size: int | None = None,
    seed: int | None = 0,
    skip: Sequence[str] = (),
    windows: int = 4,
    seq_len: int = 256,
    noise: float = DEFAULT_NOISE,
    draws: int = 1,
    device: str = "cpu",
    sample_rows: int | None = 128,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Allocation:
    """α's (cached), t²'s (cached), latencies (when a latency budget is given), then the allocation.

    ``latency_budget``: seconds, or a string ``parse_latency_budget`` reads ("4ms", "0.9x": a
    ratio to the CPU latency of every layer at ``REFERENCE_OPTION``). ``hadamard_size`` applies to
    the default options (None: whole rows).
    """
    say = log or (lambda _message: None)
    if options is None:
        options = [replace(o, hadamard_size=hadamard_size) for o in default_options()]
    options = list(options)
    names = sorted(quantized_weights(model_dir, skip))
    start = time.perf_counter()
    sens = measure_sensitivities(
        model_dir,
        text,
        names=names,
        windows=windows,
        seq_len=seq_len,
        noise=noise,
        draws=draws,
        device=device,
        progress=log is not None,
    )
    say(
        f"sensitivities of {len(names)} layers: {windows} x {seq_len} tokens, noise t2 = {noise:g}, "
        f"{draws} antithetic draw(s); measured in {sens.seconds:.1f} s "
        f"(now {time.perf_counter() - start:.1f} s, cached)"
    )
    start = time.perf_counter()
    table = measure_errors(
        model_dir,
        options,
        names=names,
        seed=seed,
        sample_rows=sample_rows,
        threads=threads,
        progress=log is not None,
    )
    say(
        f"relative errors of {len(options)} options per layer: {table.seconds:.1f} s "
        f"(now {time.perf_counter() - start:.1f} s, cached)"
    )
    latencies = None
    budget_seconds = None
    if latency_budget is not None:
        amount, is_ratio = (
            parse_latency_budget(latency_budget)
            if isinstance(latency_budget, str)
            else (float(latency_budget), False)
        )
        shapes = list(table.shapes.values())
        measure = list(options) + ([REFERENCE_OPTION] if REFERENCE_OPTION not in options else [])
        start = time.perf_counter()
        measured = measure_latencies(shapes, measure, threads=threads)
        latencies = {shape: values[: len(options)] for shape, values in measured.items()}
        reference = sum(measured[s][measure.index(REFERENCE_OPTION)] for s in shapes)
        budget_seconds = amount * reference if is_ratio else amount
        say(
            f"CPU latencies of {len(set(shapes))} shapes x {len(measure)} options: "
            f"{time.perf_counter() - start:.1f} s; uniform {REFERENCE_OPTION.label}: "
            f"{reference * 1e3:.3f} ms per token; budget {budget_seconds * 1e3:.3f} ms"
        )
    allocation = allocate(
        table,
        sens.alphas,
        bits_per_weight=bits_per_weight,
        latency_budget=budget_seconds,
        latencies=latencies,
    )
    say(allocation.describe())
    return allocation
