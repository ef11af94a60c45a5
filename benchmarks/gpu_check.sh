#!/usr/bin/env bash
# One-shot check of the GPU training path (benchmarks/README.md): one command, about 6 minutes on
# one H100/H200 (8 at most: stage timeouts are cut to what is left), everything under one folder.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--wheels DIR] [--cpu-smoke]
#
# Stages: the device; the carried wheels (`make gpu-wheels`) installed where missing; the GPU
# tests (bf16 vs fp32 curve, SDPA and fused kernels against their references on CUDA); tokens/s,
# MFU and peak memory of the paper's SLM and LLM over a micro-batch sweep; one PN MLP at the paper's
# shape in bf16, its per-expert GEMMs grouped (torch._grouped_mm) against the loop; the PN/dense
# step-time ratio at the paper's shape (mixed and grouped micro-batches).
# Results are appended, with device and date, to DIR/RESULTS.md (a copy of benchmarks/RESULTS.md:
# copy it back to keep them). --cpu-smoke runs the stages a CPU can run at tiny sizes (the test
# suite does, so this stays runnable). DIR defaults to $OUT (the folder a lent GPU session
# brings back), else gpu_check_out.
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${OUT:-$REPO/gpu_check_out}
WHEELS=$REPO/.gpu-wheels
SMOKE=0
while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT_DIR=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --cpu-smoke) SMOKE=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$REPO" || exit 2
# The working tree is the package (nothing to install); no network, no prompts.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cp benchmarks/RESULTS.md "$OUT_DIR/RESULTS.md"
: > "$OUT_DIR/stages.txt"
FAILED=0

# stage NAME SECONDS COMMAND...: run under a timeout (cut to what is left of the 8-minute budget),
# log to OUT_DIR/NAME.log, record the status.
BUDGET=480
T0=$(date +%s)
stage() {
    local name=$1 limit=$2 start rc status left
    shift 2
    left=$(( BUDGET - ($(date +%s) - T0) ))
    if [ $left -lt 20 ]; then
        echo "| $name | skipped (8-minute budget spent) | 0 s |" | tee -a "$OUT_DIR/stages.txt"
        FAILED=1
        return
    fi
    [ "$limit" -le $left ] || limit=$left
    echo "== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit}s"; FAILED=1 ;;
        *) status="failed (rc $rc)"; FAILED=1 ;;
    esac
    echo "| $name | $status | $(( $(date +%s) - start )) s |" | tee -a "$OUT_DIR/stages.txt"
    tail -n 15 "$OUT_DIR/$name.log"
}

stage device 30 "$PY" -c "
import platform, torch
cuda = torch.cuda.is_available()
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)
print('device:', torch.cuda.get_device_name() if cuda else 'CPU only')
import importlib.util, shutil
print('triton', importlib.util.find_spec('triton') is not None, '| C compiler', shutil.which('cc') or shutil.which('gcc'))
if cuda:
    free, total = torch.cuda.mem_get_info()
    print(f'memory {total / 2**30:.0f} GiB, capability {torch.cuda.get_device_capability()}')
"
if [ $SMOKE -eq 1 ]; then
    :  # this environment's own packages
elif [ -f "$WHEELS/requirements.txt" ]; then
    # Names, not files: pip leaves what is already installed (torch's numpy, say) alone.
    # (PIP_BREAK_SYSTEM_PACKAGES: a distribution-managed Python refuses pip installs otherwise)
    PIP_BREAK_SYSTEM_PACKAGES=1 stage wheels 60 "$PY" -m pip install --no-index --no-deps \
        --find-links "$WHEELS" \
        -r "$WHEELS/requirements.txt"
else
    echo "no $WHEELS/requirements.txt: assuming the packages are installed (make gpu-wheels)"
fi

# (test_pn.py: grouped per-expert GEMMs against the loop, on the GPU kernels)
TESTS="tests/test_gpu.py tests/test_pn.py::test_grouped_gemm_equals_the_loop
       tests/test_pn.py::test_grouped_gemm_runs_by_default_only_on_hopper_in_bf16"
# and, on a GPU, the modules with CUDA cases (on a CPU the test suite runs them already)
[ $SMOKE -eq 1 ] || TESTS="$TESTS tests/test_attention.py tests/test_fusions.py tests/test_metrics.py"
stage tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" $TESTS

# the PN step rows: dense, PN (mixed), PN with the other per-expert GEMM path, grouped by cluster
PN_RUNS=(--runs dense pn pn_gemm by_cluster)
if [ $SMOKE -eq 1 ]; then
    SHORT=(--steps 3 --warmup 1)
    stage throughput_slm 240 "$PY" benchmarks/train_throughput.py --configs configs/tiny/slm.yaml \
        --micro-batch-sizes 4 "${SHORT[@]}" --results "$OUT_DIR/RESULTS.md"
    stage pn_mlp 60 "$PY" benchmarks/pn_overhead.py --tiny --only mlp --rounds 1 \
        --results "$OUT_DIR/RESULTS.md"
    stage pn_overhead 300 "$PY" benchmarks/pn_overhead.py --tiny --only step --rounds 1 \
        "${SHORT[@]}" "${PN_RUNS[@]}" --results "$OUT_DIR/RESULTS.md"
else
    SHORT=(--steps 12 --warmup 5)
    stage throughput_slm 90 "$PY" benchmarks/train_throughput.py --configs configs/paper/slm.yaml \
        --micro-batch-sizes 8 16 "${SHORT[@]}" --results "$OUT_DIR/RESULTS.md"
    # an LLM step is ~6x an SLM step (~1.2 s at 50% MFU): fewer of them
    stage throughput_llm 110 "$PY" benchmarks/train_throughput.py --configs configs/paper/llm.yaml \
        --micro-batch-sizes 4 8 --steps 10 --warmup 4 --results "$OUT_DIR/RESULTS.md"
    # grouped vs loop (train.pn_grouped_gemm), bf16: seconds of GPU time
    stage pn_mlp 45 "$PY" benchmarks/pn_overhead.py --paper --only mlp --rounds 2 \
        --results "$OUT_DIR/RESULTS.md"
    stage pn_overhead 120 "$PY" benchmarks/pn_overhead.py --paper --only step --rounds 1 \
        "${SHORT[@]}" "${PN_RUNS[@]}" --results "$OUT_DIR/RESULTS.md"
fi

TESTS_LINE=$(grep -Eo '[0-9]+ (passed|failed|skipped|error)[^=]*' "$OUT_DIR/tests.log" | tail -n 1)
DEVICE_LINE=$(grep '^device:' "$OUT_DIR/device.log" | cut -d' ' -f2-)
{
    echo
    echo "## GPU check: ${DEVICE_LINE:-unknown device}, $(date -u '+%Y-%m-%d')"
    echo
    echo "\`benchmarks/gpu_check.sh$([ $SMOKE -eq 1 ] && echo ' --cpu-smoke')\`, $(date -u '+%H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); tests: ${TESTS_LINE:-none ran}."
    echo
    echo "| stage | status | time |"
    echo "|---|---|---:|"
    cat "$OUT_DIR/stages.txt"
} >> "$OUT_DIR/RESULTS.md"
echo "results: $OUT_DIR/RESULTS.md"
exit $FAILED
