"""GPU benchmark of the HIGGS CUDA path: Llama-3-8B layer shapes and a Llama-shaped decode loop.

    python3 benches/gpu_bench.py [--out results.json] [--quick]

Per shape and batch: torch fp16 ``F.linear``, ours (4 bits: p=2, n=256, group 64, whole-row
Hadamard; the Hadamard kernel and the LUT-GEMM together), and higgs-kernels 0.4.0 (the authors'
package: dequantize kernel + Hadamard + ``F.linear``) when importable. Timing: CUDA events around
each call, median of many calls, L2 flushed before each call (a 256 MB write), so every call reads
its weights from HBM. Our weights are random codes and scales (speed does not depend on the
values; correctness is tests/test_cuda.py's job). GB/s counts code + scale bytes (fp16: weight
bytes) against the measured device copy rate.

Then decode: a Llama-3-8B-shaped stack (hidden 4096, MLP 14336, 32 heads / 8 KV heads, few layers,
small vocabulary; RMSNorm, attention over a static KV cache, SiLU MLP) with fp16 ``nn.Linear`` vs
``HiggsLinear``, one token per step, eager and captured in a CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import higgs_rs
import higgs_rs.cuda as higgs_cuda
from higgs_rs import cuda as hcuda
from higgs_rs.torch import HiggsLinear, fuse_mlps, fuse_norms

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
BATCHES = [1, 4, 16, 64]
DEVICE = torch.device("cuda")


class Timer:
    """Median CUDA-event time of a call, with the L2 cache flushed before each call: by writing a
    256 MB buffer ("write", the default since session 1: L2 is left full of dirty lines, whose
    write-back the timed call pays as it evicts them), or by reading it ("read": L2 left clean, as
    in a decode step, where it holds the previous layers' weights)."""

    def __init__(self, flush: str = "write") -> None:
        self.flush = torch.zeros(256 << 20, dtype=torch.uint8, device=DEVICE)
        self.read_flush = flush == "read"

    def __call__(self, fn: Callable[[], Any], reps: int = 100, warmup: int = 5) -> float:
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if self.read_flush:
                self.flush.view(torch.int64).sum()
            else:
                self.flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3  # µs


def copy_bandwidth() -> float:
    """Device-to-device copy rate in GB/s, counting bytes read and written."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    return 2 * a.numel() / seconds / 1e9


def random_layer(out_f: int, in_f: int, seed: int = 0) -> HiggsLinear:
    """A 4-bit p=2 layer with random codes and realistic scales (whole-row Hadamard, group 64),
    drawn on the GPU (every layer its own memory: no L2 hits between layers)."""
    h = in_f  # 4096 = 2^12, 14336 = 28·2^9: both supported whole-row orders
    assert higgs_rs.is_supported_hadamard_order(h)
    layer = HiggsLinear(in_f, out_f, p=2, n=256, hadamard_size=h, group_size=64, padded_in_features=in_f,
                        row_bytes=in_f // 2, bias=False, has_signs=True, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        layer.codes.copy_(torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, device=DEVICE,
                                        generator=gen))
        scales = torch.randn(out_f, in_f // 64, device=DEVICE, generator=gen).abs() * 0.01 + 0.01
        layer.scales.copy_(scales.half())
        layer.grid.copy_(torch.from_numpy(higgs_rs.grid_points(2, 256)))
        # One sign seed per checkpoint (as `quantize_model` writes): q/k/v and gate/up rotate alike.
        layer.signs.copy_(torch.from_numpy(higgs_rs.random_signs(0, in_f)))
    return layer


def higgs_kernels_op(out_f: int, in_f: int) -> Callable[[torch.Tensor], torch.Tensor] | str:
    """The authors' package: quantize on the GPU with its kernel, then its matmul (dequantize +
    Hadamard + F.linear). A string says why it is not available."""
    try:
        from higgs_kernels.grids import load_optimal_grid_2_256
        from higgs_kernels.linear import higgs_matmul_linear_2_256, higgs_quantize_linear_2_256
    except Exception as e:  # noqa: BLE001 - report any import failure
        return f"higgs-kernels not importable: {e!r}"
    try:
        grid = load_optimal_grid_2_256(device="cuda", dtype=torch.float16)
        w = torch.randn(out_f, in_f, device=DEVICE, dtype=torch.float16) * 0.02
        q, s = higgs_quantize_linear_2_256(w, grid, 64)
        del w
        return lambda x: higgs_matmul_linear_2_256(x, q, s, grid, 64)
    except Exception as e:  # noqa: BLE001
        return f"higgs-kernels failed: {e!r}"


def graph_us(timer: Timer, fn: Callable[[], Any]) -> float:
    """`fn` captured in a CUDA graph (no CPU launch gaps), timed by replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timer(graph.replay, reps=50)


