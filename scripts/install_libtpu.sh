#!/usr/bin/env bash
# Installs the PyPI package `libtpu` (the TPU compiler + runtime) into .venv/libtpu, a folder OUTSIDE the venv's
# site-packages, so that only benchmarks/tpu_aot.py (which puts it on sys.path) sees it: every other tool keeps
# using the CPU (or GPU) backend without trying to start a TPU runtime. The version is the one jax's own
# `jax[tpu]` extra pins for the installed jax (read from jax's METADATA), so compiler and jaxlib match.
#   scripts/install_libtpu.sh [TARGET_DIR]      (default .venv/libtpu; safe to re-run)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
target="${1:-.venv/libtpu}"
[ -x "$py" ] || { echo "error: $py not found; run scripts/setup_venv.sh first" >&2; exit 1; }
spec=$("$py" - <<'PY'
import importlib.metadata as md
reqs = md.requires("jax") or []
pins = [r.split(";")[0].strip() for r in reqs if r.startswith("libtpu") and 'extra == "tpu"' in r]
print(pins[0] if pins else "libtpu")
PY
)
if [ -f "$target/.installed" ] && [ "$(cat "$target/.installed")" = "$spec" ]; then
  echo "libtpu already installed in $target ($spec)"
  exit 0
fi
echo "installing $spec into $target (about 200 MB)"
rm -rf "$target"
"$py" -m pip install -q --no-deps --target "$target" "$spec"
echo "$spec" > "$target/.installed"
echo "libtpu installed in $target ($spec)"
