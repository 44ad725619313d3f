#!/usr/bin/env python3
"""Checkpoint pipeline benchmark: end-to-end throughput and peak RSS of ``quantize_checkpoint``.

Two parts, both reproducible:

``make``   writes a synthetic Llama-3-8B-shaped checkpoint (2 decoder layers, norms, the 128256 ×
           4096 embedding and output head; random bf16, Gaussian × 0.02, fixed seed) as four
           safetensors shards + ``model.safetensors.index.json`` + ``config.json`` (≈ 2.97 GB).
           Each tensor is filled in row chunks, so the generator holds one tensor (≤ 1.05 GB) at a
           time; the directory is built under a temporary name and renamed when complete.
``bench``  runs, per round and each in its own subprocess (so its peak RSS is its own):
           1. ``quantize_tensor`` on one 14336 × 4096 bf16 matrix held in RAM (the kernel rate);
           2. ``quantize_checkpoint`` of the synthetic checkpoint (the end-to-end rate, counting
              only quantized weights), its peak RSS (``wait4`` ru_maxrss) and, sampled from
              ``/proc/PID/status``, its peak anonymous and file-backed (mmap) resident memory;
           3. optionally a copy-only pass (every tensor skipped, i.e. copied) for the I/O cost.
           Rounds interleave the runs so each ratio compares runs taken under the same load; the
           best of ``--repeat`` rounds is reported, with the per-round ratios.

Usage::

    python benches/pipeline_bench.py make [--dir /work/synthetic]
    python benches/pipeline_bench.py bench [--dir /work/synthetic] [--out /work/synthetic-out]
        [--repeat 3] [--threads N] [--no-copy-run] [--markdown benches/results/pipeline.md]

The spec is the same for both rates: 4 bits, p = 2 (n = 256), group size 64, Hadamard size
chosen by the library (None: whole rows, 4096 or 14336), seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

HIDDEN = 4096
INTERMEDIATE = 14336
KV_DIM = 1024  # 8 KV heads × head dim 128
VOCAB = 128256
LAYERS = 2
INIT_STD = 0.02
BASE_SEED = 20240501
CHUNK_ELEMENTS = 1 << 23  # 8 M values (32 MB of f32) generated at a time

TENSOR_NAME = "model.layers.0.mlp.gate_proj.weight"  # the 14336 × 4096 matrix for quantize_tensor
SPEC: dict[str, Any] = {"bits": 4, "p": 2, "group_size": 64, "hadamard_size": None, "seed": 0}


# ----------------------------------------------------------------------------- generator


def layer_tensors(layer: int) -> list[tuple[str, tuple[int, ...]]]:
    prefix = f"model.layers.{layer}"
    return [
        (f"{prefix}.input_layernorm.weight", (HIDDEN,)),
        (f"{prefix}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (f"{prefix}.self_attn.k_proj.weight", (KV_DIM, HIDDEN)),
        (f"{prefix}.self_attn.v_proj.weight", (KV_DIM, HIDDEN)),
        (f"{prefix}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (f"{prefix}.post_attention_layernorm.weight", (HIDDEN,)),
        (f"{prefix}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
        (f"{prefix}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
        (f"{prefix}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
    ]


def shard_layout() -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors per shard: embedding | layer 0 | layer 1 + final norm | output head."""
    shards = [[("model.embed_tokens.weight", (VOCAB, HIDDEN))]]
    shards += [layer_tensors(i) for i in range(LAYERS)]
    shards[-1].append(("model.norm.weight", (HIDDEN,)))
    shards.append([("lm_head.weight", (VOCAB, HIDDEN))])
    return shards


