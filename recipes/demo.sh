#!/usr/bin/env bash
# The demo from a fresh clone: creates .venv, installs lasp-hf, trains tnl-tiny, reloads it, samples, plots the loss.
# Arguments go to recipes/demo.py (e.g. --max_steps 100 --output_dir /tmp/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/setup_venv.sh
exec "$PYTHON" recipes/demo.py "$@"
