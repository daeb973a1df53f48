"""Sequence-parallel runtime (LASP): process groups, communication, the sharded op."""

from lasp_hf.parallel.context import SequenceParallelContext, init_sequence_parallel

__all__ = ["SequenceParallelContext", "init_sequence_parallel"]
