"""Compute kernels of lasp_hf: the PyTorch reference (`reference`) and the Triton kernels (`triton`)."""

if __name__ == "kernels":
    # This folder installs as lasp_hf.kernels. It is imported as the top-level `kernels` only when the repository
    # root is on sys.path (Python started in the root: `python -c`, `python -m pytest`, a notebook). That name is
    # Hugging Face's `kernels` package, which transformers (>= 5.2x) probes for and imports with its modeling code.
    # If that package is installed, load it in this module's place. If not, stay an empty module without a
    # `__version__`: transformers' `is_kernels_available()` (5.x) then reads "no usable version" and goes on
    # without it, as it does when nothing named `kernels` exists (an ImportError here would be fatal to it).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import system returns what sys.modules holds once this body ends
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules["kernels"]
            raise
    else:
        _folder = os.path.dirname(os.path.abspath(__file__))

        def __getattr__(name):
            # An AttributeError, so that getattr / hasattr probes read "absent"; `from kernels import x` turns it
            # into an ImportError naming this file.
            raise AttributeError(
                f"module 'kernels' is lasp-hf's kernels/ folder ({_folder}, which installs as lasp_hf.kernels), "
                "found because the repository root is on sys.path; Hugging Face's kernels package "
                f"(pip install kernels) is not installed, so it has no {name!r}")
else:
    from lasp_hf.kernels import reference

    __all__ = ["reference"]
