#!/usr/bin/env bash
# One command for a lent CUDA machine: check the abi3 wheel built here on a real GPU,
# within a time budget (8 minutes by default), and leave everything under OUTDIR.
#
#   wheel      find the wheel (QKIT_WHEEL, or qkit-*-cp310-abi3-*.whl in QKIT_WHEEL_DIR,
#              default wheelhouse/ then dist/) and check its build record has CUDA kernels
#   install    a venv with --system-site-packages (the machine's torch), the wheel installed
#              offline with --no-deps; pytest/hypothesis/numpy from the wheel folder if missing
#   info       python -m qkit.info (and --json), qkit imported from the venv, a GPU visible
#   tests      the suite's CUDA cases only (ci/qkit_gpu_select.py: -m cuda, the [cuda]
#              device cases and the GPU-gated unmarked ones) against the installed package,
#              junit XML + log
#   memcheck   compute-sanitizer --tool memcheck  on ci/gpu_sanitize.py (every op once, odd sizes)
#   racecheck  compute-sanitizer --tool racecheck on the same calls (--quick)
#   bench_core qkit bench --device cuda at 64M elements: fake_quantize and quantize8 vs a
#              device-to-device copy, eager PyTorch and torch.compile of the same math
#              (DeepSpeed only if its quantizer op is prebuilt there: --no-jit); optional
#   bench_more the same for quantize4 and dequantize8; optional
#
# Every step runs under `timeout`, with at most its own limit and never more than the budget
# leaves once the later required steps have their minimum; an optional step that would not
# get its minimum is skipped. OUTDIR gets summary.json (status, seconds, command of every
# step, test counts, sanitizer error counts, bench figures), one <step>.log per step,
# tests.xml, info.json, bench_*.json and gpu_check.log.
#
# Usage: bash ci/gpu_check.sh [--dry-run] OUTDIR
#   --dry-run (or QKIT_GPU_CHECK_DRY_RUN=1): no GPU needed. The wheel step runs for real;
#       every other step prints and logs the command it would run and runs a stand-in
#       (`true`) under the same timeout and bookkeeping. QKIT_GPU_CHECK_SIMULATE="tests=300,
#       memcheck=fail" makes stand-ins take simulated seconds (a simulated clock: the
#       budget logic sees them) or fail.
# Exit status: 0 when every required step (all but the bench steps) passed; 1 when one
# failed, timed out or was skipped for lack of time; 2 on bad usage.
#
# Environment:
#   PYTHON                      the machine's Python with torch (default python3)
#   QKIT_WHEEL, QKIT_WHEEL_DIR  the wheel, or where to look for it (see above)
#   QKIT_GPU_CHECK_BUDGET_S     the whole run's budget in seconds (default 480)
#   QKIT_GPU_CHECK_MAX_<STEP>   one step's limit in seconds (e.g. QKIT_GPU_CHECK_MAX_TESTS=300)
#   QKIT_GPU_CHECK_PYTEST_ARGS  extra pytest arguments (word-split), e.g. "-x"
#   QKIT_GPU_CHECK_BENCH_ARGS   replaces the bench's size/dtype/group/repeat arguments
#   QKIT_GPU_CHECK_SANITIZER_FILTER  compute-sanitizer --kernel-name filter (default
#                               kns=qkit: only qkit's kernels are instrumented; empty: all)
#   COMPUTE_SANITIZER           the compute-sanitizer binary (default: PATH, then $CUDA_HOME/bin)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
HELPER="$ROOT/ci/gpu_check_helper.py"

die() { echo "gpu_check.sh: $*" >&2; exit 2; }

# ---------------------------------------------------------------- internal steps
# Steps made of several commands run as `bash ci/gpu_check.sh __<step> ...`, so that
# `timeout` bounds all of them and the planned command is one readable line.

