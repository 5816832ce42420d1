#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package: `setup_venv.sh` installs what training and sampling need
# (scripts/demo.sh); `setup_venv.sh EXTRA` adds one of setup.py's extras: test (scripts/test.sh), torch, app, tpu,
# cuda12. torch (test, torch) is pinned to 2.13.0, which resolves to the CPU wheel on the project machines.
#
# Only a .venv that belongs to this checkout is touched: the checkout's path is recorded in
# .venv/.sketchcomp-project when the venv is created here. A .venv recorded for another checkout, a .venv
# that is a symlink (shared), or one whose bin/activate points elsewhere is refused with one line, so an
# install here never re-points another checkout's editable install. An up-to-date .venv of this checkout
# is used as it is (no reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
case "$extra" in
  ""|test|torch|app|tpu|cuda12) ;;
  *) echo "setup_venv.sh: error: unknown extra '$extra'; give one of test, torch, app, tpu, cuda12 (or none)" >&2; exit 2 ;;
esac
here="$(pwd -P)"
marker=.venv/.sketchcomp-project
refuse() {
  echo "setup_venv.sh: error: $1; remove it (or run this script from that checkout) and try again" >&2
  exit 1
}
if [ -L .venv ]; then
  refuse ".venv is a symlink to $(readlink .venv), shared with another checkout: this script installs only into its own .venv"
fi
if [ -e .venv ] && [ ! -d .venv ]; then
  refuse ".venv is a file, not a virtual environment"
fi
if [ -d .venv ]; then
  if [ -f "$marker" ]; then
    owner="$(cat "$marker")"
    [ "$owner" = "$here" ] || refuse ".venv belongs to the checkout $owner, not to $here"
  elif [ -f .venv/bin/activate ]; then
    # A .venv made before the marker existed: its activate script names the path it was created at.
    created="$(sed -n 's/^VIRTUAL_ENV=["'"'"']\{0,1\}\([^"'"'"']*\)["'"'"']\{0,1\}$/\1/p' .venv/bin/activate | head -n 1)"
    created_real="$(cd "$created" 2>/dev/null && pwd -P || echo "$created")"
    [ "$created_real" = "$here/.venv" ] || refuse ".venv was created at $created, not for this checkout ($here)"
    echo "$here" > "$marker"
  elif [ -n "$(ls -A .venv)" ]; then
    refuse ".venv exists but is not a virtual environment (no bin/activate)"
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  echo "$here" > "$marker"
fi
. .venv/bin/activate
stamp=.venv/.sketchcomp-installed${extra:+-$extra}
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  case "$extra" in test|torch) python -m pip install -q "torch==2.13.0" ;; esac
  python -m pip install -q -e ".${extra:+[$extra]}"
  touch "$stamp"
fi
