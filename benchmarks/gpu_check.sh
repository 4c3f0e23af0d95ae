#!/usr/bin/env bash
# Validates promptkit on a CUDA GPU in one command, with no network: builds and installs it, runs every test on
# CUDA tensors, opcheck and torch.compile on CUDA, the op benchmarks at B = 1024 and 4096 (eager, torch.compile,
# triton, cuda), `promptkit train --method lsn --device cuda` on the embedded default data and model (a short
# schedule), and one LSN negative step at C = 1000, K = 3 on a random-weight ViT-B-16 under bf16 autocast
# (benchmarks/gpu_step.py).
#
#   bash benchmarks/gpu_check.sh [REPORT_DIR]        # default REPORT_DIR: gpu_check/ (git-ignored)
#   PYTHON=/path/to/python3 bash benchmarks/gpu_check.sh
#
# Every step runs under `timeout` with the budget in BUDGET below (480 s in all, so a run ends within 8 minutes;
# the split is an estimate for an H100, to be tightened from the first runs' step times) and logs to
# REPORT_DIR/<step>.log. benchmarks/gpu_report.py then writes REPORT_DIR/report.md and REPORT_DIR/report.json and
# exits 1 if any step failed or ran out of time (a test mismatch, a loss that differs between backends, a build
# without CUDA), 0 otherwise. Without a usable CUDA GPU it prints one line and exits 0: it is safe to run
# anywhere, CI included.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
REPORT_DIR=${1:-gpu_check}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here ($PYTHON's torch sees none, or has no torch); nothing to check"
  exit 0
fi

mkdir -p "$REPORT_DIR"
REPORT_DIR=$(cd "$REPORT_DIR" && pwd)
# -P: the installed promptkit (with its compiled _C), not the source tree in the working directory
PY=("$PYTHON" -P)
export PYTHONUNBUFFERED=1 PROMPTKIT_EXPECT_CUDA_BUILD=1 PROMPTKIT_CUDA=ON TORCHINDUCTOR_FX_GRAPH_CACHE=0
STEPS_TSV="$REPORT_DIR/steps.tsv"
: >"$STEPS_TSV"
# seconds each step may take
declare -A BUDGET=([build]=110 [cuda_tests]=90 [triton_interpreter]=40 [opcheck]=35 [benchmarks]=105
                   [train_lsn]=60 [lsn_step]=40)

# run NAME COMMAND...: one time-boxed step, its log, and a line of steps.tsv (name, status, rc, seconds).
run() {
  local name=$1
  shift
  local budget=${BUDGET[$name]} log="$REPORT_DIR/$name.log" start ms status rc
  start=$(date +%s%N)
  echo "gpu_check: $name (at most ${budget}s) ..."
  timeout --kill-after=5 "$budget" "$@" >"$log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - start) / 1000000))
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%d.%03d\n' "$name" "$status" "$rc" $((ms / 1000)) $((ms % 1000)) >>"$STEPS_TSV"
  echo "gpu_check: $name $status"
}

# build: a CUDA build is required (PROMPTKIT_CUDA=ON), and the installed module must report it
run build bash -c '"$0" -m pip install --no-build-isolation --no-deps . &&
  "$0" -P -c "from promptkit import _C; i = _C.build_info(); print(i); assert i[\"cuda\"], i[\"why_no_cuda\"]"' \
  "$PYTHON"
# every test on CUDA tensors: the cuda bindings, the triton and cuda parametrisations of tests/ops, the
# compiled module's resource check (opcheck and torch.compile are the next step but one)
run cuda_tests "${PY[@]}" -m pytest -q tests/ops -k "cuda and not opcheck and not torch_compile"
# Triton on CPU tensors needs the interpreter from the start of the process: its own run
run triton_interpreter env TRITON_INTERPRET=1 "${PY[@]}" -m pytest -q tests/ops -k "triton-cpu" \
  --ignore=tests/ops/test_gpu_compile.py
run opcheck "${PY[@]}" -m pytest -q tests/ops/test_gpu_ops.py
# the op benchmarks: one group per (op, pass, size), eager / compile / triton / cuda in each
run benchmarks "${PY[@]}" -m pytest -q --benchmark-only --benchmark-json="$REPORT_DIR/bench.json" \
  benchmarks/bench_cosine.py benchmarks/bench_scores.py benchmarks/bench_losses.py benchmarks/bench_ortho.py \
  benchmarks/bench_mix.py
# end to end on the embedded data and model, the schedule cut to 5 + 5 epochs to fit its time box (the default
# 50 + 100 run thousands of launch-bound steps of the tiny model)
run train_lsn "${PY[@]}" -m promptkit train --method lsn --device cuda --no-progress --set pos_epochs=5 \
  --set neg_epochs=5 --output "$REPORT_DIR/lsn-run"
run lsn_step bash -c '"$0" -P benchmarks/gpu_step.py > "$1"' "$PYTHON" "$REPORT_DIR/lsn_step.jsonl"

"${PY[@]}" benchmarks/gpu_report.py "$REPORT_DIR"
