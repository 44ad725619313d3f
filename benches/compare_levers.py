"""Weight-level sweep of the HIGGS knobs (no perplexity): relative MSE and stored bits/weight on
8 SmolLM2-135M matrices (blocks 5 and 20: q_proj, v_proj, down_proj, up_proj), beside the peers.

HIGGS rows use ``quantize_tensor`` (scale search); "rms" rows the RMS-scale choice of before
(``higgs_variants.prototype(..., "rms")``; for p = 3 with g = 64, where ``quantize_tensor``
keeps the RMS scale because 3 does not divide 64). One thread; times are rough on a shared machine.

    python benches/compare_levers.py > benches/results/compare_levers.txt
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import higgs_variants as hv  # noqa: E402
import peers  # noqa: E402


def main() -> None:
    from safetensors import safe_open

    import higgs_rs
    from higgs_rs.models import smollm2

    f = safe_open(str(smollm2() / "model.safetensors"), "pt")
    ws = [
        f.get_tensor(f"model.layers.{b}.{k}.weight").float().numpy()
        for b in (5, 20)
        for k in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")
    ]

    def row(label: str, fn: Callable[..., peers.Quantized]) -> None:
        t = time.time()
        bits = 0
        mse = []
        for w in ws:
            r = fn(w)
            bits += r.stored_bits
            mse.append(peers.relative_mse(w, r.weight))
        print(
            f"{label:40} bpw {bits / sum(w.size for w in ws):.3f}  relMSE {np.mean(mse):.5f}  "
            f"({time.time() - t:.1f}s)",
            flush=True,
        )

    def higgs(bits: float, p: int, h: int | None = None, g: int = 64, seed: int | None = 0) -> Callable:
        def fn(w: np.ndarray) -> peers.Quantized:
            q = higgs_rs.quantize_tensor(
                w, bits=bits, p=p, hadamard_size=h, group_size=g, seed=seed, threads=1
            )
            return peers.Quantized(higgs_rs.dequantize(q), q.codes.nbytes * 8 + q.scales.size * 16)

        return fn

    for bits, p in ((4, 1), (4, 2), (4, 3), (3, 1), (3, 2), (3, 3), (3, 4), (2, 1), (2, 2), (2, 3), (2, 4)):
        g = 48 if p == 3 else 64
        row(f"HIGGS search p{p} n{2 ** (bits * p)} row g{g}", higgs(bits, p, None, g))
        if p <= 2:
            row(f"HIGGS rms    p{p} n{2 ** (bits * p)} row g{g}", hv.prototype(bits, p, g, 0, "rms"))
        elif p == 3:
            # 3 does not divide 64: quantize_tensor keeps the RMS scale there.
            row(f"HIGGS rms    p{p} n{2 ** (bits * p)} row g64", higgs(bits, p, None, 64))
    for h in (64, 128, 256, 512, 1024):
        row(f"HIGGS search p2 n256 H={h} g64", higgs(4, 2, h, 64))
    row("HIGGS search p2 n256 row g64 no signs", higgs(4, 2, None, 64, None))
    for g in (32, 128, 256, 1536):
        row(f"HIGGS search p2 n256 row g{g}", higgs(4, 2, None, g))
    row("HIGGS search p4 n8192 row g64 (3.25b)", higgs(3.25, 4, None, 64))
    for t in ("Q4_0", "IQ4_NL", "Q4_K", "IQ4_XS", "Q3_K", "IQ3_S", "Q2_K"):
        row(f"llama.cpp {t} (+fallback)", peers.ggml_type(t, True))
    row("RTN asym 4b g64", peers.rtn_asymmetric(4, 64))
    row("RTN asym 3b g64", peers.rtn_asymmetric(3, 64))
    row("bnb NF4 g64", peers.bnb_4bit("nf4", 64, False))


if __name__ == "__main__":
    main()
