#!/usr/bin/env bash
# The README's main-job command. Until training lands (issue: training at scale) the bundled demo is
# the tiny Paint-by-Sketch checkpoint from ../shared/fixtures: convert it into a model directory and
# check it against the original's golden outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
. .venv/bin/activate
FIX=../shared/fixtures
OUT=runs/demo_model
rm -rf "$OUT"
python launch/convert.py --src "$FIX/pbs_tiny.ckpt" --ldm_config "$FIX/pbs_tiny.yaml" \
  --clip_config "$FIX/pbs_tiny_clip_config.json" --resolution 64 --out "$OUT"
python launch/check_model.py --model "$OUT" --fixtures "$FIX"
