#!/usr/bin/env bash
# One device call: install the carried wheels (.whl/: higgs_rs built with `--features python,cuda`,
# higgs-kernels 0.4.0), print the kernels' register/spill report, run the CUDA tests, the tests
# under compute-sanitizer (reduced set), and the benchmark. Logs go to $OUT.
#   maturin build --release --features python,cuda -o .whl   (on the build machine)
#   device: [DETAILS=1] [VARIANTS=1] [BENCH_ARGS=...] bash benches/gpu_run.sh [quick]
#   (DETAILS: ptxas report, ncu sections; VARIANTS: batch <= 16 with each fast path switched off)
set -uo pipefail
MODE=${1:-}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/higgs-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, higgs_rs; print('torch', torch.__version__, '|', higgs_rs.cuda_status())" 2>&1 | tee -a "$OUT/gpu.txt"

if [ "${DETAILS:-0}" = 1 ]; then
echo "== ptxas report (nvcc on the image; the same sources NVRTC compiles)"
for cfg in "4 1 1" "4 1 2" "4 1 4" "4 1 8" "4 2 1" "4 2 2" "4 2 4" "4 2 8" "3 2 1" "2 2 1"; do
  set -- $cfg
  ( nvcc -arch=sm_90 -cubin -o /tmp/lut_$1_$2_$3.cubin -Xptxas -v -DBITS=$1 -DLUT_MT=$2 -DLUT_NT=$3 \
      -include src/cuda/kernels/common.cuh src/cuda/kernels/lut_gemm.cu 2>&1 \
      | grep -E "registers|spill" | sed "s/^/bits=$1 mt=$2 nt=$3: /" > /tmp/ptxas_$1_$2_$3.txt ) &
done
wait
cat /tmp/ptxas_*.txt | tee "$OUT/ptxas.txt"
fi

echo "== tests"
timeout 330 python3 -m pytest -p no:cacheprovider -q -rs tests/test_cuda.py tests/test_grouping.py tests/test_generate.py \
  tests/test_linear.py tests/test_norm.py tests/test_residual.py tests/test_rope.py 2>&1 | tee "$OUT/pytest.txt" | tail -25

if [ -n "${VARIANTS:-}" ]; then
echo "== batch <= 16 layers, kernel variants side by side (HIGGS_CUDA_GEMV / HIGGS_CUDA_TILE / ... switches)"
# VARIANT_LIST: ';'-separated environment settings, e.g. "HIGGS_CUDA_GEMV=0;HIGGS_CUDA_DEFINES=GEMV_D=4";
# several settings in one variant are separated by spaces ("HIGGS_CUDA_TILE=0 HIGGS_CUDA_PDL=0").
IFS=';' read -ra VLIST <<< "${VARIANT_LIST:-HIGGS_CUDA_TILE=0;default;HIGGS_CUDA_GEMV=0}"
for v in "${VLIST[@]}"; do
  echo "-- variant: $v"
  [ "$v" = default ] && v=
  env $v timeout 60 python3 benches/gpu_bench.py --quick --batches ${VARIANT_BATCHES:-1,4,16} --decode-layers 0 \
    2>&1 | grep -E '^\| [0-9]'
done
fi

echo "== benchmark"
timeout ${BENCH_TIMEOUT:-230} python3 benches/gpu_bench.py --out "$OUT/bench.json" ${MODE:+--$MODE} ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | grep -v '^{'

echo "== kernel durations under Nsight Compute (cold L2)"
timeout 120 ncu --clock-control none --csv -k regex:'hadamard_rotate|lut_mma|lut_gemv' \
  --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
  python3 benches/gpu_profile.py > "$OUT/ncu.csv" 2>&1
python3 - "$OUT/ncu.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    print(open(sys.argv[1]).read()[-3000:]); sys.exit()
head, data = rows[0], rows[1:]
ix = {k: i for i, k in enumerate(head)}
kernels = {}
for r in data:
    k = kernels.setdefault(r[ix["ID"]], {"name": r[ix["Kernel Name"]], "grid": r[ix["Grid Size"]], "block": r[ix["Block Size"]]})
    k[r[ix["Metric Name"]]] = f'{r[ix["Metric Value"]]} {r[ix["Metric Unit"]]}'
for i, k in kernels.items():
    print(i, k["name"], "grid", k["grid"], "block", k["block"], "|", k.get("gpu__time_duration.sum"), "| dram",
          k.get("dram__throughput.avg.pct_of_peak_sustained_elapsed"))
PY

if [ "${DETAILS:-0}" = 1 ]; then
echo "== Nsight Compute details: first Hadamard + LUT-GEMM (4096x4096, batch 1) and the 4096x14336 pair"
for skip in 0 12; do
  timeout 90 ncu --clock-control none -k regex:'hadamard_rotate|lut_mma|lut_gemv' --launch-skip $skip --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    python3 benches/gpu_profile.py > "$OUT/ncu_details_$skip.txt" 2>&1
  grep -E "^  [a-z_]+|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Compute \(SM\) Throughput|Dynamic Shared|Local Memory|stall" "$OUT/ncu_details_$skip.txt" | head -60
done
fi

echo "== compute-sanitizer memcheck (HIGGS_CUDA_QUICK=1)"
HIGGS_CUDA_QUICK=1 timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 -m pytest -p no:cacheprovider -x -q tests/test_cuda.py tests/test_grouping.py tests/test_rope.py \
  > "$OUT/sanitizer.txt" 2>&1
echo "compute-sanitizer exit code $?"
grep -E "ERROR SUMMARY|passed|failed|Error" "$OUT/sanitizer.txt" | tail -8