def llama_config() -> dict[str, Any]:
    """Llama-3-8B's config.json, cut to LAYERS decoder layers."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def random_bf16(name: str, shape: tuple[int, ...]) -> Any:
    """Gaussian × INIT_STD in bf16 (norms: ones), seeded by the name, filled in row chunks."""
    import torch

    out = torch.empty(shape, dtype=torch.bfloat16)
    if len(shape) == 1:
        out.fill_(1.0)
        return out
    generator = torch.Generator().manual_seed(BASE_SEED ^ zlib.crc32(name.encode()))
    rows, cols = shape
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = torch.randn((stop - start, cols), generator=generator, dtype=torch.float32)
        out[start:stop] = chunk.mul_(INIT_STD)
    return out


def make_checkpoint(directory: Path) -> None:
    from safetensors.torch import save_file

    if (directory / "config.json").is_file():
        print(f"{directory} exists (config.json present); reusing it")
        return
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shards = shard_layout()
    weight_map: dict[str, str] = {}
    total = 0
    started = time.perf_counter()
    for i, tensors in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        data = {name: random_bf16(name, shape) for name, shape in tensors}
        save_file(data, str(staging / file_name), metadata={"format": "pt"})
        for name in data:
            weight_map[name] = file_name
        total += sum(t.numel() * t.element_size() for t in data.values())
        del data  # the only reference: the next shard's tensors do not coexist with these
        print(f"  wrote {file_name} ({(staging / file_name).stat().st_size / 1e9:.2f} GB)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (staging / "config.json").write_text(json.dumps(llama_config(), indent=2) + "\n")
    staging.rename(directory)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"wrote {directory}: {total / 1e9:.2f} GB of tensors in {time.perf_counter() - started:.1f} s;"
        f" generator peak RSS {peak / 1e9:.2f} GB"
    )


# ----------------------------------------------------------------------------- children


def vm_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in bytes (empty once it has exited)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def child_tensor(directory: Path, threads: int, iterations: int) -> dict[str, Any]:
    """quantize_tensor on TENSOR_NAME, loaded into RAM first: the best of `iterations`."""
    import torch
    from safetensors import safe_open

    import higgs_rs

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    with safe_open(str(directory / index["weight_map"][TENSOR_NAME]), framework="pt") as f:
        matrix = f.get_tensor(TENSOR_NAME).clone().contiguous()
    assert matrix.dtype == torch.bfloat16 and tuple(matrix.shape) == (INTERMEDIATE, HIDDEN)
    baseline = vm_status()
    times = []
    result = None
    for _ in range(iterations):
        started = time.perf_counter()
        result = higgs_rs.quantize_tensor(matrix, threads=threads, **SPEC)
        times.append(time.perf_counter() - started)
    assert result is not None
    return {
        "weights": matrix.numel(),
        "seconds": times,
        "bits_per_weight": result.bits_per_weight,
        "relative_mse": result.relative_mse,
        "baseline": baseline,
    }


def child_checkpoint(directory: Path, out: Path, threads: int, copy_only: bool) -> dict[str, Any]:
    import higgs_rs

    baseline = vm_status()
    started = time.perf_counter()
    summary = higgs_rs.quantize_checkpoint(
        directory,
        out,
        threads=threads,
        progress=False,
        overwrite=True,
        skip=[""] if copy_only else (),  # "" is in every name: copy everything
        bits=SPEC["bits"],
        p=SPEC["p"],
        group_size=SPEC["group_size"],
        hadamard_size=SPEC["hadamard_size"],
        seed=SPEC["seed"],
    )
    wall = time.perf_counter() - started
    return {
        "wall": wall,
        "seconds": summary["seconds"],
        "quantized_weights": summary["quantized_weights"],
        "quantized": summary["quantized"],
        "source_bytes": summary["source_bytes"],
        "output_bytes": summary["output_bytes"],
        "bits_per_weight": summary["bits_per_weight"],
        "baseline": baseline,
    }


def run_child(args: list[str]) -> dict[str, Any]:
    """Run this script as a child; return its JSON result, its peak RSS and sampled memory peaks."""
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, text=True
    )
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in vm_status(process.pid).items():
                peaks[key] = max(peaks.get(key, 0), value)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"child {args} failed with exit code {process.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    result["maxrss"] = usage.ru_maxrss * 1024  # KiB on Linux
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    result["sampled_peaks"] = peaks
    return result


# ----------------------------------------------------------------------------- bench


def machine() -> dict[str, str]:
    info = {"cpus": str(os.cpu_count()), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Core(s) per socket", "Thread(s) per core", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
        flags = next((line for line in lscpu.splitlines() if line.startswith("Flags")), "")
        info["avx512"] = "yes" if "avx512f" in flags else "no"
    except (OSError, subprocess.CalledProcessError):
        pass
    with open("/proc/meminfo") as f:
        info["memory"] = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    return info


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def bench(options: argparse.Namespace) -> None:
    import higgs_rs

    directory: Path = options.dir
    if not (directory / "config.json").is_file():
        make_checkpoint(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    checkpoint_bytes = sum((directory / f).stat().st_size for f in sorted(set(index["weight_map"].values())))
    largest_tensor = VOCAB * HIDDEN * 2
    largest_quantized = INTERMEDIATE * HIDDEN * 2
    embedding_bytes = 2 * VOCAB * HIDDEN * 2
    threads = options.threads
    rounds: list[dict[str, Any]] = []
    for r in range(options.repeat):
        load_before = os.getloadavg()
        tensor = run_child(["_tensor", str(directory), str(threads), str(options.tensor_iterations)])
        pipeline = run_child(["_checkpoint", str(directory), str(options.out), str(threads), "0"])
        copy = None
        if options.copy_run:
            copy = run_child(["_checkpoint", str(directory), str(options.out), str(threads), "1"])
        load_after = os.getloadavg()
        tensor_rate = tensor["weights"] / min(tensor["seconds"]) / 1e6
        pipeline_rate = pipeline["quantized_weights"] / pipeline["seconds"] / 1e6
        entry = {
            "round": r + 1,
            "load": (load_before[0], load_after[0]),
            "tensor": tensor,
            "pipeline": pipeline,
            "copy": copy,
            "tensor_rate": tensor_rate,
            "pipeline_rate": pipeline_rate,
            "ratio": pipeline_rate / tensor_rate,
        }
        if copy is not None:
            # The embedding + head copy, estimated from the copy-only pass's bytes/s.
            entry["embedding_copy_estimate"] = copy["seconds"] * embedding_bytes / copy["source_bytes"]
            quantize_seconds = pipeline["seconds"] - entry["embedding_copy_estimate"]
            entry["pipeline_rate_without_copies"] = pipeline["quantized_weights"] / quantize_seconds / 1e6
            entry["ratio_without_copies"] = entry["pipeline_rate_without_copies"] / tensor_rate
        rounds.append(entry)
        line = (
            f"round {r + 1}: load {load_before[0]:.1f}->{load_after[0]:.1f}; quantize_tensor "
            f"{tensor_rate:.1f} M w/s; checkpoint {pipeline_rate:.1f} M w/s ({pipeline['seconds']:.1f} s) "
            f"= {100 * entry['ratio']:.0f}%; checkpoint peak RSS {gb(pipeline['maxrss'])}"
        )
        if copy is not None:
            line += f"; copy-only {copy['seconds']:.1f} s"
        print(line, flush=True)

    best_tensor = max(rounds, key=lambda e: e["tensor_rate"])
    best_pipeline = max(rounds, key=lambda e: e["pipeline_rate"])
    ratio_of_bests = best_pipeline["pipeline_rate"] / best_tensor["tensor_rate"]
    ratios = [e["ratio"] for e in rounds]
    pipeline_peak = max(e["pipeline"]["maxrss"] for e in rounds)
    peaks = {
        key: max(e["pipeline"]["sampled_peaks"].get(key, 0) for e in rounds) for key in ("RssAnon", "RssFile")
    }
    baseline = best_pipeline["pipeline"]["baseline"].get("VmRSS", 0)
    tensor_peak = max(e["tensor"]["maxrss"] for e in rounds)
    p = best_pipeline["pipeline"]
    print(
        f"best: quantize_tensor {best_tensor['tensor_rate']:.1f} M w/s, checkpoint "
        f"{best_pipeline['pipeline_rate']:.1f} M w/s; ratio of bests {100 * ratio_of_bests:.0f}%, "
        f"per-round ratios {', '.join(f'{100 * x:.0f}%' for x in ratios)}"
    )
    print(
        f"checkpoint {gb(checkpoint_bytes)}, largest tensor {gb(largest_tensor)}:"
        f" peak RSS {gb(pipeline_peak)} (anon {gb(peaks['RssAnon'])}, file-backed {gb(peaks['RssFile'])};"
        f" after imports {gb(baseline)})"
    )
    if options.markdown is None:
        return
    info = machine()
    loads = [x for e in rounds for x in e["load"]]
    shards = len(set(index["weight_map"].values()))
    command = "python " + " ".join([os.path.relpath(__file__, Path.cwd()), *sys.argv[1:]])
    lines = [
        "# Checkpoint pipeline: end-to-end throughput and peak memory",
        "",
        f"Machine: {info.get('Model name', '?')} ({info.get('Hypervisor vendor', 'bare metal')} VM), "
        f"{info['cpus']} CPUs ({info.get('Core(s) per socket', '?')} cores × "
        f"{info.get('Thread(s) per core', '?')} thread), AVX-512: {info.get('avx512', '?')}, "
        f"{info['memory']} RAM; SIMD path `{higgs_rs.simd_path()}`; Python {info['python']}; "
        f"`maturin develop --release`.",
        "",
        f"**Shared machine**: other jobs were running; 1-min load average {min(loads):.1f}–{max(loads):.1f}"
        f" on {info['cpus']} CPUs during the runs. Absolute rates are depressed and noisy; the ratios"
        " compare runs interleaved in the same round (same load).",
        "",
        f"Command: `{command}`",
        "",
        f"Checkpoint: `{directory}` from `pipeline_bench.py make`: Llama-3-8B shapes, {LAYERS} decoder"
        f" layers, random bf16 (N(0,1) × {INIT_STD}, seed {BASE_SEED}), {shards} shards,"
        f" {gb(checkpoint_bytes)}; {p['quantized']} linear weights quantized"
        f" ({p['quantized_weights'] / 1e6:.1f} M weights), embedding + lm_head + norms copied"
        f" ({gb(embedding_bytes)} of it is the two 128256 × 4096 tensors).",
        f"Spec (both paths): 4 bits, p = 2 (n = 256), g = 64, whole-row Hadamard (4096 / 14336), seed 0;"
        f" {p['bits_per_weight']:.4f} bits/weight stored. Threads: {threads}. Output: `{options.out}`"
        f" ({gb(p['output_bytes'])}, fsynced).",
        "",
        "## Throughput (M quantized weights / s)",
        "",
        "| round | load (1 min) | `quantize_tensor` 14336×4096 bf16 | `quantize_checkpoint` | ratio |"
        + (
            " copy-only pass | est. embedding+head copy | checkpoint without copies | ratio |"
            if options.copy_run
            else ""
        ),
        "|---|---|---|---|---|" + ("---|---|---|---|" if options.copy_run else ""),
    ]
    for e in rounds:
        row = (
            f"| {e['round']} | {e['load'][0]:.1f}→{e['load'][1]:.1f} | {e['tensor_rate']:.1f}"
            f" (best of {len(e['tensor']['seconds'])}: {min(e['tensor']['seconds']):.2f} s) |"
            f" {e['pipeline_rate']:.1f} ({e['pipeline']['seconds']:.1f} s) | {100 * e['ratio']:.0f}% |"
        )
        if e["copy"] is not None:
            copy_rate = e["copy"]["source_bytes"] / e["copy"]["seconds"] / 1e9
            row += (
                f" {e['copy']['seconds']:.1f} s ({copy_rate:.2f} GB/s) |"
                f" {e['embedding_copy_estimate']:.1f} s | {e['pipeline_rate_without_copies']:.1f} |"
                f" {100 * e['ratio_without_copies']:.0f}% |"
            )
        lines.append(row)
    lines += [
        "",
        f"Best of {len(rounds)}: `quantize_tensor` {best_tensor['tensor_rate']:.1f} M weights/s, "
        f"`quantize_checkpoint` {best_pipeline['pipeline_rate']:.1f} M weights/s (end to end: open, "
        f"plan, quantize, copy {gb(embedding_bytes)} of embeddings, write + fsync, config); ratio of bests "
        f"**{100 * ratio_of_bests:.0f}%**, per-round ratios {', '.join(f'{100 * x:.0f}%' for x in ratios)}"
        f" (median {100 * statistics.median(ratios):.0f}%).",
        "",
        "## Peak memory",
        "",
        "| | bytes |",
        "|---|---|",
        f"| checkpoint on disk | {gb(checkpoint_bytes)} |",
        f"| largest tensor (embedding / lm_head, copied) | {gb(largest_tensor)} |",
        f"| largest quantized tensor (gate/up/down, bf16) | {gb(largest_quantized)} |",
        f"| `quantize_checkpoint` child, RSS after imports | {gb(baseline)} |",
        f"| `quantize_checkpoint` child, peak RSS (`wait4` ru_maxrss, max) | **{gb(pipeline_peak)}** |",
        f"| of which, sampled every 20 ms: peak anonymous | {gb(peaks['RssAnon'])} |",
        f"| of which, sampled every 20 ms: peak file-backed (mmap'd source pages) | {gb(peaks['RssFile'])} |",
        f"| `quantize_tensor` child (torch imported, matrix in RAM), peak RSS | {gb(tensor_peak)} |",
        "",
    ]
    if options.copy_run:
        copy_peak = max(e["copy"]["maxrss"] for e in rounds)
        copy_file = max(e["copy"]["sampled_peaks"].get("RssFile", 0) for e in rounds)
        lines += [
            f"Copy-only pass (every tensor copied, nothing quantized): peak RSS {gb(copy_peak)},"
            f" peak file-backed {gb(copy_file)}.",
            "",
        ]
    markdown = Path(options.markdown)
    # A hand-written "## Notes" section of an earlier run survives the rewrite.
    previous = markdown.read_text() if markdown.is_file() else ""
    notes = previous[previous.find("## Notes") :] if "## Notes" in previous else ""
    markdown.write_text("\n".join(lines) + "\n" + notes)
    print(f"wrote {options.markdown}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_tensor", "_checkpoint"):
        role, rest = sys.argv[1], sys.argv[2:]
        if role == "_tensor":
            result = child_tensor(Path(rest[0]), int(rest[1]), int(rest[2]))
        else:
            result = child_checkpoint(Path(rest[0]), Path(rest[1]), int(rest[2]), rest[3] == "1")
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["make", "bench"])
    parser.add_argument("--dir", type=Path, default=Path("/work/synthetic"), help="synthetic checkpoint")
    parser.add_argument("--out", type=Path, default=Path("/work/synthetic-out"), help="quantized output")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best is reported")
    parser.add_argument("--tensor-iterations", type=int, default=2, help="quantize_tensor runs per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--no-copy-run", dest="copy_run", action="store_false", help="skip the copy-only pass"
    )
    parser.add_argument("--markdown", help="write the results table here")
    options = parser.parse_args()
    if options.command == "make":
        make_checkpoint(options.dir)
    else:
        bench(options)


if __name__ == "__main__":
    main()
