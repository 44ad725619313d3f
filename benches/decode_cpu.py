"""Whole-model CPU inference: SmolLM2-135M 4-bit HIGGS (``higgs_rs.load``) vs the same model in
torch bf16 and f32, on the same threads, in one run.

    python benches/decode_cpu.py [--threads 2] [--new-tokens 64] [--repeats 5]

- decode: greedy, a fixed prompt, KV cache; tokens/s of the ``new_tokens`` steps after the
  prompt's forward pass (a hand-written loop, so only the decode steps are timed).
- prefill: one forward pass over 128 and 512 tokens of WikiText-2 (no cache); tokens/s.
- peak RSS (``ru_maxrss``) of loading each model in a fresh subprocess, and of the same
  subprocess importing torch + transformers + higgs_rs without loading a model (the baseline).

Models are timed interleaved (A, B, C, A, B, C, ...) after a warm-up, and medians are reported,
so load from other processes hits every model alike. Results go into
``benches/results/decode_cpu.json`` under the thread count (a run with ``--threads 1`` and one
with ``--threads 2`` fill both). On a machine shared with other work, 2-thread numbers swing
with the neighbours' load (torch's OpenMP threads wait for a descheduled peer at every
parallel region); 1-thread numbers are the steadier comparison, so report both.

Rows: ``higgs4`` (``higgs_rs.load(..., dtype=torch.float32)``: f32 activations), ``higgs4-bf16``
(``higgs_rs.load(..., dtype=torch.bfloat16)``, the CPU default: bf16 activations and plain
weights, bf16-precision LUT), ``bf16`` and ``f32`` (the original model in transformers).
Opt-in: ``higgs4-bf16-noteam``, the same ``higgs4-bf16`` model (the same object) with the LUT
products kept off torch's OpenMP team (``_core.cpu_openmp_settings(enabled=False)``: on the
calling thread, as before the team), for an interleaved A/B in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"

# Runs in a fresh interpreter: import what every variant needs (the model's code too), then reset
# the peak-RSS mark (the imports alone touch ~2 GB of torch's shared libraries, which would hide
# every model in ru_maxrss), load
# one model, run one forward pass (mapped weights are read on first use) and report (MiB): RSS
# after the imports, peak RSS during the load (VmHWM), RSS after it, peak RSS through the first
# forward pass, and ru_maxrss (the same peak, as getrusage sees it).
RSS_SNIPPET = """
import resource, sys, torch, transformers, higgs_rs, higgs_rs.torch as ht
import transformers.models.llama.modeling_llama  # the model code, imported by every variant
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
kind, path = sys.argv[1], sys.argv[2]
if kind == "higgs4":
    model = higgs_rs.load(path, dtype=torch.float32)
elif kind == "higgs4-bf16":
    model = higgs_rs.load(path, dtype=torch.bfloat16)
elif kind == "bf16":
    model = ht.load_plain(path, dtype=torch.bfloat16)
elif kind == "f32":
    model = ht.load_plain(path, dtype=torch.float32)
