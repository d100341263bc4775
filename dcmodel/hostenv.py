"""The process environment dcmodel sets before jax loads: how many simulated CPU devices, and
(opt-in) how glibc's malloc backs the large blocks XLA:CPU asks for.

XLA:CPU takes each call's temporaries (~1.2 GB for the benchmark GPT's train step) from malloc.
glibc serves a block that size from fresh mmap'd pages and unmaps it on free, so every step
faults all of it in again, 4 KiB at a time: ~300k page faults and ~0.6 s of kernel time in a
2.4 s step on one device. DCMODEL_HOST_MALLOC=hugetlb sets glibc.malloc.hugetlb=1 (glibc >= 2.35):
malloc asks for transparent huge pages on such blocks, ~1k faults, the step ~1.15x faster on 1
and on 8 devices. It is opt-in because it also made some steps slower: in the step-time sweep
(benchmarks.step_time) spreads of 0.33-0.88 on 6 of 12 layouts where glibc's defaults gave <= 0.19,
and the step model under-predicts it (median error 13.4% vs 9.8%); see
benchmarks/experiments_gpt_speed/README.md. glibc reads its tunables only at start-up, so the CLI
re-executes itself once with the tunable set. Not glibc >= 2.35 (macOS, musl, older glibc):
nothing changes; with the kernel's transparent huge pages set to "never" the tunable does nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1",)
SWITCH = "DCMODEL_HOST_MALLOC"      # "hugetlb": MALLOC_TUNABLES; unset or "system": glibc's defaults


def _glibc() -> bool:
  """glibc with the hugetlb malloc tunable (2.35 and later)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    return sys.platform == "linux" and name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
  except (ValueError, OSError, AttributeError):
    return False


def with_host_malloc(env: Mapping[str, str]) -> dict[str, str]:
  """`env` with the malloc tunables added to GLIBC_TUNABLES if it asks for them and they apply."""
  out = dict(env)
  tunables = out.get("GLIBC_TUNABLES", "")
  if out.get(SWITCH) != "hugetlb" or "glibc.malloc.hugetlb" in tunables or not _glibc():
    return out
  out["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *MALLOC_TUNABLES]))
  return out


def reexec_with_host_malloc() -> None:
  """Replace this process (same pid, argv and stdio) by one started with the malloc tunables, if
  DCMODEL_HOST_MALLOC=hugetlb asks for them and it lacks them. Call first thing, before jax loads."""
  env = with_host_malloc(os.environ)
  if env == os.environ:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def set_host_devices(n: int) -> None:
  """Split the CPU into n simulated devices, unless XLA_FLAGS already says; before jax loads."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags and n > 1:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
