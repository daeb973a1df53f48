"""Host-side helpers (`lasp_hf.kernels.host`): values on CPU; on a GPU, that a packed batch's layers do not make
the CPU wait for the GPU (the number of synchronizing calls of a forward + backward does not grow with depth)."""

from __future__ import annotations

import warnings

import pytest
import torch
from lasp_hf.kernels.host import device_cu_seqlens, device_ints, device_tables, host_bounds
from test_modeling_common import VOCAB, tiny_model

def cuda_only(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def test_host_values_on_cpu():
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    assert host_bounds(cu) == (0, 3, 3, 10)
    cu[2] = 5
    assert host_bounds(cu) == (0, 3, 5, 10)
    ints = device_ints([4, 5, 6], "cpu", torch.int32)
    assert ints.dtype == torch.int32 and ints.tolist() == [4, 5, 6]
    tables = device_tables({"a": torch.tensor([1, 2]), "b": torch.tensor([], dtype=torch.int64),
                            "c": torch.tensor([7])}, "cpu", torch.int32)
    assert {name: t.tolist() for name, t in tables.items()} == {"a": [1, 2], "b": [], "c": [7]}
    assert all(t.dtype == torch.int32 for t in tables.values())
    made = device_cu_seqlens([0, 2, 9], "cpu")
    assert made.dtype == torch.int32 and made.tolist() == [0, 2, 9]


@cuda_only
def test_host_bounds_reads_a_cuda_tensor_once_per_version():
    cu = torch.tensor([0, 5, 9], device="cuda", dtype=torch.int32)
    assert host_bounds(cu) == (0, 5, 9)
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert host_bounds(cu) == (0, 5, 9)  # kept on the tensor: no read-back
        made = device_cu_seqlens([0, 4, 8], "cuda")
        assert host_bounds(made) == (0, 4, 8)
        ints = device_ints([1, 2, 3], "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ints.tolist() == [1, 2, 3] and made.tolist() == [0, 4, 8]
    cu[1] = 2  # in place: the version changes, the values are read again
    assert host_bounds(cu) == (0, 2, 9)


def _syncs_of_a_training_step(num_layers: int) -> int:
    model = tiny_model("lightning", num_hidden_layers=num_layers).cuda().train()
    ids = torch.randint(1, VOCAB, (1, 300), device="cuda")
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in (100, 70, 130)])[None]
    model(ids, labels=ids, position_ids=position_ids).loss.backward()  # warm: compile, plan caches
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(ids, labels=ids, position_ids=position_ids).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@cuda_only
def test_synchronizing_calls_do_not_grow_with_depth():
    two, six = _syncs_of_a_training_step(2), _syncs_of_a_training_step(6)
    assert six == two, f"synchronizing calls per training step: {two} with 2 layers, {six} with 6"
    assert two <= 6, f"{two} synchronizing calls in one packed training step of a 2-layer model"
