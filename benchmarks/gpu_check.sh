#!/usr/bin/env bash
# GPU check (issue 12): cuDNN attention parity, bench-sd train step and 50-step sampling with xla vs cudnn
# attention (fp32, bf16), and the full-size 512² train step (images/s, MFU) — ≤ 10 minutes on one CUDA machine
# WITHOUT network. The machine is assumed to have a CUDA build of jax (0.11.x), flax, optax, orbax and torch;
# the other Python packages this needs (ml_collections and its deps) come as wheels in ./wheels (gitignored),
# made beforehand on a machine with network by `--download_wheels`.
#
#   benchmarks/gpu_check.sh --download_wheels [--python_version 3.12]   # here, with network: fill ./wheels
#   benchmarks/gpu_check.sh                                             # there: install wheels, run, log
#   benchmarks/gpu_check.sh --dry_run                                   # anywhere: syntax + CPU smoke run
#   benchmarks/gpu_check.sh -- --sections parity,bench --full_batch 16  # args after -- go to gpu_check.py
#
# Output: the tables of benchmarks/gpu_check.py, also written to gpu_check_<host>_<time>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "${GPU_CHECK_SYSTEM_PYTHON:-0}" != 1 ] && PY=.venv/bin/python
REQUIREMENTS="ml_collections"  # imported by configs/ and the optimizer config; not part of the jax stack
LIMIT_S="${GPU_CHECK_LIMIT_S:-570}"

mode=run
pyver=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --download_wheels) mode=download ;;
    --dry_run) mode=dry ;;
    --python_version) pyver="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "error: unknown option $1 (use --download_wheels, --dry_run, --python_version V, -- ARGS)" >&2; exit 2 ;;
  esac
  shift
done

case "$mode" in
  download)
    mkdir -p wheels
    pin=()
    [ -n "$pyver" ] && pin=(--python-version "$pyver" --platform manylinux2014_x86_64 --only-binary=:all:)
    "$PY" -m pip download --dest wheels "${pin[@]}" $REQUIREMENTS
    echo "$REQUIREMENTS" | tr ' ' '\n' > wheels/requirements.txt
    echo "wheels/ ready ($(ls wheels | wc -l) files, $(du -sh wheels | cut -f1)); copy the working tree to the GPU machine"
    ;;
  dry)
    bash -n "$0"
    "$PY" -m py_compile benchmarks/gpu_check.py
    echo "syntax ok; CPU smoke run of the Python part on a tiny model:"
    JAX_PLATFORMS=cpu PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 900 "$PY" benchmarks/gpu_check.py --tiny
    ;;
  run)
    missing=$("$PY" - <<'PYCODE'
import importlib.util
need = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections"]
print(" ".join(n for n in need if importlib.util.find_spec(n.split(".")[0]) is None))
PYCODE
)
    if [ -n "$missing" ]; then
      if [ -f wheels/requirements.txt ]; then
        echo "installing from ./wheels (no network): $missing"
        "$PY" -m pip install -q --no-index --find-links wheels -r wheels/requirements.txt
      else
        echo "error: missing Python packages: $missing; on a machine with network run" \
             "benchmarks/gpu_check.sh --download_wheels and bring ./wheels along" >&2
        exit 1
      fi
    fi
    "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 'error: jax sees no GPU (backend ' + jax.default_backend() + '); is this the CUDA build of jax?')"
    log="gpu_check_$(hostname)_$(date -u +%Y%m%dT%H%M%S).log"
    echo "writing $log"
    # The measured program, not a cached one; default matmul precision (TF32 off for fp32 parity is not needed:
    # the parity runs in bf16/fp16).
    env -u JAX_COMPILATION_CACHE_DIR PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
      timeout "$LIMIT_S" "$PY" benchmarks/gpu_check.py "${extra[@]}" 2>&1 | tee "$log"
    exit "${PIPESTATUS[0]}"
    ;;
esac
