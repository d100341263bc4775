"""Pipeline bubble. GPipe (arXiv:1811.06965 s2.3) and 1F1B (Megatron, arXiv:2104.04473 s2.2)."""


def bubble_fraction(stages: int, microbatches: int) -> float:
  """Idle share of total time, (p-1)/(m+p-1): GPipe and 1F1B alike."""
  return (stages - 1) / (microbatches + stages - 1)


def bubble_over_ideal(stages: int, microbatches: int, interleave: int = 1) -> float:
  """Megatron's form, bubble time / ideal time = (1/v)(p-1)/m."""
  return (stages - 1) / (microbatches * interleave)
