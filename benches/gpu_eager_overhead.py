"""CPU-side cost of one eager ``HiggsLinear`` call on a GPU, next to an fp16 ``nn.Linear``.

    python3 benches/gpu_eager_overhead.py [--profile]

Three 4096×4096 layers called in turn on one batch-1 input (the q/k/v pattern), many calls in a
loop, one synchronize at the end: at batch 1 the GPU finishes each call faster than Python issues
the next, so the time per call is the CPU cost of issuing it (the bound on eager decode).
Shared rotation on and off, interleaved. ``--profile``: a cProfile table of the HIGGS calls.
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
