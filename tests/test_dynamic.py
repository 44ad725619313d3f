"""Dynamic HIGGS: the knapsack allocator, the Python planner, and a mixed checkpoint end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

import higgs_rs
from higgs_rs import _core
from higgs_rs.dynamic import (
    ErrorTable,
    Option,
    allocate,
    parse_latency_budget,
    uniform_allocation,
)

# Relative MSE of HIGGS grids on Gaussian data (about what SmolLM2's layers show), per code bits.
GRID_MSE = {(2, 64): 0.029, (2, 256): 0.0076, (2, 1024): 0.0019}


def synthetic_table(layers: int, seed: int) -> tuple[ErrorTable, dict[str, float]]:
    """Layers of three shapes, three grids at group size 64, log-normal sensitivities."""
    rng = np.random.default_rng(seed)
    options = [Option(p, n, 64) for (p, n) in GRID_MSE]
    shapes, mse, bits, alphas = {}, {}, {}, {}
    for i in range(layers):
        name = f"layer{i}.weight"
        rows, cols = [(576, 576), (192, 576), (1536, 576), (576, 1536)][i % 4]
        shapes[name] = (rows, cols)
        jitter = rng.uniform(0.9, 1.1)
        mse[name] = [GRID_MSE[(o.p, o.n)] * jitter for o in options]
        bits[name] = [_core.stored_bits(rows, cols, o.p, o.n, None, o.group_size) for o in options]
        alphas[name] = float(rng.lognormal(0.0, 1.0))
    return ErrorTable(options, shapes, mse, bits), alphas


def test_stored_bits_match_the_codec() -> None:
    weights = np.random.default_rng(0).standard_normal((40, 576)).astype(np.float32)
    for p, n, g in [(2, 256, 64), (2, 64, 32), (1, 64, 128), (2, 1024, 64)]:
        q = higgs_rs.quantize_tensor(weights, bits=math.log2(n) / p, p=p, group_size=g)
        assert _core.stored_bits(40, 576, p, n, None, g) == round(q.bits_per_weight * 40 * 576)


def test_allocator_is_exact_on_small_instances() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        layers = int(rng.integers(1, 6))
        costs = [[int(c) for c in rng.integers(1, 30, size=int(rng.integers(1, 4)))] for _ in range(layers)]
        errors = [[float(e) for e in rng.uniform(0, 1, size=len(c))] for c in costs]
        budget = sum(min(c) for c in costs) + int(rng.integers(0, 40))
        result = _core.allocate(costs, errors, budget)
        best = min(
            sum(errors[i][k] for i, k in enumerate(pick))
            for pick in itertools.product(*[range(len(c)) for c in costs])
            if sum(costs[i][k] for i, k in enumerate(pick)) <= budget
        )
        assert result["exact"]
        assert result["cost"] <= budget
        assert result["error"] == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert result["lower_bound"] <= best + 1e-12


def test_allocator_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="below the cheapest"):
        _core.allocate([[10, 20]], [[1.0, 0.5]], 5)
    with pytest.raises(ValueError, match="same shape"):
        _core.allocate([[10, 20]], [[1.0]], 50)
    with pytest.raises(ValueError, match="not finite"):
        _core.allocate([[10]], [[math.nan]], 50)
    with pytest.raises(ValueError, match="go together"):
        _core.allocate([[10]], [[1.0]], 50, second_costs=[[1]])


def test_dynamic_beats_uniform_within_the_same_bits() -> None:
    table, alphas = synthetic_table(60, seed=2)
    uniform = uniform_allocation(table, alphas, Option(2, 256, 64))
    dynamic = allocate(table, alphas, bits_per_weight=uniform.bits_per_weight)
    assert dynamic.exact
    assert dynamic.bits_per_weight <= uniform.bits_per_weight
    assert dynamic.predicted_loss_increase < 0.9 * uniform.predicted_loss_increase
    assert len({o.n for o in dynamic.choices.values()}) >= 2
    # Tighter budgets cost predicted error, never bits beyond the budget.
    previous = 0.0
    for budget in (5.0, 4.5, 4.0, 3.5):
        a = allocate(table, alphas, bits_per_weight=budget)
        assert a.bits_per_weight <= budget
        assert a.predicted_loss_increase >= previous
        previous = a.predicted_loss_increase
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(table, alphas, bits_per_weight=3.0)


def test_overrides_name_every_layer_with_the_chosen_spec() -> None:
    table, alphas = synthetic_table(8, seed=3)
    overrides = allocate(table, alphas, bits_per_weight=4.5).overrides()
    assert set(overrides) == set(table.shapes)
    for bits, p, hadamard, group in overrides.values():
        assert (p, 2 ** round(bits * p)) in GRID_MSE and hadamard is None and group == 64


def test_latency_budget_is_respected() -> None:
    table, alphas = synthetic_table(40, seed=4)
    # Pretend the 10-bit grid is slow and the 6-bit one fast (per shape, seconds).
    latencies = {
        (rows, cols): [t * rows * cols / 576**2 for t in (1e-5, 1.2e-5, 4e-5)]
        for rows, cols in set(table.shapes.values())
    }
    free = allocate(table, alphas, bits_per_weight=6.0, latency_budget=1.0, latencies=latencies)
    assert free.latency is not None
    budget = 0.7 * free.latency
    fast = allocate(table, alphas, bits_per_weight=6.0, latency_budget=budget, latencies=latencies)
    assert fast.latency <= budget + 40 * 1e-8
    assert fast.bits_per_weight <= 6.0
    assert fast.predicted_loss_increase >= free.predicted_loss_increase
    only_latency = allocate(table, alphas, latency_budget=budget, latencies=latencies)
    assert only_latency.latency <= budget + 40 * 1e-8
    assert only_latency.exact
    # Without a bits budget the latency-only answer is at least as good as the two-budget one.
    assert only_latency.predicted_loss_increase <= fast.predicted_loss_increase + 1e-12


def test_parse_latency_budget() -> None:
    assert parse_latency_budget("0.9x") == (0.9, True)
    assert parse_latency_budget("4ms") == (pytest.approx(0.004), False)
    assert parse_latency_budget("800us") == (pytest.approx(8e-4), False)
    assert parse_latency_budget("0.002") == (0.002, False)
    for bad in ("fast", "-1ms", "0x"):
        with pytest.raises(ValueError):
            parse_latency_budget(bad)


# --- end to end on SmolLM2-135M: only block 0 quantized, so it stays fast --------------------

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

#: Keep blocks 1..29 as they are: substrings "layers.1." ... "layers.29.".
SKIP_ALL_BUT_BLOCK_0 = [f"layers.{i}." for i in range(1, 30)]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from higgs_rs import models

    try:
        return models.smollm2()
    except FileNotFoundError as err:
        pytest.fail(f"the test model is missing: {err}")


@pytest.fixture()
def short_text(tmp_path: Path) -> Path:
    from higgs_rs.eval import load_text

    path = tmp_path / "calibration.txt"
    path.write_text(load_text()[:6000])
    return path


def test_cli_dynamic_writes_a_mixed_checkpoint_that_loads(
    smollm2: Path, short_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from higgs_rs.cli import main
    from higgs_rs.dynamic import measure_sensitivities, quantized_weights
    from higgs_rs.eval import load_text

    monkeypatch.setenv("HIGGS_RS_CACHE", str(tmp_path / "cache"))
    names = quantized_weights(smollm2, SKIP_ALL_BUT_BLOCK_0)
    assert len(names) == 7
    dst = tmp_path / "mixed"
    args = [
        "quantize",
        str(smollm2),
        str(dst),
        "--dynamic",
        "--bits",
        "4.5",
        "--quiet",
        "--calibration-text",
        str(short_text),
        "--calibration-windows",
        "1",
        "--calibration-seq-len",
        "48",
    ]
    for s in SKIP_ALL_BUT_BLOCK_0:
        args += ["--skip", s]
    assert main(args) == 0

    # The α's were cached under the (temporary) model cache, keyed by model, text and settings.
    cached = list((tmp_path / "cache" / "dynamic").glob("alphas-*.json"))
    assert len(cached) == 1
    sens = measure_sensitivities(smollm2, load_text(short_text), names=names, windows=1, seq_len=48)
    assert sens.alphas == json.loads(cached[0].read_text())["alphas"]
    assert all(math.isfinite(a) for a in sens.alphas.values())
    assert sum(sens.alphas.values()) > 0

    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    modules = qc["modules"]
    assert len(modules) == 7
    assert len({(m["p"], m["n"], m["group_size"]) for m in modules.values()}) >= 2, "not mixed"
    assert qc["bits_per_weight"] <= 4.5

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = higgs_rs.load_dequantized(dst)(ids).logits
        lut = higgs_rs.load(dst, dtype=torch.float32)(ids).logits
    assert torch.isfinite(lut).all()
    assert torch.allclose(plain, lut, atol=2e-2, rtol=1e-3)
