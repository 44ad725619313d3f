"""Dynamic HIGGS on SmolLM2-135M: perplexity against stored bits per weight.

Uniform HIGGS (p=2 n=64 and p=2 n=256, groups of 64, whole-row Hadamard) against dynamic
allocations (``higgs_rs.dynamic``: α's from noise injection, exact knapsack over 7 grids × 3 group
sizes) at several average budgets. Every configuration is written as a real checkpoint by
``quantize_checkpoint(..., overrides=...)``, read back with ``load_dequantized`` and evaluated on
WikiText-2 (first 32 windows × 512 tokens): the bits per weight are the checkpoint's own.

Writes ``benches/results/dynamic.{md,json,png}``.

    python benches/dynamic.py                     # CPU, about 40 s per evaluation
    python benches/dynamic.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
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
    parser.add_argument("--with-2bit", action="store_true", help="also offer the 2-bit grids (extra rows)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import higgs_rs
    import torch
    from higgs_rs import models
    from higgs_rs.dynamic import (
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
    from transformers import AutoTokenizer

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
    options = default_options(include_2bit=args.with_2bit)
    table = measure_errors(model_dir, options, names=names, progress=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = tokenize_windows(tokenizer, load_text(), args.seq_len, args.windows)
    base = perplexity(load_plain(model_dir).to(args.device), tokens)
    print(f"bf16 perplexity {base:.3f}", flush=True)

    plans = []
    for option, label in (
        (Option(2, 64, 64), "uniform HIGGS p=2 n=64 (3 bits)"),
        (Option(2, 256, 64), "uniform HIGGS p=2 n=256 (4 bits)"),
    ):
        if option in table.options:
            plans.append((label, "uniform", uniform_allocation(table, sens.alphas, option)))
    for budget in (float(b) for b in args.budgets.split(",")):
        name = f"dynamic HIGGS, budget {budget:g}" + (" (2-bit grids offered)" if args.with_2bit else "")
        t0 = time.perf_counter()
        allocation = allocate(table, sens.alphas, bits_per_weight=budget)
        print(f"{name}: allocated in {time.perf_counter() - t0:.2f} s; {allocation.describe()}", flush=True)
        plans.append((name, "dynamic", allocation))

    rows = []
    with tempfile.TemporaryDirectory(prefix="higgs-dynamic-") as tmp:
        for i, (name, kind, allocation) in enumerate(plans):
            dst = Path(tmp) / f"q{i}"
            first = next(iter(allocation.choices.values()))
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
            counts: dict[str, int] = {}
            for o in allocation.choices.values():
                counts[o.label] = counts.get(o.label, 0) + 1
            row = {
                "method": name,
                "kind": kind,
                "bits_per_weight": summary["bits_per_weight"],
                "allocated_bits_per_weight": allocation.bits_per_weight,
                "predicted_perplexity": allocation.predicted_perplexity(base),
                "perplexity": ppl,
                "exact": allocation.exact,
                "quantize_seconds": seconds,
                "options": counts,
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
        f"{settings['draws']} antithetic draw(s).",
        "",
        "| method | bits/weight | perplexity | predicted (linearity) | layers per option |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        spread = ", ".join(f"{k} {v}" for k, v in sorted(r["options"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.2f} | "
            f"{r['predicted_perplexity']:.2f} | {spread} |"
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

    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    dyn = sorted((r for r in rows if r["kind"] == "dynamic"), key=lambda r: r["bits_per_weight"])
    uni = [r for r in rows if r["kind"] == "uniform"]
    ax.plot(
        [r["bits_per_weight"] for r in dyn],
        [r["perplexity"] for r in dyn],
        "o-",
        color="tab:blue",
        label="dynamic HIGGS (measured)",
    )
    ax.plot(
        [r["bits_per_weight"] for r in dyn],
        [r["predicted_perplexity"] for r in dyn],
        "x:",
        color="tab:blue",
        alpha=0.6,
        label="dynamic HIGGS (predicted)",
    )
    ax.plot(
        [r["bits_per_weight"] for r in uni],
        [r["perplexity"] for r in uni],
        "s",
        color="tab:orange",
        label="uniform HIGGS p=2, g64",
    )
    for name, bits, ppl in ANCHORS:
        ax.plot(bits, ppl, "^", color="gray")
        ax.annotate(
            name.replace("llama.cpp ", ""), (bits, ppl), fontsize=7, xytext=(4, 2), textcoords="offset points"
        )
    ax.axhline(base, color="k", lw=0.8, ls="--", label=f"bf16 ({base:.2f})")
    ax.set_xlabel("stored bits per weight (quantized layers)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("SmolLM2-135M: dynamic vs uniform HIGGS")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
