#!/usr/bin/env bash
# Refreshes the chat page screenshots in docs/images/ (the README shows chat-page.png): runs the browser tests of the
# page with LFM2VL_SCREENSHOTS pointing there. Needs scripts/setup.sh to have run (chromium, chromium-driver, .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/images
LFM2VL_SCREENSHOTS="$PWD/docs/images" .venv/bin/python -m pytest -q tests/test_page.py -k "picture or phone"
ls -l docs/images/chat-page*.png
