"""Dynamic HIGGS on SmolLM2-135M: perplexity against stored bits per weight (and CPU latency).

Uniform HIGGS (one grid for every layer, whole-row Hadamard) against dynamic allocations
(``higgs_rs.dynamic``: α's from noise injection, the exact knapsack over the default options) at
several average budgets; optionally also with the 2-bit grids offered, and under a CPU latency
budget (per-option latencies of the LUT kernel, measured on this machine or read from a file).
Every configuration is written as a real checkpoint by ``quantize_checkpoint(..., overrides=...)``,
read back with ``load_dequantized`` and evaluated on WikiText-2 (first 32 windows × 512 tokens):
the bits per weight are the checkpoint's own.

Writes ``benches/results/dynamic.{md,json,png}``.

    python benches/dynamic.py                                   # CPU, about 40 s per evaluation
    python benches/dynamic.py --device cuda --with-2bit --latencies benches/results/latency_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

#: Peers measured with the same evaluator (ARCHITECTURE.md, "Anchors measured here").
ANCHORS = [
    ("llama.cpp Q4_K_M", 5.7, 29.72),
    ("llama.cpp IQ4_NL", 4.5, 33.26),
    ("llama.cpp Q4_0", 4.5, 35.29),
    ("HQQ 4-bit g64", 4.5, 36.32),
    ("NF4 g64", 4.25, 36.52),
]


def load_or_measure_latencies(path: Path | None, table: object, options: list) -> dict | None:
    """Per-shape latencies of every option (seconds), from ``path`` or measured here (and saved)."""
    if path is None:
        return None
    from higgs_rs.dynamic import measure_latencies

    shapes = sorted(set(table.shapes.values()))  # type: ignore[attr-defined]
    if path.is_file():
        data = json.loads(path.read_text())
        by_label = {
            tuple(int(x) for x in key.split("x")): dict(zip(data["options"], values, strict=True))
            for key, values in data["shapes"].items()
        }
        missing = [o.label for o in options if o.label not in by_label[shapes[0]]]
        if missing:
            raise SystemExit(f"{path} has no latency for {missing}: measure again (delete the file)")
        print(f"latencies from {path} (measured on {data['machine']})", flush=True)
        return {s: [by_label[s][o.label] for o in options] for s in shapes}
    t0 = time.perf_counter()
    measured = measure_latencies(shapes, options)
    data = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "what": "best of 30 batch-1 HiggsLinear forward passes (CPU LUT kernel), seconds",
        "options": [o.label for o in options],
        "shapes": {f"{r}x{c}": v for (r, c), v in measured.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"measured latencies in {time.perf_counter() - t0:.1f} s; wrote {path}", flush=True)
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--budgets", default="3.25,3.5,3.75,4.25,4.5", help="average stored bits per weight")
    parser.add_argument("--alpha-windows", type=int, default=4)
    parser.add_argument("--alpha-seq-len", type=int, default=256)
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--with-2bit", action="store_true", help="extra rows with the 2-bit grids offered")
    parser.add_argument("--low-budgets", default="3.0,3.25,3.5", help="budgets of the 2-bit rows")
    parser.add_argument("--latencies", type=Path, default=None, help="latency JSON (read, or measured here)")
    parser.add_argument("--latency-rows", default="4.25:1.0,4.5:1.0,4.5:0.9", help="BITS:RATIO rows")
    parser.add_argument("--sample-rows", type=int, default=256, help="rows per layer for t² (0: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw table and plot from OUT/dynamic.json"
    )
    args = parser.parse_args(argv)
    args.sample_rows = args.sample_rows or None
    if args.plot_only:
        saved = json.loads((args.out / "dynamic.json").read_text())
        write_table(saved["rows"], saved["base_perplexity"], saved["alpha_settings"], args.out / "dynamic.md")
        plot(saved["rows"], saved["base_perplexity"], args.out / "dynamic.png")
        return 0

    import torch
    from transformers import AutoTokenizer

    import higgs_rs
    from higgs_rs import models
    from higgs_rs.dynamic import (
        REFERENCE_OPTION,
        Option,
        allocate,
        default_options,
        measure_errors,
        measure_sensitivities,
        quantized_weights,
        uniform_allocation,
    )
    from higgs_rs.eval import load_text, perplexity, tokenize_windows
    from higgs_rs.torch import load_dequantized, load_plain

    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = models.smollm2()
    names = sorted(quantized_weights(model_dir))
    sens = measure_sensitivities(
        model_dir,
        names=names,
        windows=args.alpha_windows,
        seq_len=args.alpha_seq_len,
        draws=args.draws,
        device=args.device,
        progress=True,
    )
    options = default_options()
    table = measure_errors(model_dir, options, names=names, sample_rows=args.sample_rows, progress=True)
    latencies = load_or_measure_latencies(args.latencies, table, options)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = tokenize_windows(tokenizer, load_text(), args.seq_len, args.windows)
    base = perplexity(load_plain(model_dir).to(args.device), tokens)
    print(f"bf16 perplexity {base:.3f}", flush=True)

    plans = []
    for p, n, g in ((2, 64, 64), (2, 64, 128), (4, 4096, 64), (4, 8192, 64), (2, 256, 64), (2, 256, 128)):
        option = Option(p, n, g)
        if option in table.options:
            label = f"uniform HIGGS p={p} n={n} g{g} ({option.code_bits:g} code bits)"
            plans.append((label, "uniform", uniform_allocation(table, sens.alphas, option)))

    def add(name: str, kind: str, tab: object, **budget: object) -> None:
        t0 = time.perf_counter()
        allocation = allocate(tab, sens.alphas, latencies=latencies if tab is table else None, **budget)
        print(f"{name}: allocated in {time.perf_counter() - t0:.2f} s; {allocation.describe()}", flush=True)
        plans.append((name, kind, allocation))

    for budget in (float(b) for b in args.budgets.split(",")):
        add(f"dynamic HIGGS, {budget:g} bits", "dynamic", table, bits_per_weight=budget)
    if args.with_2bit:
        table2 = measure_errors(
            model_dir,
            default_options(include_2bit=True),
            names=names,
            sample_rows=args.sample_rows,
            progress=True,
        )
        for budget in (float(b) for b in args.low_budgets.split(",")):
            add(
                f"dynamic HIGGS, {budget:g} bits, 2-bit grids offered",
                "dynamic, 2-bit offered",
                table2,
                bits_per_weight=budget,
            )
    reference = None
    if latencies is not None:
        k = table.options.index(REFERENCE_OPTION)
        reference = sum(latencies[table.shapes[n]][k] for n in names)
        for row in args.latency_rows.split(","):
            bits, ratio = (float(x) for x in row.split(":"))
            add(
                f"dynamic HIGGS, {bits:g} bits, CPU latency <= {ratio:g}x uniform 4-bit",
                "dynamic + latency",
                table,
                bits_per_weight=bits,
                latency_budget=ratio * reference,
            )

    rows = []
    with tempfile.TemporaryDirectory(prefix="higgs-dynamic-") as tmp:
        for i, (name, kind, allocation) in enumerate(plans):
            dst = Path(tmp) / f"q{i}"
            first = Counter(allocation.choices.values()).most_common(1)[0][0]
            t0 = time.perf_counter()
            summary = higgs_rs.quantize_checkpoint(
                model_dir,
                dst,
                bits=first.code_bits,
                p=first.p,
                group_size=first.group_size,
                overrides=allocation.overrides(),
                progress=False,
            )
            seconds = time.perf_counter() - t0
            model = load_dequantized(dst).to(args.device)
            ppl = perplexity(model, tokens)
            del model
            latency = None
            if latencies is not None:
                latency = (
                    sum(
                        latencies[table.shapes[n]][table.options.index(o)]
                        for n, o in allocation.choices.items()
                    )
                    if all(o in table.options for o in allocation.choices.values())
                    else None
                )
            row = {
                "method": name,
                "kind": kind,
                "bits_per_weight": summary["bits_per_weight"],
                "allocated_bits_per_weight": allocation.bits_per_weight,
                "predicted_perplexity": allocation.predicted_perplexity(base),
                "perplexity": ppl,
                "exact": allocation.exact,
                "cpu_latency_ms": None if latency is None else latency * 1e3,
                "quantize_seconds": seconds,
                "options": dict(Counter(o.label for o in allocation.choices.values())),
            }
            rows.append(row)
            print(
                f"{name}: {row['bits_per_weight']:.4f} bits/w, ppl {ppl:.3f} "
                f"(predicted {row['predicted_perplexity']:.2f})",
                flush=True,
            )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dynamic.json").write_text(
        json.dumps(
            {
                "base_perplexity": base,
                "alpha_settings": sens.settings,
                "alpha_seconds": sens.seconds,
                "device": args.device,
                "reference_cpu_latency_ms": None if reference is None else reference * 1e3,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    write_table(rows, base, sens.settings, args.out / "dynamic.md")
    plot(rows, base, args.out / "dynamic.png")
    return 0


def write_table(rows: list[dict], base: float, settings: dict, path: Path) -> None:
    lines = [
        "SmolLM2-135M-Instruct, WikiText-2 (first 32 windows x 512 tokens), all 210 linear layers of the",
        "blocks quantized, embeddings kept. Bits per weight as stored in the checkpoint (codes and f16",
        f"scales). bf16: {base:.2f}. α's: noise t² = {settings['noise']}, {settings['windows']} x "
        f"{settings['seq_len']} calibration tokens from the end of WikiText-2, "
        f"{settings['draws']} antithetic draw(s). CPU latency: Σ over the 210 layers of one batch-1",
        "HiggsLinear forward pass (LUT kernel, 2 shared cores; fastest of 6 round-robin rounds x 5 calls).",
        "",
        "| method | bits/weight | perplexity | predicted (linearity) | CPU ms/token | layers per option |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["kind"] != "uniform", r["kind"], r["bits_per_weight"])):
        spread = ", ".join(f"{k} {v}" for k, v in sorted(r["options"].items(), key=lambda kv: -kv[1]))
        latency = "" if r["cpu_latency_ms"] is None else f"{r['cpu_latency_ms']:.1f}"
        lines.append(
            f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.2f} | "
            f"{r['predicted_perplexity']:.2f} | {latency} | {spread} |"
        )
    lines += [
        "",
        "Peers with the same evaluator (ARCHITECTURE.md): "
        + "; ".join(f"{n} {b} bits {p}" for n, b, p in ANCHORS)
        + ".",
    ]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def plot(rows: list[dict], base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    styles = {
        "dynamic": ("o-", "tab:blue"),
        "dynamic, 2-bit offered": ("d--", "tab:purple"),
        "dynamic + latency": ("v", "tab:green"),
    }
    for kind, (style, color) in styles.items():
        sel = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["bits_per_weight"])
        if sel:
            ax.plot(
                [r["bits_per_weight"] for r in sel],
                [r["perplexity"] for r in sel],
                style,
                color=color,
                label=f"{kind} (measured)",
            )
    dyn = sorted((r for r in rows if r["kind"] == "dynamic"), key=lambda r: r["bits_per_weight"])
    ax.plot(
        [r["bits_per_weight"] for r in dyn],
        [r["predicted_perplexity"] for r in dyn],
        "x:",
        color="tab:blue",
        alpha=0.6,
        label="dynamic (predicted)",
    )
    uni = [r for r in rows if r["kind"] == "uniform"]
    ax.plot(
        [r["bits_per_weight"] for r in uni],
        [r["perplexity"] for r in uni],
        "s",
        color="tab:orange",
        label="uniform HIGGS",
    )
    for name, bits, ppl in ANCHORS:
        ax.plot(bits, ppl, "^", color="gray")
        ax.annotate(
            name.replace("llama.cpp ", ""), (bits, ppl), fontsize=7, xytext=(4, 2), textcoords="offset points"
        )
    ax.axhline(base, color="k", lw=0.8, ls="--", label=f"bf16 ({base:.2f})")
    ax.set_xlabel("stored bits per weight (quantized layers)")
    ax.set_ylabel("WikiText-2 perplexity")
    top = min(60.0, max(r["perplexity"] for r in rows) + 2)
    ax.set_ylim(base - 1, top)
    off = [r for r in rows if r["perplexity"] > top]
    if off:
        ax.text(
            0.02,
            0.98,
            "off the chart:\n"
            + "\n".join(
                f"{r['method'].replace('uniform HIGGS ', 'uniform ')}: {r['bits_per_weight']:.2f} b, "
                f"ppl {r['perplexity']:.1f}"
                for r in off
            ),
            transform=ax.transAxes,
            fontsize=6,
            va="top",
            color="dimgray",
        )
    ax.set_title("SmolLM2-135M: dynamic vs uniform HIGGS")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
