"""Tests of the Triton kernels under Triton's interpreter: such a test module runs itself in a subprocess with
TRITON_INTERPRET=1 (the interpreter must be chosen before triton is imported), and its kernel tests are marked
`needs_interpreter` so that they run only there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _interpreting() -> bool:
    """TRITON_INTERPRET=1 and triton's own library functions really are interpreted in this process (they are
    not when triton was imported before the variable was set)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return True
    return isinstance(triton.language.standard.zeros, InterpretedFunction)


IN_INTERPRETER = _interpreting()
needs_interpreter = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 subprocess")
outside_interpreter = pytest.mark.skipif(IN_INTERPRETER, reason="already in the interpreter")


def run_in_interpreter_subprocess(test_file: str, *pytest_args: str) -> None:
    """Run `test_file` (with `pytest_args`) under TRITON_INTERPRET=1; fail with its output unless it passed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, *pytest_args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
