"""CPU-side cost of one eager ``HiggsLinear`` call on a GPU, next to an fp16 ``nn.Linear``.

    python3 benches/gpu_eager_overhead.py [--profile]

Three 4096×4096 layers called in turn on one batch-1 input (the q/k/v pattern), many calls in a
loop, one synchronize at the end: at batch 1 the GPU finishes each call faster than Python issues
the next, so the time per call is the CPU cost of issuing it (the bound on eager decode).
Shared rotation on and off, interleaved. ``--profile``: a cProfile table of the HIGGS calls.

Then a decoder layer's q, k, v, gate, up (Llama-3-8B shapes, grouped as ``higgs_rs.load`` groups
them) on a new input per step, with ``higgs_rs.cuda.GROUP_MODE`` alternating in one process
("never", "graph": the default, "always"): µs of CPU per step's five calls.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_bench  # noqa: E402

import higgs_rs.cuda as hcuda  # noqa: E402


def per_call_us(layers: Sequence[torch.nn.Module], x: torch.Tensor, rounds: int = 500) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        for layer in layers:
            layer(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(layers) * rounds) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    higgs = [gpu_bench.random_layer(4096, 4096, seed=i) for i in range(3)]
    dense = [
        torch.nn.Linear(4096, 4096, bias=False, device=gpu_bench.DEVICE, dtype=torch.float16)
        for _ in range(3)
    ]
    x = torch.randn(1, 4096, dtype=torch.float16, device=gpu_bench.DEVICE)
    per_call_us(higgs, x, 50)
    per_call_us(dense, x, 50)
    names = ("higgs, shared rotation", "higgs, unshared", "fp16 nn.Linear")
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(3):
        for share in (True, False):
            hcuda._SHARE_ROTATION = share
            times["higgs, shared rotation" if share else "higgs, unshared"].append(per_call_us(higgs, x))
        times["fp16 nn.Linear"].append(per_call_us(dense, x))
    hcuda._SHARE_ROTATION = True
    for name, values in times.items():
        print(f"{name:24s} µs per call: " + " ".join(f"{v:.1f}" for v in values))
    rows = (4096, 1024, 1024, 14336, 14336)
    layer_calls = [gpu_bench.random_layer(out_f, 4096, seed=10 + i) for i, out_f in enumerate(rows)]
    hcuda.group_layers(layer_calls[:3])
    hcuda.group_layers(layer_calls[3:])
    inputs = [torch.randn(1, 4096, dtype=torch.float16, device=gpu_bench.DEVICE) for _ in range(8)]
    modes: dict[str, list[float]] = {"never": [], "graph": [], "always": []}
    default_mode = hcuda.GROUP_MODE
    for _ in range(4):
        for mode, values in modes.items():
            hcuda.GROUP_MODE = mode
            for x_warm in inputs[:2]:
                [layer(x_warm) for layer in layer_calls]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for step in range(400):
                x_step = inputs[step % len(inputs)]  # a new input per step, as in decode
                [layer(x_step) for layer in layer_calls]
            values.append((time.perf_counter() - start) / 400 * 1e6)
            torch.cuda.synchronize()
    hcuda.GROUP_MODE = default_mode
    for mode, values in modes.items():
        print(f"grouping {mode:6s}: µs of CPU per q,k,v,gate,up: " + " ".join(f"{v:.0f}" for v in values))
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        per_call_us(higgs, x, 300)
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(20)
        print(out.getvalue())


if __name__ == "__main__":
    main()
