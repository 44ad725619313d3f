"""Quantization speed, side by side in one run: higgs_rs.quantize_tensor vs llama.cpp's own quantizer.

Times one 4096×4096 bf16-valued matrix (16.8 M weights) with HIGGS (p=1, 2, 3, 4 grids; for p=2 and
p=4 each scale search: "fast", the default; "full"; "rms") and with ``ggml_quantize_chunk`` from the
library llama-cpp-python builds (Q4_0, Q4_K, IQ4_NL), one thread each (rayon pinned to 1; ggml's
quantize is single-threaded), best of ``--repeat`` runs, plus a plain f32 memcpy of the same matrix.
Prints M weights/s and ratios. ``--clock cpu`` (the default) times the process's CPU time, which stays
meaningful on a machine shared with other jobs (every timed call runs on one thread); ``--clock wall``
the wall clock.

    python benches/quantize_speed.py [--repeat 3] [--threads 1] [--clock cpu|wall] [--only TEXT]

``--only p=4`` times only the rows whose name contains the text (and skips the peers unless it
matches them), for quick A/B runs of one grid.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np

import higgs_rs

CLOCK: Callable[[], float] = time.process_time


def best_of(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = CLOCK()
        run()
        times.append(CLOCK() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--only", default="", help="time only the rows whose name contains this")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    rng = np.random.default_rng(0)
    import torch

    w_bf16 = torch.from_numpy(rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02).to(
        torch.bfloat16
    )
    w32 = w_bf16.float().numpy()
    count = w32.size
    results: list[tuple[str, float]] = []

    copy_target = np.empty_like(w32)
    results.append(("f32 memcpy", best_of(args.repeat, lambda: np.copyto(copy_target, w32))))
    for name, bits, p, search in [
        ("HIGGS p=2 n=256", 4, 2, "fast"),
        ("HIGGS p=2 n=256", 4, 2, "full"),
        ("HIGGS p=2 n=256", 4, 2, "rms"),
        ("HIGGS p=1 n=16", 4, 1, "fast"),
        ("HIGGS p=3 n=4096", 4, 3, "fast"),
        ("HIGGS p=4 n=8192", 3.25, 4, "fast"),
        ("HIGGS p=4 n=8192", 3.25, 4, "full"),
        ("HIGGS p=4 n=8192", 3.25, 4, "rms"),
        ("HIGGS p=4 n=4096", 3, 4, "fast"),
    ]:
        if args.only not in f"{name} {search}":
            continue
        higgs_rs.quantize_tensor(w_bf16[:64], bits=bits, p=p)  # build grid tables outside the timing
        seconds = best_of(
            args.repeat,
            lambda b=bits, q=p, s=search: higgs_rs.quantize_tensor(
                w_bf16, bits=b, p=q, threads=args.threads, scale_search=s
            ),
        )
        results.append((f"{name} {search} ({args.threads} thread)", seconds))

    try:
        if args.only not in "llama.cpp Q4_0 Q4_K IQ4_NL":
            raise RuntimeError(f"not selected by --only {args.only!r}")
        import peers

        lib = peers.ggml_library()
        for type_name in ("Q4_0", "Q4_K", "IQ4_NL"):
            type_id = peers.GGML_TYPES[type_name]
            lib.ggml_quantize_init(type_id)
            block, block_bytes = peers.ggml_block(type_name)
            dst = np.zeros(args.rows * (args.cols // block) * block_bytes, dtype=np.uint8)

            def run(t: int = type_id, d: np.ndarray = dst) -> None:
                lib.ggml_quantize_chunk(t, w32.ctypes.data, d.ctypes.data, 0, args.rows, args.cols, None)

            results.append((f"llama.cpp {type_name} (1 thread)", best_of(args.repeat, run)))
    except Exception as err:  # noqa: BLE001 - a missing peer is reported, not fatal
        print(f"llama.cpp peer skipped: {err}")

    q4_0 = dict(results).get("llama.cpp Q4_0 (1 thread)")
    q4_k = dict(results).get("llama.cpp Q4_K (1 thread)")
    print(
        f"{platform.processor() or platform.machine()}, {args.rows}x{args.cols}, best of {args.repeat}, "
        f"{args.clock} time"
    )
    print(f"{'method':<34} {'M weights/s':>12} {'vs Q4_0':>8} {'vs Q4_K':>8}")
    for name, seconds in results:
        rate = count / seconds / 1e6
        ratio_0 = f"{q4_0 / seconds:8.2f}" if q4_0 else "       -"
        ratio_k = f"{q4_k / seconds:8.2f}" if q4_k else "       -"
        print(f"{name:<34} {rate:12.1f} {ratio_0} {ratio_k}")


if __name__ == "__main__":
    main()
