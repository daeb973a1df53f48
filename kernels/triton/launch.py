"""Kernel launches with less host time: `fast(kernel)[grid](*args, **kwargs)` launches like `kernel[grid](...)`.

Triton's `kernel[grid](...)` binds and specializes every argument, reads its settings and checks the kernel's
globals on every call: tens of microseconds of Python per launch, which at medium sequence lengths is more than
the kernel's GPU time (a layer of the sequence-parallel op launches about ten). After the first launch of each
specialization this wrapper calls the compiled kernel directly, with the addresses of CUDA tensors as integers
(Triton's launcher otherwise asks the driver about every tensor argument of every launch). Its cache key is at
least as fine as Triton's (on NVIDIA, Triton specializes a tensor on its dtype and 16-byte alignment and an integer
on being 1, divisible by 16 and fitting 32 bits; a constexpr on its value), so a hit is the kernel Triton would
have picked.

The normal path runs when interpreting (CPU), when a launch hook is set (profilers such as proton), while
torch.compile traces, for options other than num_warps / num_stages, or when this Triton's compiled kernels do
not take the arguments the way this expects (then `ENABLED` turns off for the process).
"""

from __future__ import annotations

import inspect

import torch
from lasp_hf.kernels.triton.utils import interpreting
from triton.runtime import driver

# Off: every launch goes through Triton's own path (kept for comparisons and as the fallback).
ENABLED = True
_OPTIONS = frozenset({"num_warps", "num_stages"})


def _spec(value):
    """What Triton's specialization can tell apart for a non-constexpr argument (or finer)."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "b", value
    if isinstance(value, int):
        return "i", value == 1, value % 16 == 0, -(2 ** 31) <= value < 2 ** 31, value < 2 ** 63
    if isinstance(value, float):
        return "f"
    if value is None:
        return None
    return type(value), value


class FastLaunch:
    """A Triton JIT kernel whose repeated launches skip Triton's per-call binding (see the module docstring)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        params = list(inspect.signature(fn.fn).parameters.values())
        self.arg_names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        # (The interpreter's functions have no `params`; they always take the normal path.)
        constexpr = {p.name for p in getattr(fn, "params", ()) if p.is_constexpr}
        self.is_constexpr = [name in constexpr for name in self.arg_names]
        self.accepted = frozenset(self.arg_names) | _OPTIONS
        self.cache: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        global ENABLED
        if not ENABLED or interpreting() or _hooks_set() or torch.compiler.is_compiling():
            # (Under torch.compile, Dynamo captures `kernel[grid](...)` of a Triton JIT function itself.)
            return self.fn[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        # Keyword arguments (the constexprs and launch options at our call sites) by value, positional ones by
        # what Triton specializes on (by value where the parameter is a constexpr).
        try:
            key = [device, *kwargs.items()]
            call = list(args)
            for i, (a, c) in enumerate(zip(args, self.is_constexpr)):
                if c:
                    key.append(a)
                elif isinstance(a, torch.Tensor):  # (inline `_spec` of a tensor: the common case, per launch)
                    ptr = a.data_ptr()
                    key += (a.dtype, not ptr & 15)
                    if a.is_cuda:
                        # The address itself: Triton's launcher takes it as is, where for a tensor it calls data_ptr()
                        # and asks the driver about the pointer (cuPointerGetAttribute), a driver call per tensor
                        # argument of every launch. (Tensors elsewhere keep Triton's check and its error.)
                        call[i] = ptr
                else:
                    key.append(_spec(a))
            key = tuple(key)
            entry = self.cache.get(key)
        except TypeError:  # an unhashable keyword value: Triton's path
            return self.fn[grid](*args, **kwargs)
        if entry is None:
            compiled = self.fn[grid](*args, **kwargs)
            if kwargs.keys() <= self.accepted:
                # The parameters after the positional ones, in signature order, with their defaults.
                rest = tuple(kwargs[name] if name in kwargs else self.defaults[name]
                             for name in self.arg_names[len(args):])
                self.cache[key] = (compiled, rest)
            return compiled
        compiled, rest = entry
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        stream = driver.active.get_current_stream(device)
        runtime = _knobs.runtime  # inactive hooks (None, or empty chains) passed on as Triton passes them
        try:
            compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None,
                         runtime.launch_enter_hook, runtime.launch_exit_hook, *call, *rest)
        except TypeError:
            # This Triton's launcher takes its arguments differently: use Triton's own path from now on.
            ENABLED = False
            return self.fn[grid](*args, **kwargs)
        return compiled


try:
    from triton import knobs as _knobs
except ImportError:  # older Triton: hooks live elsewhere; always take the normal path
    _knobs = None


def _hook_active(hook) -> bool:
    """A launch hook is None (Triton 3.6) or a HookChain with a list of calls (newer Triton)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    if _knobs is None:
        return True
    runtime = _knobs.runtime
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


def fast(fn) -> FastLaunch:
    return FastLaunch(fn)
