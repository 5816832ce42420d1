#!/usr/bin/env bash
# The README's main-job command: train the tiny demo model on the synthetic cartoon set (made on first
# use), CPU-friendly. Re-running resumes from the last checkpoint in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh  # training and sampling only: no torch, diffusers, gradio or playwright
. .venv/bin/activate
exec python launch/train.py --config=configs/demo.py --workdir "${WORKDIR:-runs/demo}" "$@"
