#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its test extras.
# torch is pinned to 2.13.0, which resolves to the CPU wheel on the project machines.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.sketchcomp-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
