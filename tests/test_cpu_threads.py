"""The CPU LUT products on torch's OpenMP team: torch's own runtime is the one attached (not
another libgomp in the process), and outputs do not change with the team, its size, or torch's
thread count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import higgs_rs
from higgs_rs import _core

torch = pytest.importorskip("torch")
from higgs_rs import torch as higgs_torch  # noqa: E402
from higgs_rs.torch import HiggsLinear  # noqa: E402

OPENMP_BACKEND = "parallel backend: OpenMP" in torch.__config__.parallel_info()
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not OPENMP_BACKEND,
    reason="the OpenMP team is attached on Linux with torch's OpenMP backend only",
)


def mapped_libraries(fragment: str) -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if fragment in line.split()[-1].rsplit("/", 1)[-1]}


def layer(rows: int, cols: int, seed: int = 0) -> HiggsLinear:
    w = np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)
    return HiggsLinear.from_quantized(higgs_rs.quantize_tensor(w, bits=4, p=2, group_size=64, seed=seed))


def test_torchs_own_runtime_is_attached() -> None:
    # A second copy of libgomp in the process (sentencepiece ships one, renamed), loaded first
    # where the package is installed: the first libgomp in /proc/self/maps would be the wrong one.
    pytest.importorskip("sentencepiece")
    torch.ones(1 << 16).add_(1)  # make sure torch's runtime is loaded and used
    layer(64, 576)(torch.randn(1, 576))  # builds a plan: attaches
    attached = higgs_torch._attach_torch_openmp()
    assert attached, "no OpenMP runtime was attached"
    # The runtime libtorch_cpu itself links: in torch's lib directory (pip wheels).
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    assert Path(attached).resolve().parent == torch_lib, (attached, mapped_libraries("gomp"))
    enabled, min_work = _core.cpu_openmp_settings()
    assert enabled and min_work > 0


def test_attach_refuses_a_library_that_is_not_loaded(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="not loaded"):
        _core.cpu_openmp_attach(tmp_path / "libgomp.so.1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_same_bits_with_and_without_the_team(dtype: torch.dtype) -> None:
    if not higgs_torch._attach_torch_openmp():
        pytest.skip("no OpenMP runtime attached")
    threads_before = torch.get_num_threads()
    settings_before = _core.cpu_openmp_settings()
    layers = [layer(576, 576, 1), layer(1536, 576, 2), layer(576, 1536, 3), layer(40, 576, 4)]
    try:
        for batch in [1, 3, 30]:  # 30: the batched path (dequantized weights, torch's GEMM)
            for lin in layers:
                generator = torch.Generator().manual_seed(batch)
                x = torch.randn(batch, lin.in_features, generator=generator).to(dtype)
                outputs = {}
                for threads in [1, 2, 3]:
                    for enabled in [False, True]:
                        torch.set_num_threads(threads)
                        _core.cpu_openmp_settings(enabled=enabled, min_work=0)
                        with torch.inference_mode():
                            out = lin(x)
                        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
                        outputs[threads, enabled] = out.view(bits)
                # Our part never depends on the team; torch's GEMM (batch 30) may on its thread
                # count, so there only the same count is compared.
                for (threads, _), out in outputs.items():
                    reference = outputs[threads if batch >= higgs_torch.CPU_GEMM_MIN_BATCH else 1, False]
                    assert torch.equal(out, reference), (lin, batch, threads)
    finally:
        torch.set_num_threads(threads_before)
        _core.cpu_openmp_settings(enabled=settings_before[0], min_work=settings_before[1])


def test_switched_off_by_the_environment() -> None:
    # A fresh interpreter: the attach happens once per process.
    import subprocess

    code = (
        "import torch, numpy as np, higgs_rs\n"
        "from higgs_rs import _core, torch as ht\n"
        "w = np.random.default_rng(0).standard_normal((64, 576), dtype=np.float32)\n"
        "ht.HiggsLinear.from_quantized(higgs_rs.quantize_tensor(w, bits=4))(torch.randn(1, 576))\n"
        "print(repr(ht._attach_torch_openmp()), _core.cpu_openmp_settings()[0])\n"
    )
    env = dict(os.environ, HIGGS_CPU_OPENMP="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["''", "False"]
