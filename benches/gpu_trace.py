"""Where the time of a `lut_gemv_plain` launch goes: per-block phase timestamps (%globaltimer) of the
launches of one graph-replayed decode step of the Llama-3-8B-shaped model of `gpu_bench.py`.

The kernels are compiled with the define LUT_TRACE (set here, before higgs_rs is imported): thread 0
of each block records the time at its start, after the table build, after the first item's code
loads are issued, after the wait for the kernel before (the Hadamard), after the first super-step,
after the main loop and after the split-K tail, and prints them at exit. Printing slows the step
(the kernels' own phases are unaffected, but launches no longer overlap their predecessors).

    python benches/gpu_trace.py [--layers 4]

Prints, per launch in step order: its rows, global splits and blocks, then for each phase the
median / max over blocks in µs since the launch's first block started, and the launch's span."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable

os.environ["HIGGS_CUDA_DEFINES"] = ",".join(
    d for d in (os.environ.get("HIGGS_CUDA_DEFINES", ""), "LUT_TRACE=1") if d
)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from gpu_bench import DEVICE, TinyLlama, quantize_blocks, warm_and_capture  # noqa: E402

PHASES = ["table", "loads issued", "waited", "first step", "loop", "tail"]


def device_output(run: Callable[[], None]) -> str:
    """What `run` and its kernels print (fd 1 redirected to a file around it)."""
    import ctypes

    libc = ctypes.CDLL(None)
    torch.cuda.synchronize()
    libc.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 1)
        try:
            run()
            torch.cuda.synchronize()
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read()


def launches(text: str) -> list[list[tuple[int, int, int, list[int]]]]:
    """Trace records grouped into launches: (rows, splits, grid, timestamps) by start time."""
    records = []
    for line in text.splitlines():
        fields = line.split()
        if fields[:1] == ["LT"]:
            rows, splits, grid = int(fields[1]), int(fields[2]), int(fields[3])
            records.append((rows, splits, grid, [int(v) for v in fields[6:13]]))
    records.sort(key=lambda r: r[3][0])
    groups: list[list[tuple[int, int, int, list[int]]]] = []
    for record in records:
        # A launch's blocks all print (one wave): a new launch starts after `grid` records.
        if not groups or len(groups[-1]) == groups[-1][0][2]:
            groups.append([])
        groups[-1].append(record)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    with torch.device(DEVICE):
        model = TinyLlama(args.layers, 32000, 128, False).half().eval()
    quantize_blocks(model)
    token = torch.zeros(1, dtype=torch.long, device=DEVICE)
    pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
    mask = torch.zeros(1, 1, 1, 128, dtype=torch.float16, device=DEVICE)
    mask[..., 1:] = float("-inf")
    graph = torch.cuda.CUDAGraph()

    def warm() -> None:
        warm_and_capture(model, (token, pos, mask), graph)
        graph.replay()

    with torch.no_grad():
        device_output(warm)
        text = device_output(graph.replay)
    print("rows splits blocks | µs since the launch's first block (median / max): ", end="")
    print(", ".join(PHASES) + " | span")
    for group in launches(text):
        t0 = min(r[3][0] for r in group)
        cells = []
        for i in range(1, 7):
            values = [(r[3][i] - t0) / 1000 for r in group if r[3][i]]
            cells.append(f"{statistics.median(values):.2f} / {max(values):.2f}" if values else "-")
        span = (max(max(r[3]) for r in group) - t0) / 1000
        print(f"{group[0][0]:6d} {group[0][1]:2d} {len(group):4d} | " + " | ".join(cells) + f" | {span:.2f}")


if __name__ == "__main__":
    main()
