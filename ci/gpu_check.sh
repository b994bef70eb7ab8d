#!/usr/bin/env bash
# One command for a lent CUDA machine: check the abi3 wheel built here on a real GPU,
# within a time budget (8 minutes by default), and leave everything under OUTDIR.
#
#   wheel      find the wheel (QKIT_WHEEL, or qkit-*-cp310-abi3-*.whl in QKIT_WHEEL_DIR,
#              default wheelhouse/ then dist/) and check its build record has CUDA kernels
#   install    pip install --target SITE --no-index --no-deps WHEEL (offline; the machine's
#              own Python and torch run it, SITE first on PYTHONPATH); pytest, hypothesis,
#              numpy from the wheel folder if the machine lacks them
#   info       python -m qkit.info (and --json), qkit imported from SITE, a GPU visible
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
# step, test counts, sanitizer error counts, bench figures; rewritten after every step),
# gpu_check.log (all the output), logs/<step>.log, steps.tsv, tests.xml, info.json and
# bench_*.json.
#
# Usage: bash ci/gpu_check.sh [--dry-run] [--pack] OUTDIR
#   --pack (or QKIT_GPU_CHECK_PACK=1): at the end, move logs/, steps.tsv, tests.xml and
#       info.json into OUTDIR/logs.tar.gz, leaving at most 5 files (the device tool's `run`
#       brings back at most 8 from $OUT).
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
#   QKIT_GPU_CHECK_PYTEST_WORKERS  pytest-xdist workers for the tests (default: 8 when
#                               xdist is importable, else none; 0: none)
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

internal_install() {  # __install SITE WHEEL WHEEL_DIR
  # Installed with pip --target into SITE, put first on PYTHONPATH by every later step: the
  # machine's own Python (and its torch) runs, untouched. (A venv --system-site-packages
  # would not do there: its python3 is itself a venv, /opt/torch/.venv, and a venv made
  # from a venv sees the base interpreter's site-packages, not that venv's torch.)
  local site="$1" wheel="$2" wheel_dir="$3"
  "$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__} (CUDA {torch.version.cuda})")'
  mkdir -p "$site"
  if "$PY" -m pip --version > /dev/null 2>&1; then
    # Offline, no dependencies: nothing can replace the machine's torch.
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --no-index --no-deps --no-cache-dir --target "$site" "$wheel"
  else  # a wheel is a zip of the package: unpacked, it imports the same (no console script)
    echo "gpu_check.sh: no pip for $PY: unpacking the wheel into $site"
    "$PY" -m zipfile -e "$wheel" "$site"
  fi
  local missing=() module
  for module in pytest hypothesis numpy; do
    PYTHONPATH="$site" "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "gpu_check.sh: the tests need ${missing[*]}: installing from $wheel_dir (offline)"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --no-index --no-cache-dir --target "$site" \
      --find-links "$wheel_dir" "${missing[@]}" \
      || { echo "gpu_check.sh: carry their wheels in $wheel_dir (docs/gpu_check.md)" >&2; exit 1; }
  fi
  PYTHONPATH="$site" "$PY" "$HELPER" installed "$site"
}

internal_info() {  # __info SITE OUTDIR SANITIZER
  local site="$1" out="$2" sanitizer="$3" rc=0
  export PYTHONPATH="$site"
  nvidia-smi -L || echo "gpu_check.sh: nvidia-smi failed (continuing)"
  "$PY" -m qkit.info || rc=$?
  "$PY" -m qkit.info --json > "$out/info.json" || true
  "$PY" "$HELPER" gpu || rc=1
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
PACK="${QKIT_GPU_CHECK_PACK:-0}"
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --pack) PACK=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (usage: bash ci/gpu_check.sh [--dry-run] [--pack] OUTDIR)" ;;
    *) [ -z "$OUT" ] || die "one OUTDIR only"; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || die "usage: bash ci/gpu_check.sh [--dry-run] [--pack] OUTDIR"
[ "$DRY" = 0 ] || DRY=1
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${QKIT_GPU_CHECK_BUDGET_S:-480}"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "QKIT_GPU_CHECK_BUDGET_S must be whole seconds, got '$BUDGET'"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/qkit-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STEPS="$OUT/steps.tsv"
: > "$STEPS"
rm -rf "$OUT/logs" "$OUT/logs.tar.gz"
mkdir "$OUT/logs"
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
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "${REQUIRED[$1]}" "$2" "$3" "$4" "$5" "logs/$1.log" "$6" "$7" >> "$STEPS"
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
  local log="$OUT/logs/$name.log" command
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
# Absolute: every step below runs in the scratch directory.
WHEEL_DIR="$(cd "$WHEEL_DIR" 2> /dev/null && pwd || echo "$WHEEL_DIR")"
if [ -n "$WHEEL" ] && [ -d "$(dirname "$WHEEL")" ]; then WHEEL="$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")"; fi
# From a scratch directory: nothing of the source tree can be imported by accident.
cd "$WORK"
run_step wheel --real "$PY" "$HELPER" wheel "${WHEEL:-$WHEEL_DIR/qkit-*-cp310-abi3-*.whl}"

