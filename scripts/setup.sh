#!/usr/bin/env bash
# Creates the two environments the tests use (idempotent):
#   .venv         torch 2.13.0 (CPU) first, then lfm2vl with its serve, train and test extras (transformers 5.24 as the model oracle)
#   .venv-oracle  torch 2.14.1 + torchvision 0.29.1 + transformers 5.24: transformers' image processor needs torchvision,
#                 which does not import beside torch 2.13.0; the processor parity tests call into it as a subprocess.
#   chromium + chromium-driver (Debian's packages, installed when missing and this runs as root or with sudo): the chat
#                 page's tests drive a real headless browser
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then APT=(apt-get); elif sudo -n true 2>/dev/null; then APT=(sudo apt-get); else APT=(); fi
  if [ ${#APT[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    { "${APT[@]}" update -q && "${APT[@]}" install -y -q chromium chromium-driver; } >/dev/null ||
      echo "setup.sh: apt-get could not install chromium chromium-driver; the chat page tests will fail" >&2
  else
    echo "setup.sh: chromium and chromium-driver are missing and cannot be installed without root;" \
         "the chat page tests will fail until they are (apt-get install chromium chromium-driver)" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[serve,train,test]"
if [ "${LFM2VL_SKIP_ORACLE_ENV:-0}" != 1 ]; then
  if [ ! -x .venv-oracle/bin/python ]; then
    "$PY" -m venv .venv-oracle
  fi
  .venv-oracle/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  .venv-oracle/bin/pip install -q transformers==5.24.0 pillow numpy tokenizers safetensors jinja2
fi
