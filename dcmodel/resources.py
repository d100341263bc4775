"""What this machine has, and the one-line errors for a request that cannot fit in it.

Every number a user types that sizes work (devices, processes, rows, batch sizes, sequence
lengths, tokens to generate, ...) is checked here against what exists before the work starts:
an impossible request is a `UserError`, never a hang or an allocation that takes the machine.
The memory figures are lower bounds of what the work needs (so nothing that fits is refused),
compared with the memory available now.
"""

from __future__ import annotations

import os

import psutil

from dcmodel.errors import UserError

# Simulated CPU devices: each costs start-up time and ~1 MB (1,024 took 30 s and 1.3 GB to
# start here; 256, 10 s and 0.5 GB). More than any layout study needs on one host.
MAX_HOST_DEVICES = 512
PROCESS_BYTES = 512 * 2**20     # what one more JAX process on this host costs, at least (~0.4 GB measured)


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"


def host_available_bytes() -> int:
  return int(psutil.virtual_memory().available)


def cpu_count() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_count(name: str, value: int, low: int = 1, high: int | None = None, why: str = "") -> None:
  """`low <= value <= high`, or the one-line error naming the bound and why it is there."""
  if value < low or (high is not None and value > high):
    bound = f"between {low} and {high}" if high is not None else f">= {low}"
    raise UserError(f"{name} must be {bound}, got {value}" + (f" ({why})" if why else ""))


def check_host_memory(need_bytes: float, what: str, fix: str) -> None:
  """`what` needs at least `need_bytes` of this host's memory."""
  free = host_available_bytes()
  if need_bytes > free:
    raise UserError(f"{what} needs at least {gib(need_bytes)} of memory, but this host has {gib(free)} available; {fix}")


def device_memory_bytes(device) -> int | None:
  """An accelerator's memory (None on CPU, where devices share the host's memory)."""
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def check_device_memory(per_device_bytes: float, host_bytes: float, devices, what: str, fix: str) -> None:
  """`what` needs `per_device_bytes` on each of `devices` (this process's) plus `host_bytes` of
  host memory. On CPU the devices are the host's memory, so everything is counted there."""
  devices = list(devices)
  limit = device_memory_bytes(devices[0]) if devices else None
  if limit is None:
    check_host_memory(per_device_bytes * len(devices) + host_bytes, what, fix)
    return
  if per_device_bytes > limit:
    raise UserError(f"{what} needs at least {gib(per_device_bytes)} per device, but a {devices[0].device_kind} holds "
                    f"{gib(limit)}; {fix}")
  check_host_memory(host_bytes, what, fix)
