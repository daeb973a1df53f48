"""Sequence-parallel runtime (LASP): process groups, communication, the sharded ops, batch sharding.

    ctx = init_sequence_parallel(sp_size=4, mode="ring")      # every rank, after init_process_group
    local = shard_batch_for_sp(batch, ctx)                     # the same full batch on every SP rank
    out = model(**local, loss_reduction="sum")                 # LaspForCausalLM: this rank's slice

Inside the model, `linear_attention(..., sp_group=ctx, sp_mode=ctx.mode)` runs LASP (`lasp.py`) and
softmax layers call `sp_softmax_attention` (`attention.py`); all collectives live in `comm.py`.
`sp_prefill(model, input_ids, ctx)` (`prefill.py`) prefills one prompt across the group for decoding.
"""

from lasp_hf.parallel.context import SequenceParallelContext, init_sequence_parallel
from lasp_hf.parallel.prefill import sp_prefill
from lasp_hf.parallel.sharding import shard_batch_for_sp

__all__ = ["SequenceParallelContext", "init_sequence_parallel", "shard_batch_for_sp", "sp_prefill"]
