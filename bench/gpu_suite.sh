#!/usr/bin/env bash
# The GPU path, run for real (issue 19): one script that, on a machine with a CUDA GPU and this
# repository, runs the `gpu`-marked tests and the GPU benchmarks within a time budget, and
# writes every log, table and a summary to $OUT.
#
#   bench/gpu_suite.sh wheels   # here, with PyPI: put what a bare GPU machine lacks into .whl/
#   bench/gpu_suite.sh          # there: install .whl/ (no network), run, write $OUT
#
# Steps, most important first (GPU_SUITE_STEPS="train tests" runs only those, e.g. to rerun
# what failed); each runs under its own timeout and the whole suite under
# GPU_SUITE_BUDGET_S (default 450 s), so a step that hangs or fails costs its limit, not the
# run, and steps that no longer fit are reported as skipped:
#   env              GPU, driver, torch/triton/deepspeed versions; measured bf16 matmul TFLOP/s
#   train            bench/train_step.py: paper-shaped joint step (paper widths and token
#                    counts, planner depth 4, generator depth 8), ZeRO-3, bf16, checkpointing
#                    off and on: tokens/s, TFLOP/s, MFU
#   gen-eager-sdpa   bench/generate.py: paper preset, 13 frames (1 given) at 512 px, DDIM 25,
#                    bf16, temporal and spatio-temporal generator, cfg 1 and 2.5: s, peak GiB
#   tests            pytest -m gpu (flex vs SDPA at paper token counts, Identity Attention and
#                    a bf16 train step + sample on CUDA)
#   gen-eager-flex   the same with flex attention (spatio-temporal, where it differs)
#   gen-compiled-sdpa  the same with every block compiled (temporal, cfg 2.5)
#   train-levers     the joint step with flex attention, a plain PyTorch step beside ZeRO-3,
#                    and each row's top CUDA kernels
#   asymmetry        bench/asymmetry.py: paper preset, asymmetric vs symmetric planner
#
# Without a CUDA GPU the script stops at once with exit 2 and says so. GPU_SUITE_SMOKE=1 runs
# every step on CPU at toy sizes instead: it checks the wiring (installs, imports, arguments),
# not the numbers. The GPU machine's Python may differ from ours (3.12 and torch 2.11 at last
# reading): only what it lacks is installed, into a private --target folder.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

# What a bare GPU image (torch, triton, einops, numpy, safetensors, fsspec, pyyaml, pytest...)
# lacks to import mardini, deepspeed and the KL autoencoder. Versions: those of our .venv.
GPU_WHEELS=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection
  typing-extensions diffusers importlib-metadata)

