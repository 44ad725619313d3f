"""Perplexity of a causal LM on a text (WikiText-2 by default): the quality check of every method.

The text is tokenized whole; the first ``windows × seq_len`` tokens are cut into non-overlapping
windows; perplexity is exp of the mean next-token loss over all predicted tokens. Every method in
this project (and every peer in ``benches/compare.py``) is measured with this one function.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

PathLike = str | os.PathLike[str]


def tokenize_windows(tokenizer: Any, text: str, seq_len: int, windows: int) -> torch.Tensor:
    """``windows × seq_len`` token ids from the start of ``text`` (fewer windows if the text is short)."""
    if seq_len < 2 or windows < 1:
        raise ValueError(f"seq_len must be >= 2 and windows >= 1; got {seq_len}, {windows}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    count = min(windows, available)
    return ids[: count * seq_len].reshape(count, seq_len)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) of ``model`` over the rows of ``tokens`` (windows × seq_len)."""
    device = next(model.parameters()).device
    total_nll, total_count = 0.0, 0
    batches = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    for start in batches:
        batch = tokens[start : start + batch_size].to(device)
        logits = model(batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_count += batch[:, 1:].numel()
    return math.exp(total_nll / total_count)


def load_text(path: PathLike | None = None) -> str:
    """The evaluation text (default: WikiText-2 test, see ``higgs_rs.models.wikitext2_path``)."""
    from .models import wikitext2_path

    file = Path(path) if path is not None else wikitext2_path()
    # Bytes as stored (CRLF kept): tokenization depends on them.
    return file.read_bytes().decode("utf-8")


def evaluate_dir(
    model_dir: PathLike,
    text: PathLike | None = None,
    seq_len: int = 512,
    windows: int = 32,
    progress: bool = False,
    lut_kernels: bool = False,
) -> float:
    """Perplexity of a checkpoint directory: a plain transformers model or a HIGGS checkpoint.

    A HIGGS checkpoint is dequantized into ordinary linear layers (fast, the same numbers up to
    float rounding), or with ``lut_kernels`` run through ``HiggsLinear`` on the codes.
    """
    from transformers import AutoTokenizer

    from .torch import is_higgs_checkpoint, load, load_dequantized, load_plain

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if is_higgs_checkpoint(model_dir):
        model = load(model_dir, dtype=torch.float32) if lut_kernels else load_dequantized(model_dir)
    else:
        model = load_plain(model_dir)
    tokens = tokenize_windows(tokenizer, load_text(text), seq_len, windows)
    return perplexity(model, tokens, progress=progress)
