"""Parallel layouts written out with shard_map, where the collectives are the subject of study.

The default path (train/step.py) lets XLA insert collectives from the sharding rules; the
modules here spell them out: explicit data parallelism (pmean), compressed all-reduce (bf16,
int8 with error feedback), Megatron tensor parallelism (psum), and a GPipe pipeline (ppermute).
Tests hold each one equal to its automatic counterpart.
"""
