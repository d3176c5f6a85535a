#!/usr/bin/env bash
# The test command (README and .ci/run): set up both environments, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LFM2VL_ORACLE_PYTHON="$PWD/.venv-oracle/bin/python"
exec .venv/bin/python -m pytest -q "$@"
