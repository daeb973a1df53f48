"""Compute kernels of lasp_hf: the PyTorch reference (`reference`) and the Triton kernels (`triton`)."""

if __name__ == "kernels":
    # This folder installs as lasp_hf.kernels. It is imported as the top-level `kernels` only when the repository
    # root is on sys.path (Python started in the root: `python -c`, `python -m pytest`, a notebook). That name is
    # Hugging Face's `kernels` package, which transformers (>= 5.2x) imports with its modeling code: load that
    # package in this module's place so that transformers, and lasp_hf through it, still import from the root.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError(
            f"'import kernels' found lasp-hf's kernels/ folder ({os.path.dirname(os.path.abspath(__file__))}) "
            "because the repository root is on sys.path; that folder is lasp_hf.kernels, and no other "
            "package named 'kernels' (pip install kernels) is installed")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds once this body ends
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["kernels"]
        raise
else:
    from lasp_hf.kernels import reference

    __all__ = ["reference"]
