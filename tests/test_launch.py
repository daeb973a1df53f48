"""`kernels/triton/launch.py`: the cached launch path takes Triton's path whenever the specialization may differ.

CPU only, with a stand-in for a JIT function and its compiled kernel; the GPU test in tests/gpu checks the real
kernels give the same results both ways.
"""

import types

import pytest
import torch

launch = pytest.importorskip("lasp_hf.kernels.triton.launch")


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self, log):
        self.log = log

    def run(self, *args):
        self.log.append(("fast", args))


class _Jit:
    """What FastLaunch uses of a triton JITFunction: fn, params, kernel[grid](...) returning the compiled kernel."""

    def __init__(self):
        def kernel(x, n, scale, BLOCK, FLAG=False):
            pass

        self.fn = kernel
        self.__name__ = "kernel"
        self.params = [_Param("x", False), _Param("n", False), _Param("scale", False), _Param("BLOCK", True),
                       _Param("FLAG", True)]
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return _Compiled(self.log)

        return run


@pytest.fixture
def jit(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "ENABLED", True)
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 1234)
    monkeypatch.setattr(launch, "driver", types.SimpleNamespace(active=active))
    runtime = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(launch, "_knobs", types.SimpleNamespace(runtime=runtime))
    return _Jit()


def _kinds(log):
    return [entry[0] for entry in log]


def test_second_launch_calls_the_compiled_kernel_with_every_argument_in_order(jit):
    kernel = launch.FastLaunch(jit)
    x = torch.zeros(64)
    kernel[(3, 2)](x, 64, 0.5, BLOCK=16, num_warps=4)
    kernel[(5,)](x, 64, 0.5, BLOCK=16, num_warps=4)
    assert _kinds(jit.log) == ["triton", "fast"]
    args = jit.log[1][1]
    # grid padded to 3 dims, the stream, the compiled function and metadata, no launch metadata, the hooks
    assert args[:9] == (5, 1, 1, 1234, "function", "metadata", None, None, None)
    assert args[9] is x and args[10:] == (64, 0.5, 16, False)  # constexprs and defaults included, signature order


class _CudaLike(torch.Tensor):
    """A CPU tensor that says it is on CUDA (what the cached path looks at)."""

    @property
    def is_cuda(self):
        return True


def test_cuda_tensors_are_passed_as_their_addresses(jit):
    """Triton's launcher takes an integer pointer as is; for a tensor it calls data_ptr() and asks the driver about
    it on every launch. The first launch (Triton's own path) still gets the tensors."""
    kernel = launch.FastLaunch(jit)
    x = torch.zeros(64).as_subclass(_CudaLike)
    kernel[(1,)](x, 64, 0.5, BLOCK=16)
    kernel[(1,)](x, 64, 0.5, BLOCK=16)
    assert jit.log[0][2][0] is x
    args = jit.log[1][1]
    assert args[9] == x.data_ptr() and type(args[9]) is int and args[10:12] == (64, 0.5)


@pytest.mark.parametrize("change", ["int is 1", "int not multiple of 16", "int64", "dtype", "misaligned",
                                    "constexpr", "num_warps"])
def test_anything_triton_specializes_on_takes_triton_path(jit, change):
    kernel = launch.FastLaunch(jit)
    base = torch.zeros(64)
    kwargs = dict(BLOCK=16, num_warps=4)
    x, n = base, 32
    if change == "int is 1":
        n = 1
    elif change == "int not multiple of 16":
        n = 33
    elif change == "int64":
        n = 2 ** 40
    elif change == "dtype":
        x = base.double()
    elif change == "misaligned":
        x = base[1:]
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "num_warps":
        kwargs["num_warps"] = 8
    kernel[(1,)](base, 32, 0.5, BLOCK=16, num_warps=4)
    kernel[(1,)](x, n, 0.5, **kwargs)
    assert _kinds(jit.log) == ["triton", "triton"]
    kernel[(1,)](x, n, 0.5, **kwargs)
    assert _kinds(jit.log) == ["triton", "triton", "fast"]


def test_hooks_unknown_options_compiling_and_interpreter_take_triton_path(jit, monkeypatch):
    kernel = launch.FastLaunch(jit)
    x = torch.zeros(64)
    kernel[(1,)](x, 32, 0.5, BLOCK=16)
    kernel[(1,)](x, 32, 0.5, BLOCK=16, maxnreg=128)  # an option this does not key on
    monkeypatch.setattr(launch._knobs.runtime, "launch_enter_hook", types.SimpleNamespace(calls=[print]))
    kernel[(1,)](x, 32, 0.5, BLOCK=16)
    monkeypatch.setattr(launch._knobs.runtime, "launch_enter_hook", types.SimpleNamespace(calls=[]))  # empty chain
    kernel[(1,)](x, 32, 0.5, BLOCK=16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # Dynamo traces Triton's own launch
    kernel[(1,)](x, 32, 0.5, BLOCK=16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    kernel[(1,)](x, 32, 0.5, BLOCK=16)
    assert _kinds(jit.log) == ["triton", "triton", "triton", "fast", "triton", "triton"]


def test_a_launcher_that_rejects_the_arguments_turns_the_path_off(jit, monkeypatch):
    kernel = launch.FastLaunch(jit)
    x = torch.zeros(64)

    def refuse(self, *args):
        raise TypeError("launcher takes other arguments")

    kernel[(1,)](x, 32, 0.5, BLOCK=16)
    monkeypatch.setattr(_Compiled, "run", refuse)
    kernel[(1,)](x, 32, 0.5, BLOCK=16)
    assert launch.ENABLED is False
    assert _kinds(jit.log) == ["triton", "triton"]