internal_install() {  # __install VENV WHEEL WHEEL_DIR
  local venv="$1" wheel="$2" wheel_dir="$3"
  local vpy="$venv/bin/python"
  local pip
  if "$PY" -m venv --system-site-packages "$venv" 2>/dev/null; then
    pip=("$vpy" -m pip)
  else  # no ensurepip here: a venv without pip, filled by the base Python's pip
    echo "gpu_check.sh: no ensurepip; venv --without-pip, installing with $PY -m pip --python"
    rm -rf "$venv"
    "$PY" -m venv --system-site-packages --without-pip "$venv"
    pip=("$PY" -m pip --python "$vpy")
  fi
  "$vpy" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}) from {torch.__file__}")'
  # Offline, and never touching the machine's torch.
  PIP_DISABLE_PIP_VERSION_CHECK=1 "${pip[@]}" install --no-index --no-deps --no-cache-dir "$wheel"
  local missing=() module
  for module in pytest hypothesis numpy; do
    "$vpy" -c "import $module" 2>/dev/null || missing+=("$module")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "gpu_check.sh: the tests need ${missing[*]}: installing from $wheel_dir (offline)"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "${pip[@]}" install --no-index --no-cache-dir --find-links "$wheel_dir" "${missing[@]}" \
      || { echo "gpu_check.sh: carry their wheels: pip download -d $(basename "$wheel_dir") ${missing[*]} (docs/gpu_check.md)" >&2; exit 1; }
  fi
  "$vpy" -c 'import os, sys, qkit; p = os.path.realpath(qkit.__file__); v = os.path.realpath(sys.argv[1])
print("qkit", qkit.__version__, "from", p)
sys.exit(0 if p.startswith(v + os.sep) else f"qkit comes from {p}, not from the venv {v}")' "$venv"
}

internal_info() {  # __info VPY OUTDIR SANITIZER
  local vpy="$1" out="$2" sanitizer="$3" rc=0
  nvidia-smi -L || echo "gpu_check.sh: nvidia-smi failed (continuing)"
  "$vpy" -m qkit.info || rc=$?
  "$vpy" -m qkit.info --json > "$out/info.json" || true
  "$vpy" -c 'import sys, torch, qkit._loader as L
r = L.build_record() or {}
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device")
if not r.get("cuda_kernels"):
    sys.exit("gpu_check.sh: the installed qkit has no CUDA kernels")
p = torch.cuda.get_device_properties(0)
print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB; qkit archs {r.get(\"cuda_arch_list\")}")' || rc=1
  # A missing sanitizer fails the sanitizer steps, not this one (the tests still run).
  "$sanitizer" --version 2>&1 | tail -n 2 \
    || echo "gpu_check.sh: $sanitizer not found: set COMPUTE_SANITIZER (the memcheck and racecheck steps will fail)"
  return "$rc"
}

case "${1:-}" in
  __install) shift; internal_install "$@"; exit ;;
  __info) shift; internal_info "$@"; exit ;;
esac

# ---------------------------------------------------------------- arguments

DRY="${QKIT_GPU_CHECK_DRY_RUN:-0}"
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (usage: bash ci/gpu_check.sh [--dry-run] OUTDIR)" ;;
    *) [ -z "$OUT" ] || die "one OUTDIR only"; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || die "usage: bash ci/gpu_check.sh [--dry-run] OUTDIR"
[ "$DRY" = 0 ] || DRY=1
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${QKIT_GPU_CHECK_BUDGET_S:-480}"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "QKIT_GPU_CHECK_BUDGET_S must be whole seconds, got '$BUDGET'"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/qkit-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STEPS="$OUT/steps.tsv"
: > "$STEPS"
exec > >(tee "$OUT/gpu_check.log") 2>&1
STARTED_AT="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
export PYTHONUNBUFFERED=1  # a step killed by its timeout still leaves its output in the log
START_S=$SECONDS
SIM_S=0          # simulated seconds (dry run)
END_RESERVE=10   # for the summary after the last step

declare -A SIMULATE=()
if [ "$DRY" = 1 ] && [ -n "${QKIT_GPU_CHECK_SIMULATE:-}" ]; then
  IFS=',' read -r -a pairs <<< "$QKIT_GPU_CHECK_SIMULATE"
  for pair in "${pairs[@]}"; do
    [[ "$pair" == *=* ]] || die "QKIT_GPU_CHECK_SIMULATE: '$pair' is not step=seconds or step=fail"
    SIMULATE["${pair%%=*}"]="${pair#*=}"
  done
fi

elapsed() { echo $(( SECONDS - START_S + SIM_S )); }

# Steps in order: name, required (1) or optional (0), default limit, minimum (seconds).
STEP_NAMES=(wheel install info tests memcheck racecheck bench_core bench_more)
declare -A REQUIRED=([wheel]=1 [install]=1 [info]=1 [tests]=1 [memcheck]=1 [racecheck]=1 [bench_core]=0 [bench_more]=0)
declare -A MAX_S=([wheel]=30 [install]=90 [info]=60 [tests]=240 [memcheck]=90 [racecheck]=90 [bench_core]=120 [bench_more]=90)
declare -A MIN_S=([wheel]=5 [install]=20 [info]=10 [tests]=60 [memcheck]=30 [racecheck]=30 [bench_core]=60 [bench_more]=45)
for name in "${STEP_NAMES[@]}"; do
  var="QKIT_GPU_CHECK_MAX_${name^^}"
  if [ -n "${!var:-}" ]; then
    [[ "${!var}" =~ ^[0-9]+$ ]] || die "$var must be whole seconds"
    MAX_S[$name]="${!var}"
  fi