SITE="$WORK/site-packages"
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
  run_step install bash "$ROOT/ci/gpu_check.sh" __install "$SITE" "$WHEEL" "$WHEEL_DIR"
fi
if [ "$FAILED" = 0 ]; then
  run_step info bash "$ROOT/ci/gpu_check.sh" __info "$SITE" "$OUT" "$SANITIZER"
fi
if [ "$FAILED" = 1 ]; then
  # Nothing below can run without the installed package on a visible GPU.
  for name in "${STEP_NAMES[@]}"; do
    if ! grep -q "^$name"$'\t' "$STEPS"; then
      echo "skipped: an earlier step failed" > "$OUT/logs/$name.log"
      record "$name" skipped "" 0 0 "" "an earlier step failed"
    fi
  done
else
  read -r -a pytest_extra <<< "${QKIT_GPU_CHECK_PYTEST_ARGS:-}"
  # pytest-xdist, where the machine has it (the lent H200's image does): 8 workers share
  # the GPU and its 16 cores: 338 of the CUDA cases compile (torch.compile), which adds up.
  workers="${QKIT_GPU_CHECK_PYTEST_WORKERS:-auto}"
  if [ "$workers" = auto ]; then
    if "$PY" -c 'import xdist' 2> /dev/null; then workers=8; else workers=0; fi
  fi
  [[ "$workers" =~ ^[0-9]+$ ]] || die "QKIT_GPU_CHECK_PYTEST_WORKERS must be a number or auto"
  xdist=()
  if [ "$workers" -gt 0 ]; then xdist=(-n "$workers"); fi
  run_step tests env QKIT_TEST_INSTALLED=1 PYTHONPATH="$SITE:$ROOT/ci" \
    "$PY" -m pytest -q -p no:cacheprovider -p qkit_gpu_select -o faulthandler_timeout=120 \
    --junitxml="$OUT/tests.xml" "${xdist[@]}" "${pytest_extra[@]}" "$ROOT/tests"
  # Every tensor its own cudaMalloc, so that memcheck sees an access past its end.
  run_step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH="$SITE" \
    "$SANITIZER" --tool memcheck "${FILTER[@]}" --error-exitcode 1 --print-limit 50 \
    "$PY" "$ROOT/ci/gpu_sanitize.py" --device cuda
  run_step racecheck env PYTHONPATH="$SITE" \
    "$SANITIZER" --tool racecheck "${FILTER[@]}" --error-exitcode 1 --print-limit 50 \
    "$PY" "$ROOT/ci/gpu_sanitize.py" --device cuda --quick
  read -r -a bench_args <<< "${QKIT_GPU_CHECK_BENCH_ARGS:---sizes 64M --dtypes float32,bfloat16 --groups 128,4096 --repeat 20 --warmup 0.2}"
  run_step bench_core env TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" PYTHONPATH="$SITE" \
    "$PY" -m qkit bench --device cuda "${bench_args[@]}" --ops fake_quantize,quantize8 \
    --no-jit --no-progress --json "$OUT/bench_core.json"
  run_step bench_more env TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" PYTHONPATH="$SITE" \
    "$PY" -m qkit bench --device cuda "${bench_args[@]}" --ops quantize4,dequantize8 \
    --no-jit --no-progress --json "$OUT/bench_more.json"
fi

write_summary
echo
"$PY" "$HELPER" report "$OUT/summary.json" || true
if [ "$PACK" = 1 ]; then
  # The device tool brings back at most 8 files: keep summary.json, gpu_check.log and the
  # bench JSON loose, and everything else in logs.tar.gz.
  packed=(logs steps.tsv)
  for name in tests.xml info.json; do [ ! -f "$OUT/$name" ] || packed+=("$name"); done
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" "${packed[@]}"
  (cd "$OUT" && rm -rf "${packed[@]}")
  echo "gpu_check.sh: packed ${packed[*]} into $OUT/logs.tar.gz"
fi
exit "$FAILED"
