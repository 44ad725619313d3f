"""The ``higgs-rs`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time

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
        q = higgs_rs.quantize_tensor(weights, bits=bits, p=p, group_size=args.group_size, threads=args.threads)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="higgs-rs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("selfcheck", help="quantize a Gaussian matrix: error, speed, SIMD path")
    check.add_argument("--rows", type=int, default=4096)
    check.add_argument("--cols", type=int, default=4096)
    check.add_argument("--group-size", type=int, default=64)
    check.add_argument("--threads", type=int, default=None)
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=_selfcheck)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, OSError, NotImplementedError) as err:
        print(f"higgs-rs {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
