#!/usr/bin/env bash
# Installs Debian's Chromium for the headless-browser test of the web UI (tests/test_app.py), when missing.
# Playwright drives it through executable_path=/usr/bin/chromium; `playwright install` (which downloads its
# own browser builds) is not used. Needs root and the Debian package registry; a no-op when present.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_browser.sh: /usr/bin/chromium is missing; run as root (apt-get install -y chromium)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version 2>/dev/null || true
