"""Kernel durations under Nsight Compute (cold L2: ncu flushes caches before each kernel):

    ncu --clock-control none --csv -k regex:'hadamard_rotate|lut_mma' \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        python3 benches/gpu_profile.py

Launches, in order, one layer call (Hadamard kernel, then LUT-GEMM) per (shape, batch) below.
"""

from __future__ import annotations

import torch
from gpu_bench import SHAPES, random_layer

from higgs_rs import cuda as hcuda

BATCHES = (1, 16)

if __name__ == "__main__":
    for out_f, in_f in SHAPES:
        layer = random_layer(out_f, in_f)
        for batch in BATCHES:
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            hcuda.lut_linear(layer, x)
            torch.cuda.synchronize()
            print(f"{out_f}x{in_f} batch {batch}", flush=True)