def dequantize_alone_us(timer: Timer, layer: HiggsLinear) -> float:
    """The dense path's dequantize kernel alone (rotated f16 weights, out_features × padded)."""
    x = torch.zeros(1, layer.in_features, device=DEVICE, dtype=torch.float16)
    args = hcuda._layer_args(layer, x)
    padded = layer.padded_in_features
    w_rot = torch.empty(layer.out_features, padded, dtype=torch.float16, device=DEVICE)
    stream = torch.cuda.current_stream().cuda_stream
    return timer(
        lambda: higgs_rs._core.cuda_dequantize_rotated(
            *args[:3], w_rot.data_ptr(), padded, layer.in_features, layer.out_features, *args[4:-1],
            "f16", stream, DEVICE.index or 0, tiled=args[-1],
        ),
        reps=30,
    )


def slab_dense_op(layer: HiggsLinear, x: torch.Tensor, slab: int) -> Callable[[], torch.Tensor]:
    """The dense path with the weights dequantized `slab` rows at a time into one reused (L2-sized)
    buffer, each slab multiplied at once into its columns of y (batch × out_features)."""
    args = hcuda._layer_args(layer, x)
    padded = layer.padded_in_features
    codes, scales, grid, row_bytes, groups = args[0], args[1], args[2], args[4], args[5]
    w_slab = torch.empty(slab, padded, dtype=x.dtype, device=DEVICE)
    out = torch.empty(x.shape[0], layer.out_features, dtype=x.dtype, device=DEVICE)
    stream = torch.cuda.current_stream().cuda_stream

    def run() -> torch.Tensor:
        x_rot = hcuda.hadamard(x, layer.hadamard_size, layer.signs, width=padded)
        for r0 in range(0, layer.out_features, slab):
            rows = min(slab, layer.out_features - r0)
            higgs_rs._core.cuda_dequantize_rotated(
                codes + r0 * row_bytes, scales + 2 * r0 * groups, grid, w_slab.data_ptr(), padded,
                layer.in_features, rows, *args[4:-1], "f16", stream, DEVICE.index or 0, tiled=args[-1],
            )
            torch.mm(x_rot, w_slab[:rows].t(), out=out[:, r0:r0 + rows])
        return out

    return run