done

# The minimum the required steps after $1 need.
reserve_after() {
  local seen=0 total=0 name
  for name in "${STEP_NAMES[@]}"; do
    if [ "$seen" = 1 ] && [ "${REQUIRED[$name]}" = 1 ]; then total=$(( total + MIN_S[$name] )); fi
    [ "$name" = "$1" ] && seen=1
  done
  echo "$total"
}

FAILED=0
# record NAME STATUS RC SECONDS TIMEOUT COMMAND REASON
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "${REQUIRED[$1]}" "$2" "$3" "$4" "$5" "$OUT/$1.log" "$6" "$7" >> "$STEPS"
  if [ "${REQUIRED[$1]}" = 1 ] && [ "$2" != ok ]; then FAILED=1; fi
  write_summary
}

write_summary() {
  "$PY" "$HELPER" summary "$OUT" --steps "$STEPS" --dry-run "$DRY" --budget "$BUDGET" \
    --elapsed "$(elapsed)" --started-at "$STARTED_AT" --exit-status "$FAILED" --wheel "${WHEEL:-}" \
    || echo "gpu_check.sh: writing summary.json failed" >&2
}

# One line of shell for a command: words quoted only where they need it.
quote() {
  local word line=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then line+="$word "; else line+="$(printf '%q' "$word") "; fi
  done
  echo "${line% }"
}

# run_step NAME [--real] COMMAND...: COMMAND under `timeout`, output to OUTDIR/NAME.log.
# --real: run it in a dry run too (it needs no GPU).
run_step() {
  local name="$1"; shift
  local real=0
  if [ "${1:-}" = --real ]; then real=1; shift; fi
  local log="$OUT/$name.log" command
  command="$(quote "$@")"
  local left=$(( BUDGET - $(elapsed) - END_RESERVE ))
  local allowed=$(( left - $(reserve_after "$name") ))
  [ "$allowed" -le "${MAX_S[$name]}" ] || allowed="${MAX_S[$name]}"
  if [ "$allowed" -lt "${MIN_S[$name]}" ]; then
    echo "== gpu_check: $name skipped: ${allowed}s of the budget left for it, it needs ${MIN_S[$name]}s"
    echo "skipped: ${allowed}s left for it, needs ${MIN_S[$name]}s; would run: $command" > "$log"
    record "$name" skipped "" 0 "$allowed" "$command" "time: ${allowed}s left for it of the ${BUDGET}s budget, needs ${MIN_S[$name]}s"
    return 0
  fi
  echo
  echo "== gpu_check: $name ($(date -u +%T), timeout ${allowed}s, $(elapsed)s of ${BUDGET}s used)"
  local t0=$SECONDS rc=0 sim=""
  if [ "$DRY" = 1 ] && [ "$real" = 0 ]; then
    sim="${SIMULATE[$name]:-0}"
    local stand_in=true
    [ "$sim" != fail ] || { stand_in=false; sim=0; }
    [[ "$sim" =~ ^[0-9]+$ ]] || die "QKIT_GPU_CHECK_SIMULATE: $name=$sim is not seconds or fail"
    echo "[dry-run] would run: $command" | tee "$log"
    timeout -k 5 "$allowed" "$stand_in" || rc=$?
    if [ "$sim" -gt "$allowed" ]; then sim="$allowed"; rc=124; fi  # what timeout would have done
    SIM_S=$(( SIM_S + sim ))
  else
    set +e
    { echo "\$ $command"; timeout -k 10 "$allowed" "$@" 2>&1; } | tee "$log"
    rc="${PIPESTATUS[0]}"
    set -e
  fi
  local took=$(( SECONDS - t0 + ${sim:-0} ))
  local status=ok reason=""
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status=timeout; reason="killed after ${allowed}s"
  elif [ "$rc" != 0 ]; then
    status=failed; reason="exit status $rc"
  fi
  echo "== gpu_check: $name: $status (${took}s)"
  record "$name" "$status" "$rc" "$took" "$allowed" "$command" "$reason"
}

# ---------------------------------------------------------------- the steps