loaded = status("VmHWM"), status("VmRSS")
# Loaders map the files and read pages on first use: one forward pass touches every weight.
with torch.inference_mode():
    model(torch.arange(1, 17)[None])
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(before, *loaded, status("VmHWM"), maxrss)
"""


def peak_rss_mib(kind: str, path: Path, threads: int) -> dict[str, float]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, "-c", RSS_SNIPPET, kind, str(path)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    before, peak, after, peak_run, maxrss = map(float, out.stdout.split()[-5:])
    return {
        "rss_after_imports": before,
        "peak_rss_during_load": peak,
        "rss_after_load": after,
        "peak_rss_load_and_first_forward": peak_run,
        "peak_minus_imports": peak_run - before,
        "ru_maxrss": maxrss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--models", nargs="*", default=["higgs4-bf16", "higgs4", "bf16", "f32"])
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--json", type=Path, default=ROOT / "benches" / "results" / "decode_cpu.json")
    args = parser.parse_args()

    # The Rust (rayon) global pool reads this when first used; torch gets the same count.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers import AutoTokenizer

    import higgs_rs
    from higgs_rs import _core, models
    from higgs_rs.torch import load_plain

    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    bf16_dir = models.smollm2()
    higgs_dir = bf16_dir.parent / "SmolLM2-135M-Instruct-higgs4"
    if not (higgs_dir / "config.json").is_file():
        # The checkpoint `higgs-rs demo` makes: 4 bits, p = 2, whole-row Hadamard, scale per 64.
        higgs_rs.quantize_checkpoint(bf16_dir, higgs_dir, bits=4, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(bf16_dir))

    loaders = {
        "higgs4": lambda: higgs_rs.load(higgs_dir, dtype=torch.float32),
        "higgs4-bf16": lambda: higgs_rs.load(higgs_dir, dtype=torch.bfloat16),
        "higgs4-bf16-noteam": lambda: loaded.get("higgs4-bf16") or loaders["higgs4-bf16"](),
        "bf16": lambda: load_plain(bf16_dir, dtype=torch.bfloat16),
        "f32": lambda: load_plain(bf16_dir, dtype=torch.float32),
    }
    loaded: dict[str, torch.nn.Module] = {}
    for name in args.models:
        loaded[name] = loaders[name]()

    def use_team(name: str) -> None:
        """LUT products on torch's OpenMP team (attached on the first CPU call), except for the
        ``-noteam`` row; a no-op where no team is attached."""
        _core.cpu_openmp_settings(enabled=not name.endswith("-noteam"))

    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    text_ids = tokenizer(models.wikitext2_path().read_text()[:20000], return_tensors="pt").input_ids
    if text_ids.shape[1] < max(args.prefill, default=0):
        raise SystemExit(f"the WikiText-2 excerpt gives only {text_ids.shape[1]} tokens")

    @torch.inference_mode()
    def decode(model: torch.nn.Module) -> tuple[float, list[int]]:
        out = model(prompt_ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens = [int(token)]
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        return args.new_tokens / (time.perf_counter() - start), tokens

    @torch.inference_mode()
    def prefill(model: torch.nn.Module, length: int) -> float:
        ids = text_ids[:, :length]
        start = time.perf_counter()
        model(ids, use_cache=False)
        return length / (time.perf_counter() - start)

    # Warm-up: one short decode and one prefill per model and length.
    for name, model in loaded.items():
        use_team(name)
        with torch.inference_mode():
            model(prompt_ids, use_cache=False)
        for length in args.prefill:
            prefill(model, length)
    samples: dict[str, dict[str, list[float]]] = {
        name: {"decode": [], **{f"prefill{length}": [] for length in args.prefill}} for name in loaded
    }
    texts: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, model in loaded.items():
            use_team(name)
            rate, tokens = decode(model)
            samples[name]["decode"].append(rate)
            texts[name] = tokenizer.decode(tokens)
        for length in args.prefill:
            for name, model in loaded.items():
                use_team(name)
                samples[name][f"prefill{length}"].append(prefill(model, length))

    rss: dict[str, dict[str, float]] = {}
    if not args.no_rss:
        paths = {"higgs4": higgs_dir, "higgs4-bf16": higgs_dir, "bf16": bf16_dir, "f32": bf16_dir}
        for name in args.models:
            kind = name.removesuffix("-noteam")  # the same model: the same memory
            rss[name] = rss[kind] if kind in rss else peak_rss_mib(kind, paths[kind], args.threads)

    medians = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    reference = "bf16" if "bf16" in medians else next(iter(medians))
    metrics = list(next(iter(medians.values())))
    width = max(8, *map(len, medians))
    header = f"{'model':>{width}} " + " ".join(f"{m + ' tok/s':>16} {'×' + reference:>7}" for m in metrics)
    if rss:
        header += f" {'peak RSS MiB load+1st forward (over imports)':>45}"
    print(header)
    for name, values in medians.items():
        line = f"{name:>{width}} " + " ".join(
            f"{values[m]:>16.1f} {values[m] / medians[reference][m]:>7.2f}" for m in metrics
        )
        if rss:
            r = rss[name]
            line += f" {r['peak_rss_load_and_first_forward']:>34.0f} ({r['peak_minus_imports']:>+6.0f})"
        print(line)
    if rss:
        print(f"RSS after the imports alone: {next(iter(rss.values()))['rss_after_imports']:.0f} MiB")
    load = os.getloadavg()
    print(
        f"threads {args.threads}, {args.repeats} interleaved repeats, "
        f"load average {load_at_start[0]:.2f} at start, {load[0]:.2f} at end"
    )
    for name, text in texts.items():
        print(f"{name}: {text[:120]!r}")

    result: dict[str, Any] = {
        "load_average_at_start": load_at_start,
        "command": "python benches/decode_cpu.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": _cpu_name(),
            "logical_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "higgs_rs": higgs_rs.__version__,
            "load_average_at_end": load,
        },
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "prompt_tokens": int(prompt_ids.shape[1]),
        "repeats": args.repeats,
        "medians_tokens_per_s": medians,
        "ratios_vs_" + reference: {
            name: {m: values[m] / medians[reference][m] for m in metrics} for name, values in medians.items()
        },
        "samples_tokens_per_s": samples,
        "peak_rss_mib": rss,
        "greedy_text": texts,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    by_threads = previous.get("by_threads", {}) if isinstance(previous, dict) else {}
    by_threads[str(args.threads)] = result
    args.json.write_text(json.dumps({"by_threads": by_threads}, indent=2) + "\n")
    print(f"wrote {args.json}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
