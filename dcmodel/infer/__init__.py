"""Inference: batch predict, KV-cache generation, results store and query."""
