#!/usr/bin/env bash
# The test suite from a fresh clone: creates .venv, installs lasp-hf with the dev extra, runs every test
# (GPU tests skip without CUDA). Arguments go to pytest (e.g. tests/test_data.py, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/setup_venv.sh
status=0
"$PYTHON" -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
fi
exit "$status"
