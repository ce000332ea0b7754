#!/usr/bin/env bash
# The one device check: everything a first GPU should tell, in order of value, in <= 8 minutes.
#
#   bench/gpu_check.sh --out DIR --data-dir DIR     on the device machine (one H100/H200)
#   bench/gpu_check.sh --dry-run --out DIR          every step on the CPU at the smoke preset
#
# Steps, each with its own time limit, each writing what it has to DIR before the next starts
# (a step killed at its limit, or the whole call killed, still leaves the earlier results):
#   1. the environment: torch, CUDA, the GPU                            -> summary.txt
#   2. tests/test_gpu.py on CUDA: one step of every stage, supernet = static net in bf16,
#      exact BN recalibration in fp32, export                           -> summary.txt
#   3. nas.py all --preset tiny --device cuda: every stage on CUDA      -> tiny-results.json
#   4. bench/speed.py at the gpu and cifar widths: supernet / static step ratio, archs/min
#      evaluated, peak memory                                           -> speed-gpu.json, speed-cifar.json
#   5. nas.py all --preset gpu, timed                                   -> gpu-results.json,
#                                                                          gpu-report.md, gpu-scatter.png
#   6. everything else (run folders' events, logs) as rest.tar.gz: 8 files in all.
# Dry run (CPU): the smoke preset stands in for tiny and gpu, and speed.py runs at small sizes,
# in fp32: it checks the script itself, every step and file. (The CUDA path's bf16 autocast and
# channels_last on the CPU are tests/test_gpu.py's: NAS_CUDA_PATH_ON_CPU=1 emulates them, at
# 3 to 13 times the cost on a CPU without native bf16.)
# Run folders go to runs/ in the current folder. PYTHON names the interpreter (default python).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

OUT="" DATA="" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --data-dir) DATA="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "error: unknown option $1 (use --out DIR [--data-dir DIR] [--dry-run])" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "error: --out DIR is required" >&2; exit 2; }
if [ "$DRY" = 0 ] && [ -z "$DATA" ]; then
  echo "error: --data-dir DIR (the four Fashion-MNIST .gz files) is required on the GPU" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
RUNS="runs"
STAMP="$(date +%H%M%S)"
PY="${PYTHON:-python}"
DATA_OPT=()
[ -n "$DATA" ] && DATA_OPT=(--data-dir "$DATA")
if [ "$DRY" = 1 ]; then
  DEVICE=cpu SMOKE=smoke BIG=smoke CIFAR=smoke TESTS="cuda"
  SPEED=(--iters 1 --sets 1 --eval-archs 2 --batch 16 --calib-images 128 --eval-images 256)
else
  DEVICE=cuda SMOKE=tiny BIG=gpu CIFAR=cifar TESTS="cuda" SPEED=()
fi
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS COMMAND...: run it under a time limit, its output in the log, its verdict
# and wall time in the summary
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  say "== $name (limit ${limit} s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/log-$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/log-$name.txt" >> "$SUMMARY"
  say "== $name: exit code $rc, $((SECONDS - t0)) s"
  return $rc
}

keep() {  # keep FILE AS: copy a result into --out (once it exists)
  [ -f "$1" ] && cp "$1" "$OUT/$2"
}

step environment 60 "$PY" -c '
import platform, torch, torchvision, scipy
print("python", platform.python_version(), "torch", torch.__version__,
      "torchvision", torchvision.__version__, "scipy", scipy.__version__)
print("cuda available", torch.cuda.is_available(), "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print("gpu", i, p.name, round(p.total_memory / 2**30), "GiB, bf16",
          torch.cuda.is_bf16_supported())
'
[ "$DRY" = 0 ] && nvidia-smi >> "$OUT/log-environment.txt" 2>&1

# on the CPU every test skips (the suite runs their cpu-bf16 twins): the step itself is checked
step test-gpu 90 "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_gpu.py" -k "$TESTS"

SMOKE_RUN="check-$SMOKE-$STAMP" BIG_RUN="check-$BIG-$STAMP-big" BIG_OPT=()
# the dry run's stand-in for the big run: the smoke run again (--resume: its ground truth,
# checkpoint and search are kept, so only evaluation and the report run), to save time
[ "$DRY" = 1 ] && BIG_RUN="$SMOKE_RUN" BIG_OPT=(--resume)
step all-smoke 150 "$PY" "$ROOT/nas.py" all --preset "$SMOKE" --device "$DEVICE" \
  --name "$SMOKE_RUN" --no-tui "${DATA_OPT[@]}"
keep "$RUNS/$SMOKE_RUN/results.json" tiny-results.json

step speed-gpu 60 "$PY" "$ROOT/bench/speed.py" --device "$DEVICE" --preset "$BIG" "${SPEED[@]}" \
  --out "$OUT/speed-gpu.json"
step speed-cifar 60 "$PY" "$ROOT/bench/speed.py" --device "$DEVICE" --preset "$CIFAR" \
  "${SPEED[@]}" --out "$OUT/speed-cifar.json"

step all-gpu 360 "$PY" "$ROOT/nas.py" all --preset "$BIG" --device "$DEVICE" --name "$BIG_RUN" \
  --no-tui "${BIG_OPT[@]}" "${DATA_OPT[@]}"
RUN="$RUNS/$BIG_RUN"
keep "$RUN/results.json" gpu-results.json
keep "$RUN/report.md" gpu-report.md
keep "$RUN/scatter.png" gpu-scatter.png

tar czf "$OUT/rest.tar.gz" --exclude='*.pt' $(printf '%s\n' "$RUNS/$SMOKE_RUN" "$RUN" | sort -u) \
  "$OUT"/log-*.txt 2> /dev/null
rm -f "$OUT"/log-*.txt
say "== done: $(ls "$OUT" | tr '\n' ' ')"
