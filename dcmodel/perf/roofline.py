"""Roofline: arithmetic intensity and the compute/memory bound (scaling book, roofline.md:89-167)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Roofline:
  flops: float
  bytes: float
  peak_flops: float
  bandwidth: float

  @property
  def intensity(self) -> float:
    return self.flops / self.bytes

  @property
  def critical_intensity(self) -> float:
    return self.peak_flops / self.bandwidth

  @property
  def compute_bound(self) -> bool:
    return self.intensity > self.critical_intensity

  @property
  def time_s(self) -> float:
    """Lower bound with compute and memory traffic overlapped: max(T_math, T_mem)."""
    return max(self.flops / self.peak_flops, self.bytes / self.bandwidth)

  @property
  def attainable_flops(self) -> float:
    return min(self.peak_flops, self.intensity * self.bandwidth)


def matmul(b: int, d: int, f: int, bytes_per_el: int = 2) -> tuple[float, float]:
  """(FLOPs, bytes) of a B x D @ D x F matmul reading both operands and writing the result."""
  return 2.0 * b * d * f, float(bytes_per_el * (b * d + d * f + b * f))