if [ "${1:-}" = "wheels" ]; then
  # Here: the versions our resolver chose, as wheels for the GPU machine's Python (3.12 by
  # default, GPU_PYTHON_VERSION to change). deepspeed ships only an sdist: built here once into
  # a pure-Python wheel (its CUDA ops are JIT-built where needed; we use none of them).
  set -e
  VENV_PY=${VENV_PY:-.venv/bin/python}
  PYVER=${GPU_PYTHON_VERSION:-3.12}
  mkdir -p .whl
  rm -f .whl/*.whl
  for name in "${GPU_WHEELS[@]}"; do
    version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    if [ "$name" = deepspeed ]; then
      "$VENV_PY" -m pip wheel --quiet --no-deps "deepspeed==$version" -w .whl
    else
      "$VENV_PY" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$name==$version"
    fi
  done
  du -sh .whl
  ls .whl
  exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/out/gpu_suite}
SMOKE=${GPU_SUITE_SMOKE:-0}
BUDGET=${GPU_SUITE_BUDGET_S:-450}
MIN_STEP=20 # a step with less time than this left is skipped, not started
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$LOGS"
SUMMARY=$OUT/summary.md
START=$(date +%s)
DEADLINE=$((START + BUDGET))

if [ "$SMOKE" != 1 ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda)" 2>&1
    echo "gpu_suite: no CUDA GPU is visible to $PY (torch.cuda.is_available() is False)." >&2
    echo "  This suite measures the GPU path and needs one. On CPU, GPU_SUITE_SMOKE=1 checks its" >&2
    echo "  wiring at toy sizes; the CPU benchmarks run without it (bench/train_step.py --cpu)." >&2
    exit 2
  fi
fi

# Install what is missing, from the carried wheels, into a private folder (no network there).
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=$WORK/site
  if ! "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" --find-links .whl "${GPU_WHEELS[@]}" >"$LOGS/install.log" 2>&1; then
    cat "$LOGS/install.log" >&2
    echo "gpu_suite: installing from .whl/ failed (above); refill it with: bench/gpu_suite.sh wheels" >&2
    exit 3
  fi
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import deepspeed, pydantic, diffusers, einops, yaml, fsspec, safetensors, mardini.models" \
  >"$LOGS/imports.log" 2>&1; then
  tail -n 5 "$LOGS/imports.log" >&2
  echo "gpu_suite: a dependency is missing (above). Carry wheels: run 'bench/gpu_suite.sh wheels'" \
    "here and send .whl/ with the repository." >&2
  exit 3
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor TRITON_CACHE_DIR=$WORK/triton

declare -a ROWS=() RAN=()
# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), log to $LOGS/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local now left rc status
  case " ${GPU_SUITE_STEPS:-$name} " in *" $name "*) ;; *) return ;; esac
  now=$(date +%s)
  left=$((DEADLINE - now))
  if [ "$left" -lt "$MIN_STEP" ]; then
    ROWS+=("| $name | skipped: out of time (${left}s left) | 0 |")
    echo "=== $name: skipped, ${left}s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  RAN+=("$name")
  echo "\$ $*" >"$LOGS/$name.log"
  timeout -k 10 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  ROWS+=("| $name | $status | $(($(date +%s) - now)) |")
  echo "    $status in $(($(date +%s) - now))s"
}

if [ "$SMOKE" = 1 ]; then
  # Toy sizes on CPU: the same commands and options, none of the GPU numbers.
  export DS_ACCELERATOR=cpu
  TESTS=(-m "not gpu" tests/test_attention_paths.py -q -x -k "config_switches")
  TRAIN=(--cpu --preset debug --frames 4 --size 32 --steps 1)
  LEVERS=("${TRAIN[@]}")
  GEN=(--preset debug --resolution 32 --frames 5 --steps 2 --repeats 1)
  ASYM=(--preset debug --resolution 32 --frames 4 --steps 2 --repeats 1 --skip-memory)
else
  TESTS=(-m gpu $(grep -l "pytest.mark.gpu" tests/*.py) -v)
  TRAIN=(--steps 10 --micro-batch 2 --backends sdpa --checkpointing off on)
  # The levers: flex attention (no dense mask), and a plain PyTorch step beside ZeRO-3, with
  # each row's top CUDA kernels.
  LEVERS=(--steps 10 --micro-batch 2 --backends flex --checkpointing off --plain --profile)
  GEN=(--repeats 1)
  ASYM=(--repeats 1 --skip-memory)
fi

step env 60 "$PY" - <<'EOF'
import subprocess, sys, time, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for mod in ("triton", "deepspeed", "pydantic", "diffusers"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:  # report, do not stop: the steps say what they need
        print(mod, "unavailable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
    print(subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                          "--format=csv"], capture_output=True, text=True).stdout.strip())
    # The ceiling MFU is read against: a large bf16 matmul on random data (median of 10).
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); a @ b; end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = sorted(times)[len(times) // 2]
    print(f"measured bf16 matmul 8192^3: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s")
EOF

step train 150 "$PY" bench/train_step.py "${TRAIN[@]}"
step gen-eager-sdpa 150 "$PY" bench/generate.py "${GEN[@]}" --backend sdpa
step tests 120 "$PY" -m pytest -p no:cacheprovider "${TESTS[@]}"
# flex differs from sdpa only where a group is at least one 128-token tile: spatio-temporal
# attention (13 x 1024 tokens); temporal groups are 13 tokens and keep SDPA's dense mask.
step gen-eager-flex 60 "$PY" bench/generate.py "${GEN[@]}" --backend flex \
  --attentions spatiotemporal --cfg-scales 1
step gen-compiled-sdpa 100 "$PY" bench/generate.py "${GEN[@]}" --backend sdpa --compile \
  --attentions temporal --cfg-scales 2.5
step train-levers 150 "$PY" bench/train_step.py "${LEVERS[@]}"
step asymmetry 150 "$PY" bench/asymmetry.py "${ASYM[@]}"

{
  echo "# GPU suite, $(date -u +%Y-%m-%dT%H:%MZ), $(($(date +%s) - START)) s of a ${BUDGET} s budget"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  for name in "${RAN[@]}"; do
    log=$LOGS/$name.log
    echo
    echo "## $name"
    echo '```'
    # The tables are at the end; tracebacks too.
    grep -v -E "^\s*$|Warning|warn\(" "$log" | tail -n 16
    echo '```'
  done
} >"$SUMMARY"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
cat "$SUMMARY"
case "${ROWS[*]}" in *failed* | *"timed out"*) exit 1 ;; esac
exit 0