def bench_layers(
    timer: Timer, copy_gbs: float, quick: bool, results: dict, batches: list[int], slabs: list[int]
) -> list[dict]:
    rows = []
    for out_f, in_f in SHAPES:
        w16 = torch.randn(out_f, in_f, device=DEVICE, dtype=torch.float16) * 0.02
        layer = random_layer(out_f, in_f)
        quant_bytes = layer.codes.numel() + layer.scales.numel() * 2
        floor_us = quant_bytes / (copy_gbs * 1e9) * 1e6
        hk = higgs_kernels_op(out_f, in_f) if not quick else "skipped (--quick)"
        dequant_us = dequantize_alone_us(timer, layer)
        for batch in batches:
            x = torch.randn(batch, in_f, device=DEVICE, dtype=torch.float16)
            out = torch.empty(batch, out_f, device=DEVICE, dtype=torch.float16)
            t16 = timer(lambda x=x, w=w16: torch.nn.functional.linear(x, w))
            ours = timer(lambda x=x, lay=layer, o=out: hcuda.lut_linear(lay, x, o))
            # The same call captured in a CUDA graph (no CPU launch gaps), and its first kernel alone.
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                hcuda.lut_linear(layer, x, out)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                hcuda.lut_linear(layer, x, out)
            ours_graph = timer(graph.replay)
            graph16 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph16):
                torch.nn.functional.linear(x, w16)
            fp16_graph = timer(graph16.replay)
            hadamard_us = timer(lambda x=x, h=in_f, s=layer.signs: hcuda.hadamard(x, h, s))
            # The large-batch path (Hadamard + dequantize to rotated f16 weights + torch GEMM).
            dense_us = timer(
                lambda x=x, lay=layer, o=out: hcuda.lut_linear(lay, x, o, dense_min_batch=1), reps=30
            )
            slab_us = {}
            for size in slabs:
                if out_f <= size:
                    continue
                op = slab_dense_op(layer, x, size)
                y_slab = op().float()
                y_ref = hcuda.lut_linear(layer, x, dense_min_batch=1).float()
                slab_err = float((y_slab - y_ref).norm() / y_ref.norm())
                assert slab_err < 1e-2, f"slab path differs: {slab_err}"
                slab_us[f"eager_{size}"] = timer(op, reps=30)
                slab_us[f"graph_{size}"] = graph_us(timer, op)
            # Both large-batch paths in graphs: the fused LUT-GEMM (batch chunks of 64) and the
            # dense path (Hadamard + dequantize + cuBLAS), to place DENSE_MIN_BATCH.
            mma_graph = graph_us(
                timer, lambda x=x, lay=layer, o=out: hcuda.lut_linear(lay, x, o, dense_min_batch=1 << 30)
            )
            dense_graph = graph_us(
                timer, lambda x=x, lay=layer, o=out: hcuda.lut_linear(lay, x, o, dense_min_batch=1)
            )
            row = {
                "shape": f"{out_f}x{in_f}",
                "batch": batch,
                "fp16_us": t16,
                "ours_us": ours,
                "floor_us": floor_us,
                "ours_gbs": quant_bytes / ours / 1e3,
                "fp16_gbs": w16.numel() * 2 / t16 / 1e3,
                "speedup_vs_fp16": t16 / ours,
                "ours_graph_us": ours_graph,
                "fp16_graph_us": fp16_graph,
                "hadamard_only_us": hadamard_us,
                "dense_path_us": dense_us,
                "dequantize_us": dequant_us,
                "slab_dense_us": slab_us,
                "mma_graph_us": mma_graph,
                "dense_graph_us": dense_graph,
            }
            if callable(hk):
                try:
                    row["higgs_kernels_us"] = timer(lambda x=x, op=hk: op(x), reps=10, warmup=2)
                except Exception as e:  # noqa: BLE001
                    row["higgs_kernels_us"] = float("nan")
                    results.setdefault("notes", []).append(f"higgs-kernels {out_f}x{in_f} b{batch}: {e!r}")
            # Launch-configuration sweep: does the heuristic pick well?
            if batch in (1, 16) and not quick:
                sweep = {}
                for mt in (1, 2):
                    for splits in (1, 2, 4, 8, 16):
                        sweep[f"mt{mt}_s{splits}"] = timer(
                            lambda x=x, lay=layer, o=out, mt=mt, splits=splits: hcuda.lut_linear(
                                lay, x, o, mt=mt, splits=splits
                            ),
                            reps=50,
                        )
                row["sweep_us"] = sweep
            rows.append(row)
            print(json.dumps(row), flush=True)
        if isinstance(hk, str):
            results.setdefault("notes", []).append(hk)
        torch.cuda.empty_cache()
    return rows


