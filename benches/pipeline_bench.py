#!/usr/bin/env python3
"""Checkpoint pipeline benchmark: end-to-end throughput and peak RSS of ``quantize_checkpoint``.

Two parts, both reproducible:

``make``   writes a synthetic Llama-3-8B-shaped checkpoint (2 decoder layers, norms, the 128256 ×
           4096 embedding and output head; random bf16, Gaussian × 0.02, fixed seed) as four
           safetensors shards + ``model.safetensors.index.json`` + ``config.json`` (≈ 2.97 GB).
           Each tensor is filled in row chunks, so the generator holds one tensor (≤ 1.05 GB) at a
           time; the directory is built under a temporary name and renamed when complete.
``bench``  runs, per round and each in its own subprocess (so its peak RSS is its own):
           1. ``quantize_tensor`` on one 14336 × 4096 bf16 matrix held in RAM (the kernel rate),
              and on one matrix of each other shape (the kernel time of the same shape mix);
           2. ``quantize_checkpoint`` of the synthetic checkpoint (the end-to-end rate, counting
              only quantized weights), its peak RSS (``wait4`` ru_maxrss) and, sampled from
              ``/proc/PID/status``, its peak anonymous and file-backed (mmap) resident memory;
           3. optionally a copy-only pass (every tensor skipped, i.e. copied) for the I/O cost.
           Rounds interleave the runs so each ratio compares runs taken under the same load; the
           best of ``--repeat`` rounds is reported, with the per-round ratios. Rates are given per
           wall-clock second and per CPU-second (user + system of the process), the latter being
           what stays comparable on a loaded machine.

Usage::

    python benches/pipeline_bench.py make [--dir /work/synthetic]
    python benches/pipeline_bench.py bench [--dir /work/synthetic] [--out /work/synthetic-out]
        [--repeat 3] [--threads N] [--tensor-iterations 1] [--no-shape-mix] [--no-copy-run]
        [--markdown benches/results/pipeline.md]

The children import whatever ``import higgs_rs`` finds when the benchmark starts (a snapshot of
it); to pin a build, put its package directory first on PYTHONPATH.

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
# quantize_tensor timings stand for every quantized weight ending so (same shape).
KERNEL_SHAPES = {
    "gate_proj.weight": TENSOR_NAME,
    "up_proj.weight": TENSOR_NAME,
    "down_proj.weight": "model.layers.0.mlp.down_proj.weight",  # 4096 × 14336
    "q_proj.weight": "model.layers.0.self_attn.q_proj.weight",  # 4096 × 4096
    "o_proj.weight": "model.layers.0.self_attn.q_proj.weight",
    "k_proj.weight": "model.layers.0.self_attn.k_proj.weight",  # 1024 × 4096
    "v_proj.weight": "model.layers.0.self_attn.k_proj.weight",
}
LARGEST_TENSOR_BYTES = VOCAB * HIDDEN * 2
EMBEDDING_BYTES = 2 * VOCAB * HIDDEN * 2  # embed_tokens + lm_head, both copied
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


def kernel_shape(name: str) -> str:
    """The representative matrix timed by `quantize_tensor` for a quantized weight of that shape."""
    for suffix, representative in KERNEL_SHAPES.items():
        if name.endswith(suffix):
            return representative
    raise KeyError(name)


def child_tensor(directory: Path, threads: int, iterations: int, names: list[str]) -> dict[str, Any]:
    """quantize_tensor on each named matrix, loaded into RAM first: wall and CPU seconds per run."""
    import torch
    from safetensors import safe_open

    import higgs_rs

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out: dict[str, Any] = {"baseline": vm_status(), "tensors": {}}
    for name in names:
        with safe_open(str(directory / index["weight_map"][name]), framework="pt") as f:
            matrix = f.get_tensor(name).clone().contiguous()
        assert matrix.dtype == torch.bfloat16 and matrix.ndim == 2
        wall, cpu = [], []
        result = None
        for _ in range(iterations):
            started, started_cpu = time.perf_counter(), time.process_time()
            result = higgs_rs.quantize_tensor(matrix, threads=threads, **SPEC)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        assert result is not None
        out["tensors"][name] = {
            "shape": list(matrix.shape),
            "weights": matrix.numel(),
            "seconds": wall,
            "cpu_seconds": cpu,
            "bits_per_weight": result.bits_per_weight,
            "relative_mse": result.relative_mse,
        }
        del matrix, result
    return out


def child_checkpoint(directory: Path, out: Path, threads: int, copy_only: bool) -> dict[str, Any]:
    import higgs_rs

    baseline = vm_status()
    started, started_cpu = time.perf_counter(), time.process_time()
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
    return {
        "wall": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - started_cpu,
        "seconds": summary["seconds"],
        "quantized_weights": summary["quantized_weights"],
        "quantized": summary["quantized"],
        "relative_mse": summary.get("relative_mse", {}),
        "source_bytes": summary["source_bytes"],
        "output_bytes": summary["output_bytes"],
        "bits_per_weight": summary["bits_per_weight"],
        "baseline": baseline,
    }


CHILD_ENV = dict(os.environ)


def snapshot_package() -> tuple[str, Path]:
    """Copy the higgs_rs package (extension included) that imports now to a private directory.

    Every child imports that copy, so a rebuild of the shared tree during the benchmark (other
    people run `maturin develop` there) cannot mix builds within a run. Returns a description
    with the extension's SHA-256 prefix, to identify the build in the results, and the copy.
    """
    import hashlib
    import tempfile

    import higgs_rs

    package = Path(higgs_rs.__file__).parent
    snapshot = Path(tempfile.mkdtemp(prefix="pipeline_bench-"))
    shutil.copytree(package, snapshot / "higgs_rs", ignore=shutil.ignore_patterns("__pycache__"))
    CHILD_ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snapshot), os.environ.get("PYTHONPATH")]))
    extension = next((snapshot / "higgs_rs").glob("_core*.so"))
    digest = hashlib.sha256(extension.read_bytes()).hexdigest()[:16]
    print(f"using a snapshot of {package} in {snapshot} (extension sha256 {digest}...)")
    description = (
        f"`{package}` (copied to a private directory for the run; `{extension.name}` sha256 {digest}…)"
    )
    return description, snapshot


def run_child(args: list[str]) -> dict[str, Any]:
    """Run this script as a child; return its JSON result, its peak RSS and sampled memory peaks."""
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, text=True, env=CHILD_ENV
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


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def run_round(options: argparse.Namespace, number: int, quantized: list[tuple[str, int]]) -> dict[str, Any]:
    """One interleaved round: kernel timings, the checkpoint run, optionally the copy-only pass."""
    directory, threads = options.dir, options.threads
    load_before = os.getloadavg()[0]
    names = [TENSOR_NAME] + (
        [n for n in KERNEL_SHAPES.values() if n != TENSOR_NAME] if options.shape_mix else []
    )
    tensor = run_child(["_tensor", str(directory), str(threads), str(options.tensor_iterations), *names])
    pipeline = run_child(["_checkpoint", str(directory), str(options.out), str(threads), "0"])
    copy = None
    if options.copy_run:
        copy = run_child(["_checkpoint", str(directory), str(options.out), str(threads), "1"])
    kernels = tensor["tensors"]
    gate = kernels[TENSOR_NAME]
    r: dict[str, Any] = {
        "round": number,
        "load": (load_before, os.getloadavg()[0]),
        "tensor": tensor,
        "pipeline": pipeline,
        "copy": copy,
        "tensor_rate": gate["weights"] / min(gate["seconds"]) / 1e6,
        "tensor_cpu_rate": gate["weights"] / min(gate["cpu_seconds"]) / 1e6,
        "pipeline_rate": pipeline["quantized_weights"] / pipeline["seconds"] / 1e6,
        "pipeline_cpu_rate": pipeline["quantized_weights"] / pipeline["cpu_seconds"] / 1e6,
    }
    r["ratio"] = r["pipeline_rate"] / r["tensor_rate"]
    r["cpu_ratio"] = r["pipeline_cpu_rate"] / r["tensor_cpu_rate"]
    if options.shape_mix:
        # The kernel time of this checkpoint's exact mix of shapes, from the in-RAM timings.
        r["mix_seconds"] = sum(
            weights * min(kernels[kernel_shape(n)]["seconds"]) / kernels[kernel_shape(n)]["weights"]
            for n, weights in quantized
        )
        r["mix_cpu_seconds"] = sum(
            weights * min(kernels[kernel_shape(n)]["cpu_seconds"]) / kernels[kernel_shape(n)]["weights"]
            for n, weights in quantized
        )
        r["mix_ratio"] = r["mix_seconds"] / pipeline["seconds"]
        r["mix_cpu_ratio"] = r["mix_cpu_seconds"] / pipeline["cpu_seconds"]
    if copy is not None:
        # The embedding + head copy inside the checkpoint run, from the copy-only pass's bytes/s.
        r["copy_estimate"] = copy["seconds"] * EMBEDDING_BYTES / copy["source_bytes"]
        r["rate_without_copies"] = (
            pipeline["quantized_weights"] / (pipeline["seconds"] - r["copy_estimate"]) / 1e6
        )
    line = (
        f"round {number}: load {r['load'][0]:.1f}->{r['load'][1]:.1f}; quantize_tensor"
        f" {r['tensor_rate']:.1f} M w/s"
        f" ({r['tensor_cpu_rate']:.1f} per CPU-s); checkpoint {r['pipeline_rate']:.1f} M w/s"
        f" ({r['pipeline_cpu_rate']:.1f} per CPU-s, {pipeline['seconds']:.1f} s) = {pct(r['ratio'])}"
        f" (CPU {pct(r['cpu_ratio'])})"
    )
    if options.shape_mix:
        mix = f"{r['mix_seconds']:.1f} s = {pct(r['mix_ratio'])} (CPU {pct(r['mix_cpu_ratio'])})"
        line += f"; same-mix kernel {mix}"
    if copy is not None:
        line += f"; copy-only {copy['seconds']:.1f} s"
    print(line + f"; peak RSS {gb(pipeline['maxrss'])}", flush=True)
    return r


def shape_rates(rounds: list[dict[str, Any]], name: str) -> str:
    """Best wall and per-CPU-second rate of one timed matrix over the rounds."""
    runs = [r["tensor"]["tensors"][name] for r in rounds]
    wall = max(k["weights"] / min(k["seconds"]) for k in runs) / 1e6
    cpu = max(k["weights"] / min(k["cpu_seconds"]) for k in runs) / 1e6
    return f"{'×'.join(map(str, runs[0]['shape']))}: {wall:.1f} M w/s ({cpu:.1f} per CPU-s)"


def bench(options: argparse.Namespace) -> None:
    import higgs_rs

    directory: Path = options.dir
    if not (directory / "config.json").is_file():
        make_checkpoint(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    checkpoint_bytes = sum((directory / f).stat().st_size for f in shards)
    quantized = [
        (name, shape[0] * shape[1])
        for tensors in shard_layout()
        for name, shape in tensors
        if len(shape) == 2 and "embed" not in name and "lm_head" not in name
    ]
    build, snapshot = snapshot_package()
    try:
        rounds = [run_round(options, i + 1, quantized) for i in range(options.repeat)]
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)

    def best(key: str) -> float:
        return max(r[key] for r in rounds)

    ratio_of_bests = best("pipeline_rate") / best("tensor_rate")
    cpu_ratio_of_bests = best("pipeline_cpu_rate") / best("tensor_cpu_rate")
    pipeline_peak = max(r["pipeline"]["maxrss"] for r in rounds)
    anon_peak = max(r["pipeline"]["sampled_peaks"].get("RssAnon", 0) for r in rounds)
    file_peak = max(r["pipeline"]["sampled_peaks"].get("RssFile", 0) for r in rounds)
    baseline = rounds[0]["pipeline"]["baseline"].get("VmRSS", 0)
    tensor_peak = max(r["tensor"]["maxrss"] for r in rounds)
    p = rounds[0]["pipeline"]
    summary = (
        f"best of {len(rounds)}: quantize_tensor {best('tensor_rate'):.1f} M w/s, checkpoint"
        f" {best('pipeline_rate'):.1f} M w/s: {pct(ratio_of_bests)} (per CPU-s: {best('tensor_cpu_rate'):.1f}"
        f" vs {best('pipeline_cpu_rate'):.1f}, {pct(cpu_ratio_of_bests)})"
    )
    print(summary)
    print(
        f"checkpoint {gb(checkpoint_bytes)}, largest tensor {gb(LARGEST_TENSOR_BYTES)}: peak RSS"
        f" {gb(pipeline_peak)} (anon {gb(anon_peak)}, file-backed {gb(file_peak)}; after imports"
        f" {gb(baseline)})"
    )
    if options.markdown is None:
        return
    info = machine()
    loads = [x for r in rounds for x in r["load"]]
    command = "python " + " ".join([os.path.relpath(__file__, Path.cwd()), *sys.argv[1:]])
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
    rates = [f"{pct(r['ratio'])} (CPU {pct(r['cpu_ratio'])})" for r in rounds]
    lines = [
        "# Checkpoint pipeline: end-to-end throughput and peak memory",
        "",
        f"Machine: {info.get('Model name', '?')} ({info.get('Hypervisor vendor', 'bare metal')} VM),"
        f" {info['cpus']} CPUs ({info.get('Core(s) per socket', '?')} cores ×"
        f" {info.get('Thread(s) per core', '?')}"
        f" thread), AVX-512: {info.get('avx512', '?')}, {info['memory']} RAM; SIMD path"
        f" `{higgs_rs.simd_path()}`;"
        f" Python {info['python']}; release build of the extension, package {build}.",
        "",
        f"**Shared machine**: other jobs were running; 1-min load average {min(loads):.1f}–{max(loads):.1f}"
        " on"
        f" {info['cpus']} CPUs during the runs. Absolute rates are depressed and noisy. The ratios compare"
        " runs"
        " interleaved in the same round; the per-CPU-second rates (user + system time of the process, all"
        " threads)"
        " do not depend on the share of the CPUs a run got, so their ratio is the steadier one here.",
        "",
        f"Command: `{command}`",
        "",
        f"Checkpoint: `{directory}` from `pipeline_bench.py make`: Llama-3-8B shapes, {LAYERS} decoder"
        " layers,"
        f" random bf16 (N(0,1) × {INIT_STD}, seed {BASE_SEED}), {len(shards)} shards + index + config.json,"
        f" {gb(checkpoint_bytes)}; {p['quantized']} linear weights quantized"
        f" ({p['quantized_weights'] / 1e6:.1f} M"
        f" weights, {gb(2 * p['quantized_weights'])}); embedding, lm_head and norms copied"
        f" ({gb(EMBEDDING_BYTES)} of it the two 128256 × 4096 tensors).",
        f"Spec (both paths): 4 bits, p = 2 (n = 256), g = 64, whole-row Hadamard (4096 / 14336), seed 0;"
        f" {p['bits_per_weight']:.4f} bits/weight stored. Threads: {options.threads}. Output: `{options.out}`"
        f" ({gb(p['output_bytes'])}, fsynced by the writer). The source is in the page cache (warm) after"
        " round 1.",
        "",
        "## Throughput (M quantized weights / s)",
        "",
        "`quantize_tensor`: one 14336 × 4096 bf16 matrix (`gate_proj`) held in RAM, best of"
        f" {options.tensor_iterations} per round. `quantize_checkpoint`: the whole checkpoint end to end"
        " (open, plan, quantize, copy the embeddings, write + fsync the shards, config), counting only the"
        " quantized weights; its own `seconds`.",
        "",
        "| round | load | `quantize_tensor` wall | per CPU-s | `quantize_checkpoint` wall | per CPU-s |"
        " ratio wall |"
        " ratio CPU |"
        + (" same-mix kernel s | mix ratio wall | mix ratio CPU |" if options.shape_mix else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if options.shape_mix else ""),
    ]
    for r in rounds:
        row = (
            f"| {r['round']} | {r['load'][0]:.1f}→{r['load'][1]:.1f} | {r['tensor_rate']:.1f} |"
            f" {r['tensor_cpu_rate']:.1f} | {r['pipeline_rate']:.1f} ({r['pipeline']['seconds']:.1f} s) |"
            f" {r['pipeline_cpu_rate']:.1f} ({r['pipeline']['cpu_seconds']:.1f} CPU-s) | {pct(r['ratio'])} |"
            f" {pct(r['cpu_ratio'])} |"
        )
        if options.shape_mix:
            row += f" {r['mix_seconds']:.1f} | {pct(r['mix_ratio'])} | {pct(r['mix_cpu_ratio'])} |"
        lines.append(row)
    lines += [
        "",
        f"**Best of {len(rounds)}**: `quantize_tensor` {best('tensor_rate'):.1f} M weights/s,"
        " `quantize_checkpoint`"
        f" {best('pipeline_rate'):.1f} M weights/s: **{pct(ratio_of_bests)}**. Per CPU-second:"
        f" {best('tensor_cpu_rate'):.1f} vs {best('pipeline_cpu_rate'):.1f}: **{pct(cpu_ratio_of_bests)}**."
        f" Per round: {', '.join(rates)}; median wall ratio"
        f" {pct(statistics.median(r['ratio'] for r in rounds))}.",
        "",
    ]
    if options.shape_mix:
        kernels = rounds[0]["tensor"]["tensors"]
        lines += [
            "Same-mix kernel: the checkpoint's quantized weights are not all 14336 × 4096; their"
            " `quantize_tensor`"
            " time, from in-RAM timings of one matrix per shape ("
            + ", ".join(shape_rates(rounds, n) for n in kernels)
            + ", best of the rounds), summed over the checkpoint's tensors; mix ratio = that time / the"
            " checkpoint run's time. What the mix ratio misses of 100% is the pipeline's own cost (I/O,"
            " copies).",
            "",
        ]
    if options.copy_run:
        lines += [
            'Copy-only pass (`skip=[""]`: every tensor copied, nothing quantized), and the embedding +'
            " lm_head copy"
            " inside the checkpoint run estimated from its bytes/s:",
            "",
            "| round | copy-only pass | est. embedding + head copy | checkpoint rate without it |",
            "|---|---|---|---|",
        ]
        for r in rounds:
            c = r["copy"]
            lines.append(
                f"| {r['round']} | {c['seconds']:.1f} s ({c['source_bytes'] / c['seconds'] / 1e9:.2f} GB/s,"
                f" {c['cpu_seconds']:.1f} CPU-s) | {r['copy_estimate']:.1f} s |"
                f" {r['rate_without_copies']:.1f} M w/s |"
            )
        lines.append("")
    checks = ", ".join(
        f"{r['tensor']['tensors'][TENSOR_NAME]['relative_mse']:.6f} /"
        f" {r['pipeline']['relative_mse'].get(TENSOR_NAME, float('nan')):.6f}"
        for r in rounds
    )
    lines += [
        f"Same spec check, relative MSE of `{TENSOR_NAME}` from `quantize_tensor` / `quantize_checkpoint`"
        f" per round (equal when both ran the same build and spec): {checks}.",
        "",
        "## Peak memory",
        "",
        "| | bytes |",
        "|---|---|",
        f"| checkpoint on disk | {gb(checkpoint_bytes)} |",
        f"| largest tensor (embedding / lm_head, copied) | {gb(LARGEST_TENSOR_BYTES)} |",
        f"| largest quantized tensor (gate/up/down, bf16) | {gb(INTERMEDIATE * HIDDEN * 2)} |",
        f"| `quantize_checkpoint` child, RSS after imports | {gb(baseline)} |",
        "| `quantize_checkpoint` child, peak RSS (`wait4` ru_maxrss, max of rounds) |"
        f" **{gb(pipeline_peak)}** |",
        f"| — sampled every 20 ms: peak anonymous memory | {gb(anon_peak)} |",
        f"| — sampled every 20 ms: peak file-backed (mmap'd source pages) | {gb(file_peak)} |",
        f"| `quantize_tensor` child (torch imported, matrices in RAM), peak RSS | {gb(tensor_peak)} |",
    ]
    if options.copy_run:
        copy_peak = max(r["copy"]["maxrss"] for r in rounds)
        copy_file = max(r["copy"]["sampled_peaks"].get("RssFile", 0) for r in rounds)
        lines.append(f"| copy-only pass: peak RSS (file-backed) | {gb(copy_peak)} ({gb(copy_file)}) |")
    lines.append("")
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
            result = child_tensor(Path(rest[0]), int(rest[1]), int(rest[2]), rest[3:])
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
    parser.add_argument(
        "--tensor-iterations", type=int, default=1, help="quantize_tensor runs per shape per round"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--no-shape-mix", dest="shape_mix", action="store_false", help="time only 14336 × 4096"
    )
    parser.add_argument(
        "--no-copy-run", dest="copy_run", action="store_false", help="skip the copy-only pass"
    )
    parser.add_argument("--markdown", help="write the results here")
    options = parser.parse_args()
    if options.command == "make":
        make_checkpoint(options.dir)
    else:
        bench(options)


if __name__ == "__main__":
    main()
