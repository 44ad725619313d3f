"""Whole checkpoints: quantize the SmolLM2-135M test model, read it back, run it, evaluate it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import higgs_rs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from higgs_rs import models

    try:
        return models.smollm2()
    except FileNotFoundError as err:
        pytest.fail(f"the test model is missing: {err}")


@pytest.fixture(scope="module")
def quantized(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("higgs") / "smollm2-higgs4"
    higgs_rs.quantize_checkpoint(smollm2, dst, bits=4, p=2, progress=False)
    return dst


def test_output_layout_and_bits(smollm2: Path, quantized: Path) -> None:
    from safetensors import safe_open

    config = json.loads((quantized / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "higgs_rs" and qc["format_version"] == 1
    modules = qc["modules"]
    # 7 linear layers in each of the 30 decoder blocks; embeddings, norms kept.
    assert len(modules) == 7 * 30
    assert modules["model.layers.0.mlp.down_proj"]["hadamard_size"] == 1536
    assert modules["model.layers.0.self_attn.q_proj"]["padded_in_features"] == 576
    assert qc["bits_per_weight"] == pytest.approx(4.25)
    with (
        safe_open(str(quantized / "model.safetensors"), "pt") as out,
        safe_open(str(smollm2 / "model.safetensors"), "pt") as src,
    ):
        keys = set(out.keys())
        assert "model.layers.0.mlp.up_proj.higgs_codes" in keys
        assert "model.layers.0.mlp.up_proj.weight" not in keys
        assert "higgs.grid.p2_n256_v1" in keys and "higgs.signs" in keys
        for name in (
            "model.embed_tokens.weight",
            "model.norm.weight",
            "model.layers.3.input_layernorm.weight",
        ):
            assert torch.equal(out.get_tensor(name), src.get_tensor(name)), name
    assert (quantized / "tokenizer.json").is_file()
    assert not list(quantized.glob(".*tmp*"))


def test_same_bytes_any_thread_count(smollm2: Path, quantized: Path, tmp_path: Path) -> None:
    again = tmp_path / "one-thread"
    higgs_rs.quantize_checkpoint(smollm2, again, bits=4, p=2, threads=1, progress=False)
    assert (again / "model.safetensors").read_bytes() == (quantized / "model.safetensors").read_bytes()
    assert (again / "config.json").read_bytes() == (quantized / "config.json").read_bytes()


def test_refuses_to_overwrite_and_dry_run_writes_nothing(
    smollm2: Path, quantized: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="overwrite"):
        higgs_rs.quantize_checkpoint(smollm2, quantized, bits=4, progress=False)
    plan = higgs_rs.quantize_checkpoint(smollm2, tmp_path / "none", bits=3, p=1, dry_run=True)
    assert "model.layers.29.mlp.down_proj.weight" in plan["plan"]
    assert plan["bits_per_weight"] == pytest.approx(3.25)
    assert not (tmp_path / "none").exists()


def test_dequantized_model_quality_and_lut_model_agree(smollm2: Path, quantized: Path) -> None:
    from transformers import AutoTokenizer

    from higgs_rs.eval import load_text, perplexity, tokenize_windows
    from higgs_rs.torch import load_plain

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    tokens = tokenize_windows(tokenizer, load_text(), seq_len=256, windows=2)
    reference = perplexity(load_plain(smollm2), tokens)
    dequantized = higgs_rs.load_dequantized(quantized)
    ppl = perplexity(dequantized, tokens)
    # 4.25-bit HIGGS costs a few percent of perplexity on this model (ARCHITECTURE.md: 28.1 -> 35.3
    # at 32 windows); far more means a broken format.
    assert reference < ppl < reference * 1.5, (reference, ppl)
    lut = higgs_rs.load(quantized, dtype=torch.float32)
    with torch.no_grad():
        a = dequantized(tokens[:1, :64]).logits
        b = lut(tokens[:1, :64]).logits
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-3)


def test_cli_quantize_and_eval(
    smollm2: Path, quantized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from higgs_rs.cli import main

    dst = tmp_path / "cli"
    assert main(["quantize", str(smollm2), str(dst), "--bits", "2", "--p", "2", "--quiet"]) == 0
    assert "bits/weight" in capsys.readouterr().out
    assert main(["eval", str(dst), "--windows", "1", "--seq-len", "128", "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "x"), "--quiet"]) == 2


def test_patch_in_memory_equals_the_checkpoint(smollm2: Path, quantized: Path) -> None:
    from higgs_rs.torch import HiggsLinear, load_plain

    patched = higgs_rs.patch(load_plain(smollm2), bits=4, p=2)
    layer = patched.model.layers[0].mlp.down_proj
    assert isinstance(layer, HiggsLinear)
    loaded = higgs_rs.load(quantized, dtype=torch.float32)
    assert torch.equal(layer.codes, loaded.model.layers[0].mlp.down_proj.codes)
    ids = torch.tensor([[1, 504, 3458, 314, 4649, 253]])
    with torch.no_grad():
        np.testing.assert_allclose(
            patched(ids).logits.numpy(), loaded(ids).logits.numpy(), rtol=1e-4, atol=1e-4
        )


def test_generate_and_demo_run(quantized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from higgs_rs.cli import main

    assert (
        main(["generate", str(quantized), "--prompt", "The capital of France is", "--max-new-tokens", "4"])
        == 0
    )
    assert capsys.readouterr().out.startswith("The capital of France is")
    args = [
        "demo",
        "--windows",
        "1",
        "--seq-len",
        "128",
        "--max-new-tokens",
        "4",
        "--output",
        str(tmp_path / "d"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "HIGGS" in out and (tmp_path / "d" / "config.json").is_file()


def test_checkpoint_tensors_are_views_of_the_mapped_file(quantized: Path, tmp_path: Path) -> None:
    import struct

    from safetensors import safe_open

    from higgs_rs.checkpoint import HiggsCheckpoint

    ckpt = HiggsCheckpoint(quantized)
    name = next(n for n in ckpt.keys() if n.endswith(".higgs_codes"))
    with safe_open(str(quantized / "model.safetensors"), framework="pt") as f:
        expected = f.get_tensor(name)
    got = ckpt.get(name)
    assert torch.equal(got, expected) and got.dtype == expected.dtype
    # Two reads of one tensor share the mapping (no copy per read).
    assert got.data_ptr() == ckpt.get(name).data_ptr()
    # A header whose offsets run past the data is refused, naming the file and the tensor.
    header = {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((quantized / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(higgs_rs.HiggsFormatError, match="tensor 't'"):
        HiggsCheckpoint(bad).get("t")
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + raw)
    with pytest.raises(higgs_rs.HiggsFormatError, match="past the file end"):
        HiggsCheckpoint(bad)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
def test_load_defaults_to_the_checkpoint_dtype_on_cpu(tmp_path: Path, stored: torch.dtype) -> None:
    """``load`` on the CPU keeps a float32 checkpoint in float32 and runs bf16 (and fp16, slow on
    CPUs) checkpoints in bfloat16; an explicit ``dtype`` wins."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    src, dst = tmp_path / "tiny", tmp_path / "tiny-higgs4"
    transformers.LlamaForCausalLM(config).to(stored).save_pretrained(src, safe_serialization=True)
    higgs_rs.quantize_checkpoint(src, dst, bits=4, p=2, progress=False)
    want = torch.float32 if stored == torch.float32 else torch.bfloat16
    model = higgs_rs.load(dst)
    assert model.model.embed_tokens.weight.dtype == want
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.dtype == want
    assert higgs_rs.load(dst, dtype=torch.float32).model.embed_tokens.weight.dtype == torch.float32