class Mlp(torch.nn.Module):
    """transformers' LlamaMLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, mlp: int) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, mlp, bias=False)
        self.up_proj = torch.nn.Linear(hidden, mlp, bias=False)
        self.down_proj = torch.nn.Linear(mlp, hidden, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(torch.nn.Module):
    """One Llama decoder layer for single-token decode over a static KV cache (no RoPE: it does not
    change the linear layers' cost, which is what is measured). ``fused``: q/k/v as one projection
    and gate/up as one (as Phi-3 and vLLM store them), for fp16 and HIGGS alike."""

    def __init__(self, hidden: int, mlp: int, heads: int, kv_heads: int, max_len: int, fused: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.fused = fused
        self.residual_fused = False
        kv = kv_heads * self.head_dim
        self.sizes = (hidden, kv, kv)
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.o = lin(hidden, hidden)
        if fused:
            self.qkv, self.gate_up = lin(hidden, hidden + 2 * kv), lin(hidden, 2 * mlp)
            self.down = lin(mlp, hidden)
        else:
            self.q, self.k, self.v = lin(hidden, hidden), lin(hidden, kv), lin(hidden, kv)
            self.mlp = Mlp(hidden, mlp)
        self.norm1 = torch.nn.RMSNorm(hidden)
        self.norm2 = torch.nn.RMSNorm(hidden)
        self.register_buffer("k_cache", torch.zeros(1, kv_heads, max_len, self.head_dim))
        self.register_buffer("v_cache", torch.zeros(1, kv_heads, max_len, self.head_dim))

    def forward(self, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(h)
        if self.fused:
            q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.reshape(1, 1, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        a = torch.nn.functional.scaled_dot_product_attention(
            q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True
        )
        a = a.transpose(1, 2).reshape(1, 1, -1)
        # With the residual adds fused (HiggsLinear / HiggsGatedMLP take the residual, as in a
        # decoder layer after higgs_rs.fuse_residuals), the projections' kernels add it.
        h = self.o(a, residual=h) if self.residual_fused else h + self.o(a)
        x = self.norm2(h)
        if self.fused:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            product = torch.nn.functional.silu(gate) * up
            return self.down(product, residual=h) if self.residual_fused else h + self.down(product)
        return self.mlp(x, residual=h) if self.residual_fused else h + self.mlp(x)


class TinyLlama(torch.nn.Module):
    def __init__(self, layers: int, vocab: int, max_len: int, fused: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 4096)
        self.blocks = torch.nn.ModuleList(Block(4096, 14336, 32, 8, max_len, fused) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(4096)
        self.head = torch.nn.Linear(4096, vocab, bias=False)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(token).view(1, 1, -1)
        for b in self.blocks:
            h = b(h, pos, mask)
        return self.head(self.norm(h))


def quantize_blocks(model: TinyLlama) -> None:
    """Replace every projection of the blocks with a random-code 4-bit HiggsLinear, and group
    q/k/v and gate/up as ``higgs_rs.load`` does (one launch each; ``HIGGS_CUDA_GROUP=0``: not)."""
    for i, block in enumerate(model.blocks):
        for j, (name, old) in enumerate(list(block.named_modules())):
            if isinstance(old, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                layer = random_layer(old.out_features, old.in_features, seed=16 * i + j)
                setattr(block.get_submodule(parent) if parent else block, child, layer)
                del old
        if not block.fused:
            hcuda.group_layers([block.q, block.k, block.v])
            hcuda.group_layers([block.mlp.gate_proj, block.mlp.up_proj])
        torch.cuda.empty_cache()


def fuse_block_prologues(model: TinyLlama) -> None:
    """What ``higgs_rs.load`` does for a transformers model: each norm and MLP activation computed
    in one kernel with the rotation for the layers that read it (``fuse_norms``, ``fuse_mlps``),
    and the residual adds by the o and down projections (``fuse_residuals``)."""
    for block in model.blocks:
        readers = ("qkv", "gate_up") if block.fused else ("q", "mlp.gate_proj")
        fuse_norms(block, pairs=(("norm1", readers[0]), ("norm2", readers[1])))
        block.residual_fused = True
    fuse_mlps(model, classes=frozenset({"Mlp"}))


def warm_and_capture(model: TinyLlama, inputs: tuple, graph: torch.cuda.CUDAGraph | None) -> None:
    """Three decode steps on a side stream (the lazy setup, as graph capture wants), then one step
    captured into ``graph`` when given."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    if graph is not None:
        with torch.cuda.graph(graph):
            model(*inputs)


def decode_tokens_per_second(model: TinyLlama, steps: int, graph: bool) -> float:
    max_len = model.blocks[0].k_cache.shape[2]
    token = torch.zeros(1, dtype=torch.long, device=DEVICE)
    pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
    mask = torch.zeros(1, 1, 1, max_len, dtype=torch.float16, device=DEVICE)

    def set_step(t: int) -> None:
        pos.fill_(t)
        mask.fill_(float("-inf"))
        mask[..., : t + 1] = 0

    with torch.no_grad():
        set_step(0)
        g = torch.cuda.CUDAGraph() if graph else None
        warm_and_capture(model, (token, pos, mask), g)
        if g is not None:
            run = g.replay
        else:
            def run() -> None:
                model(token, pos, mask)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for t in range(steps):
            set_step(t % max_len)
            run()
        torch.cuda.synchronize()
        return steps / (time.perf_counter() - start)


def bench_decode(quick: bool, results: dict, layers: int, vocab: int, fused_too: bool = True) -> list[dict]:
    max_len, steps = (256, 100) if not quick else (128, 30)
    rows = []
    for fused in (False, True) if fused_too else (False,):
        with torch.device(DEVICE):
            model = TinyLlama(layers, vocab, max_len, fused).half().eval()
        # "unshared": every projection runs its own Hadamard kernel (HIGGS_CUDA_SHARE_ROT=0);
        # otherwise q/k/v and gate/up share one rotation of their input. "fused": the norms before
        # them are HiggsRMSNorm and the MLPs HiggsGatedMLP (norm or activation and the rotation in
        # one kernel, as higgs_rs.load sets up; the fused-projection model: the norms only).
        for label in ("fp16", "higgs 4-bit", "higgs 4-bit unshared", "higgs 4-bit fused"):
            if label == "higgs 4-bit":
                quantize_blocks(model)
            if label == "higgs 4-bit fused":
                fuse_block_prologues(model)
            sharing = higgs_cuda._SHARE_ROTATION
            higgs_cuda._SHARE_ROTATION = sharing and not label.endswith("unshared")
            for graph in (False, True):
                try:
                    tps = decode_tokens_per_second(model, steps, graph)
                except Exception as e:  # noqa: BLE001
                    tps = float("nan")
                    results.setdefault("notes", []).append(f"decode {label} graph={graph}: {e!r}")
                row = {"model": f"Llama-3-8B-shaped, {layers} layers, vocab {vocab}"
                       + (", fused qkv/gate-up" if fused else ""), "weights": label,
                       "mode": "cuda graph" if graph else "eager", "tokens_per_s": tps}
                rows.append(row)
                print(json.dumps(row), flush=True)
            higgs_cuda._SHARE_ROTATION = sharing
        del model
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    parser.add_argument("--quick", action="store_true", help="no sweep, no higgs-kernels, short decode")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--decode-layers", type=int, default=4, help="decode test layers (0: none)")
    parser.add_argument("--vocab", type=int, default=32000, help="decode test vocabulary (fp16 lm_head)")
    parser.add_argument("--slabs", default="",
                        help="also time the dense path dequantizing this many rows at once (e.g. 2048,4096)")
    parser.add_argument("--no-fused", action="store_true", help="decode: skip the fused qkv/gate-up model")
    parser.add_argument("--flush", choices=("write", "read"), default="write",
                        help="L2 flush before each timed call: write 256 MB (dirty L2) or read it (clean L2)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    props = torch.cuda.get_device_properties(DEVICE)
    results: dict[str, Any] = {
        "device": props.name,
        "torch": torch.__version__,
        "higgs_rs_cuda": higgs_rs.cuda_status(),
        "l2_flush": args.flush,
    }
    copy_gbs = copy_bandwidth()
    results["copy_gbs"] = copy_gbs
    print(f"{props.name}: device copy {copy_gbs:.0f} GB/s (read + write)", flush=True)
    timer = Timer(args.flush)
    results["layers"] = bench_layers(
        timer, copy_gbs, args.quick, results, batches, [int(v) for v in args.slabs.split(",") if v]
    )
    results["decode"] = (
        bench_decode(args.quick, results, args.decode_layers, args.vocab, not args.no_fused)
        if args.decode_layers
        else []
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print("\n| shape | batch | floor µs | fp16 µs | ours µs | ours GB/s | × fp16 | graph: fp16 / ours µs "
          "| Hadamard alone µs | dense path µs | dequantize alone µs | higgs-kernels µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["layers"]:
        hk = r.get("higgs_kernels_us", float("nan"))
        print(f"| {r['shape']} | {r['batch']} | {r['floor_us']:.1f} | {r['fp16_us']:.1f} | "
              f"{r['ours_us']:.1f} | {r['ours_gbs']:.0f} | {r['speedup_vs_fp16']:.2f} | "
              f"{r['fp16_graph_us']:.1f} / {r['ours_graph_us']:.1f} | {r['hadamard_only_us']:.1f} | "
              f"{r['dense_path_us']:.1f} | {r['dequantize_us']:.1f} | {hk:.0f} |")
    print("\n| shape | batch | graph: fp16 µs | fused LUT-GEMM µs | dense path µs | dequantize alone µs "
          "| slab dense µs |")
    print("|---|---|---|---|---|---|---|")
    for r in results["layers"]:
        slabs = " ".join(f"{k} {v:.1f}" for k, v in r["slab_dense_us"].items())
        print(f"| {r['shape']} | {r['batch']} | {r['fp16_graph_us']:.1f} | {r['mma_graph_us']:.1f} | "
              f"{r['dense_graph_us']:.1f} | {r['dequantize_us']:.1f} | {slabs} |")
    for r in results["decode"]:
        print(f"decode {r['weights']:>12} {r['mode']:>10}: {r['tokens_per_s']:.1f} tokens/s ({r['model']})")
    for n in results.get("notes", []):
        print("note:", n)
    if not math.isfinite(results["copy_gbs"]):
        raise SystemExit("copy bandwidth measurement failed")


if __name__ == "__main__":
    main()
