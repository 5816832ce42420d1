#!/usr/bin/env bash
# The README's test command: set up .venv with the test extra if needed (and Debian's Chromium for the web-UI browser test),
# then run the default (fast) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test
bash scripts/install_browser.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