echo "gpu_check.sh: $([ "$DRY" = 1 ] && echo 'DRY RUN, ')budget ${BUDGET}s, OUTDIR $OUT, $(date -u)"

# wheel: runs in a dry run too (pure file checks).
WHEEL="${QKIT_WHEEL:-}"
WHEEL_DIR="${QKIT_WHEEL_DIR:-}"
if [ -z "$WHEEL" ]; then
  if [ -z "$WHEEL_DIR" ]; then
    for candidate in "$ROOT/wheelhouse" "$ROOT/dist"; do
      if compgen -G "$candidate/qkit-*-cp310-abi3-*.whl" > /dev/null; then WHEEL_DIR="$candidate"; break; fi
    done
  fi
  WHEEL_DIR="${WHEEL_DIR:-$ROOT/wheelhouse}"
  # The newest, if several.
  WHEEL="$(find "$WHEEL_DIR" -maxdepth 1 -name 'qkit-*-cp310-abi3-*.whl' -printf '%T@ %p\n' 2>/dev/null \
    | sort -rn | head -n 1 | cut -d' ' -f2- || true)"
fi
[ -n "$WHEEL_DIR" ] || WHEEL_DIR="$(dirname "$WHEEL")"
run_step wheel --real "$PY" "$HELPER" wheel "${WHEEL:-$WHEEL_DIR/qkit-*-cp310-abi3-*.whl}"

VENV="$WORK/venv"
VPY="$VENV/bin/python"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}"
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  if [ -z "$SANITIZER" ] && [ -x "$candidate" ]; then SANITIZER="$candidate"; fi
done
# Not found: the sanitizer steps fail (exit status 127), the others still run.
SANITIZER="${SANITIZER:-compute-sanitizer}"
FILTER=()
if [ -n "${QKIT_GPU_CHECK_SANITIZER_FILTER-kns=qkit}" ]; then
  FILTER=(--kernel-name "${QKIT_GPU_CHECK_SANITIZER_FILTER-kns=qkit}")
fi

if [ "$FAILED" = 0 ]; then
  run_step install bash "$ROOT/ci/gpu_check.sh" __install "$VENV" "$WHEEL" "$WHEEL_DIR"
fi
if [ "$FAILED" = 0 ]; then
  run_step info bash "$ROOT/ci/gpu_check.sh" __info "$VPY" "$OUT" "$SANITIZER"
fi
if [ "$FAILED" = 1 ]; then
  # Nothing below can run without the installed package on a visible GPU.
  for name in "${STEP_NAMES[@]}"; do
    if ! grep -q "^$name"$'\t' "$STEPS"; then
      echo "skipped: an earlier step failed" > "$OUT/$name.log"
      record "$name" skipped "" 0 0 "" "an earlier step failed"
    fi
  done
else
  read -r -a pytest_extra <<< "${QKIT_GPU_CHECK_PYTEST_ARGS:-}"
  # From a scratch directory, so that only the installed qkit can be imported.
  cd "$WORK"
  run_step tests env QKIT_TEST_INSTALLED=1 PYTHONPATH="$ROOT/ci" \
    "$VPY" -m pytest -q -p no:cacheprovider -p qkit_gpu_select -o faulthandler_timeout=120 \
    --junitxml="$OUT/tests.xml" "${pytest_extra[@]}" "$ROOT/tests"
  # Every tensor its own cudaMalloc, so that memcheck sees an access past its end.
  run_step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck "${FILTER[@]}" --error-exitcode 1 --print-limit 50 \
    "$VPY" "$ROOT/ci/gpu_sanitize.py" --device cuda
  run_step racecheck "$SANITIZER" --tool racecheck "${FILTER[@]}" --error-exitcode 1 --print-limit 50 \
    "$VPY" "$ROOT/ci/gpu_sanitize.py" --device cuda --quick
  read -r -a bench_args <<< "${QKIT_GPU_CHECK_BENCH_ARGS:---sizes 64M --dtypes float32,bfloat16 --groups 128,4096 --repeat 20 --warmup 0.2}"
  run_step bench_core env TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" \
    "$VPY" -m qkit bench --device cuda "${bench_args[@]}" --ops fake_quantize,quantize8 \
    --no-jit --no-progress --json "$OUT/bench_core.json"
  run_step bench_more env TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" \
    "$VPY" -m qkit bench --device cuda "${bench_args[@]}" --ops quantize4,dequantize8 \
    --no-jit --no-progress --json "$OUT/bench_more.json"
fi

write_summary
echo
"$PY" "$HELPER" report "$OUT/summary.json" || true
exit "$FAILED"
