"""Sequence-parallel runtime (LASP): process groups, communication, the sharded op."""
