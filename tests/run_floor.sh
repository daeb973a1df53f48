#!/usr/bin/env bash
# CI's second stage: the smoke subset (tests/test_floor_smoke.py, the root import, the hub round trip, assisted
# decoding) on the oldest transformers / accelerate / datasets that pyproject.toml accepts
# (tests/floor_constraints.txt), in a venv of its own (.venv-floor). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export LASP_VENV=.venv-floor
VENV=$LASP_VENV
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.lasp-hf-floor-installed"
wanted="$(cat pyproject.toml tests/floor_constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    # A CPU torch from a local find-links folder when there is one (as setup_venv.sh), else pip's default.
    "$VENV/bin/python" -m pip install -q --no-index --no-deps "torch>=2.11" 2>/dev/null || true
    echo "installing lasp-hf with the floor versions into $VENV"
    "$VENV/bin/python" -m pip install -q -e ".[dev]" -c tests/floor_constraints.txt
    echo "$wanted" > "$stamp"
fi
"$VENV/bin/python" -c 'import transformers, accelerate, datasets, torch
print("floor stage: transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "datasets", datasets.__version__, "torch", torch.__version__)'
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LASP_FLOOR_STAGE=1
"$VENV/bin/python" -m pytest -q tests/test_floor_smoke.py tests/test_packaging.py \
    tests/test_modeling_hub.py::test_trust_remote_code_in_a_fresh_process "$@"
"$VENV/bin/python" -m pytest -q tests/test_modeling_generation.py -k "assisted or crop" "$@"
