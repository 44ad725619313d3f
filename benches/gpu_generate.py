"""End-to-end generation on the GPU through transformers: a Llama-3-8B-shaped
``LlamaForCausalLM`` (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocabulary 32000, random
weights) in fp16 against the same model with every decoder projection a 4-bit ``HiggsLinear``
(random codes, as in ``gpu_bench.py``: speed does not depend on the values).

    python3 benches/gpu_generate.py [--layers 32] [--new-tokens 128] [--out results.json]

Per model: transformers' own ``model.generate`` (eager, dynamic cache: what a user runs by
default), and ``higgs_rs.generate`` eager and with its CUDA-graph step. Decode tokens/s =
(new tokens − 1) / (time of the whole call − time of a one-token call), so prefill is excluded
and the graph's warm-up and capture are included. Greedy, batch 1, a 16-token prompt, no EOS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

import higgs_rs
from higgs_rs import cuda as hcuda
from higgs_rs import generation
from higgs_rs.cuda import group_projections
from higgs_rs.generation import generate
from higgs_rs.torch import fuse_mlps, fuse_norms, fuse_residuals, fuse_rope

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import random_layer  # noqa: E402

DEVICE = torch.device("cuda")


def llama_8b_shaped(layers: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with torch.device(DEVICE):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def quantize_projections(model: torch.nn.Module) -> None:
    for i, layer in enumerate(model.model.layers):
        for j, parent in enumerate((layer.self_attn, layer.mlp)):
            for k, (name, old) in enumerate(list(parent.named_children())):
                if isinstance(old, torch.nn.Linear):
                    setattr(
                        parent, name, random_layer(old.out_features, old.in_features, seed=64 * i + 8 * j + k)
                    )
        torch.cuda.empty_cache()
    # As higgs_rs.load and patch do: q/k/v and gate/up run as one launch each (HIGGS_CUDA_GROUP=0: not),
    # the norms and the MLP activations compute in one kernel with the rotation for the layers after
    # them (HIGGS_CUDA_FUSE_NORM=0: in PyTorch), the residual adds in the o and down projections'
    # kernels (HIGGS_CUDA_FUSE_RESIDUAL=0: in PyTorch), and the rotary embedding in one kernel
    # (HIGGS_CUDA_FUSE_ROPE=0: transformers' own).
    group_projections(model)
    fuse_norms(model)
    fuse_mlps(model)
    fuse_residuals(model)
    fuse_rope(model)


def seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rate(run: Callable[[int], object], new_tokens: int, repeats: int) -> float:
    start = time.perf_counter()
    run(new_tokens)  # warm-up: kernels compiled (and torch.compile's code), allocator primed
    print(f"  (first call {time.perf_counter() - start:.1f} s)", flush=True)
    full = seconds(lambda: run(new_tokens), repeats)
    prefill = seconds(lambda: run(1), repeats)
    return (new_tokens - 1) / (full - prefill)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--modes",
        default="",
        help="only the modes whose name contains one of these (comma-separated; '=NAME': exactly NAME)",
    )
    args = parser.parse_args()

    model = llama_8b_shaped(args.layers)
    prompt = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    modes: dict[str, Callable[[int], object]] = {
        "transformers generate (eager)": lambda n: model.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False
        ),
        "higgs_rs.generate eager": lambda n: generate(model, prompt, n, cuda_graph=False),
        "higgs_rs.generate CUDA graph": lambda n: generate(model, prompt, n),
        "higgs_rs.generate CUDA graph + torch.compile": lambda n: generate(model, prompt, n, compile=True),
        # The graph captured in every call (warm-up step and capture inside the timed run), as
        # before graphs were kept between calls.
        "higgs_rs.generate CUDA graph, captured per call": lambda n: generate(
            model, prompt, n, keep_graph=False
        ),
        "higgs_rs.generate CUDA graph + torch.compile, captured per call": lambda n: generate(
            model, prompt, n, compile=True, keep_graph=False
        ),
    }
    if args.modes:
        wanted = [w.strip() for w in args.modes.split(",") if w.strip()]
        modes = {
            name: run
            for name, run in modes.items()
            if any(name == w[1:] if w.startswith("=") else w in name for w in wanted)
        }
    rows = []
    # fp16 as transformers runs it, then with the rotary embedding in one kernel (what fuse_rope,
    # called by higgs_rs.load, does for every Llama model in the process); HIGGS without and with it.
    weight_sets = ("fp16", "fp16 + fused RoPE", "HIGGS 4-bit, transformers' RoPE", "HIGGS 4-bit")
    quantized = False
    for weights in weight_sets:
        if weights == "fp16 + fused RoPE":
            fuse_rope(model)
        if weights.startswith("HIGGS") and not quantized:
            model.__dict__.pop("_higgs_rs_compiled", None)
            torch._dynamo.reset()
            quantize_projections(model)
            quantized = True
        hcuda._FUSE_ROPE = weights != "fp16" and "transformers' RoPE" not in weights
        # A kept graph replays what it captured: the switch above changes no tensor.
        generation._kept.pop(model, None)
        for mode, run in modes.items():
            with torch.no_grad():
                rate = decode_rate(run, args.new_tokens, args.repeats)
            row = {"weights": weights, "mode": mode, "decode_tokens_per_s": rate}
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["weights"], r["mode"]): r["decode_tokens_per_s"] for r in rows}
    print(
        f"\nLlama-3-8B-shaped, {args.layers} layers, {torch.cuda.get_device_name()}, "
        f"higgs_rs {higgs_rs.__version__}; decode tokens/s (× fp16 in the same mode)"
    )
    print(
        "| mode | fp16 | fp16 + fused RoPE | HIGGS 4-bit, transformers' RoPE | HIGGS 4-bit | × fp16 "
        "| × fp16 + fused RoPE |\n|---|---|---|---|---|---|---|"
    )
    for mode in modes:
        fp16, fp16_rope = by[("fp16", mode)], by[("fp16 + fused RoPE", mode)]
        plain, ours = by[("HIGGS 4-bit, transformers' RoPE", mode)], by[("HIGGS 4-bit", mode)]
        print(
            f"| {mode} | {fp16:.1f} | {fp16_rope:.1f} | {plain:.1f} | {ours:.1f} | {ours / fp16:.2f} "
            f"| {ours / fp16_rope:.2f} |"
        )
    best = by.get(("HIGGS 4-bit", "higgs_rs.generate CUDA graph"))
    default = by.get(("fp16", "transformers generate (eager)"))
    if best and default:
        print(f"HIGGS with the CUDA graph vs fp16 transformers generate: {best / default:.2f}×")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
