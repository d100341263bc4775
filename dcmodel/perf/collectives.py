"""Collectives on a ring of n devices in alpha-beta form: t = steps * alpha + bytes_moved / bw.

`size_bytes` is the full (unsharded) array size S; `bw` is one-way bandwidth per device.
Bandwidth terms follow NCCL's PERFORMANCE.md: all-reduce 2(n-1)/n * S/B, reduce-scatter and
all-gather (n-1)/n * S/B, all-to-all (n-1)/n * S/B; ppermute sends each device's shard once.
"""

from __future__ import annotations


def all_gather(size_bytes: float, n: int, bw: float, alpha: float = 0.0) -> float:
  return 0.0 if n <= 1 else (n - 1) * alpha + size_bytes * (n - 1) / n / bw


def reduce_scatter(size_bytes: float, n: int, bw: float, alpha: float = 0.0) -> float:
  return all_gather(size_bytes, n, bw, alpha)


def all_reduce(size_bytes: float, n: int, bw: float, alpha: float = 0.0) -> float:
  """Ring all-reduce = reduce-scatter + all-gather."""
  return 0.0 if n <= 1 else 2 * (n - 1) * alpha + 2 * size_bytes * (n - 1) / n / bw


def all_to_all(size_bytes: float, n: int, bw: float, alpha: float = 0.0) -> float:
  return 0.0 if n <= 1 else (n - 1) * alpha + size_bytes * (n - 1) / n / bw


def ppermute(shard_bytes: float, bw: float, alpha: float = 0.0) -> float:
  """One neighbour exchange: every device sends its shard to the next."""
  return alpha + shard_bytes / bw


def torus_all_reduce(size_bytes: float, dims: tuple[int, ...], bw: float, alpha: float = 0.0) -> float:
  """Multi-dimensional torus: reduce-scatter then all-gather along each axis in turn; the data
  shrinks by each axis' size as it goes (the bandwidth-optimal schedule)."""
  t, s = 0.0, float(size_bytes)
  for n in dims:
    t += reduce_scatter(s, n, bw, alpha)
    s /= n
  for n in reversed(dims):
    s *= n
    t += all_gather(s, n, bw, alpha)
  return t


def ring_all_reduce_bytes(num_elements: int, n: int, bytes_per_element: float) -> float:
  """Bytes each device sends in a ring all-reduce: 2 (n-1)/n of the array (NCCL's bus factor).
  Compressed all-reduce only changes bytes_per_element (4 float32, 2 bf16, 1 int8)."""
  return 0.0 if n <= 1 else 2 * (n - 1) / n * num_elements * bytes_per_element
