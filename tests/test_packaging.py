"""Importing from the repository root, where the folder kernels/ (lasp_hf.kernels) sits on sys.path under the
top-level name `kernels`, which belongs to Hugging Face's kernels package (a transformers dependency)."""

import importlib.metadata
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import transformers.modeling_utils  # imports Hugging Face's `kernels` when that package is installed
import lasp_hf
try:
    import kernels
    top_level, error = kernels.__file__, None
except ImportError as exc:
    top_level, error = None, str(exc)
print(json.dumps({"lasp_hf.kernels": lasp_hf.kernels.__file__, "kernels": top_level, "error": error,
                  "root_on_path": sys.path[0] == ""}))  # python -c puts the working directory first
"""


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_imports_from_the_repository_root():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["root_on_path"], "the probe must run with the repository root on sys.path"
    assert pathlib.Path(found["lasp_hf.kernels"]).resolve() == REPO / "kernels" / "__init__.py"
    if _hf_kernels_installed():
        assert found["error"] is None, found["error"]
        assert pathlib.Path(found["kernels"]).resolve() != REPO / "kernels" / "__init__.py"
    else:
        assert found["kernels"] is None
        assert "lasp_hf.kernels" in found["error"] and "pip install kernels" in found["error"], found["error"]


def test_script_folders_shadow_no_installed_module():
    """A script's folder comes first on sys.path, so a file there named like an installed module (as
    benchmarks/kernels.py was, once transformers began importing Hugging Face's `kernels`) replaces that module
    for every import in the process and in the workers it spawns."""
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    clashes = [
        str(path.relative_to(REPO))
        for folder in ("benchmarks", "recipes", "tests", "notebooks")
        for path in sorted((REPO / folder).glob("*.py"))
        if path.stem in installed
    ]
    assert not clashes, f"files named like installed modules: {clashes}"
