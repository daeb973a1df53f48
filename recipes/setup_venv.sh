# Sourced by recipes/demo.sh and tests/run.sh: make sure .venv (at the repo root) exists and holds lasp-hf
# installed in editable mode with the dev and deepspeed extras. Sets PYTHON to the venv's interpreter.
# Reinstalls only when pyproject.toml changed since the last install (a stamp file in .venv records its hash).

VENV="${LASP_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "lasp-hf needs Python >= 3.10; python3 is $(python3 --version 2>&1)" >&2; exit 1; }
    echo "creating $VENV"
    python3 -m venv "$VENV"
fi
PYTHON="$VENV/bin/python"
stamp="$VENV/.lasp-hf-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    if ! "$PYTHON" -c 'import torch' 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
        # No GPU: a CPU-only torch build (a few hundred MB, against GBs for the CUDA build) is all we need.
        # Take one if pip finds it without an index (a local find-links folder); else pip's default build.
        "$PYTHON" -m pip install -q --no-index --no-deps "torch>=2.5" 2>/dev/null \
            && echo "installed $("$PYTHON" -m pip list 2>/dev/null | grep -E '^torch ' | tr -s ' ') from a local wheel" \
            || true
    fi
    echo "installing lasp-hf and its dev and deepspeed extras into $VENV"
    # DeepSpeed (an sdist; built without its ops in seconds) runs tests/test_train_deepspeed.py: ZeRO on CPU processes.
    "$PYTHON" -m pip install -q -e ".[dev,deepspeed]"
    echo "$wanted" > "$stamp"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # everything here is local: fail fast instead of reaching out
