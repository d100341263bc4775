"""The process environment dcmodel sets before jax loads: how many simulated CPU devices, and how
glibc's malloc treats the large blocks XLA:CPU asks for.

XLA:CPU takes each call's temporaries (~1.2 GB for the benchmark GPT's train step) from malloc on
a runtime thread. glibc serves a block that size from fresh mmap'd pages (a thread's arena
cannot hold it) and unmaps it on free, so every step faults all of it in again: ~300k page
faults and ~0.6 s of kernel time in a 2.4 s step, 1 device. One arena that neither mmaps such
blocks nor trims its heap keeps those pages: 0 faults, the step ~1.18x faster
(benchmarks/experiments_gpt_speed/README.md). glibc reads its tunables only at start-up, so
the CLI re-executes itself once with them set (and DCMODEL_HOST_MALLOC=glibc, which also marks
the re-executed process). Opt out with DCMODEL_HOST_MALLOC=system; a GLIBC_TUNABLES that
already sets any malloc tunable is left as the user wrote it. Not glibc
(macOS, musl): nothing changes. The heap then keeps its peak size for the process's life.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

MALLOC_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_threshold=4294967296",
                   "glibc.malloc.trim_threshold=100000000000")
OPT_OUT = "DCMODEL_HOST_MALLOC"


def _glibc() -> bool:
  try:
    return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError):
    return False


def with_host_malloc(env: Mapping[str, str]) -> dict[str, str]:
  """`env` with dcmodel's malloc tunables added to GLIBC_TUNABLES, where they apply."""
  out = dict(env)
  tunables = out.get("GLIBC_TUNABLES", "")
  if OPT_OUT in out or "glibc.malloc." in tunables or not _glibc():
    return out
  out["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *MALLOC_TUNABLES]))
  out[OPT_OUT] = "glibc"
  return out


def system_malloc(env: Mapping[str, str]) -> dict[str, str]:
  """`env` for a process that should run on glibc's defaults (a peer framework in a benchmark):
  what `with_host_malloc` added taken out, and marked so that no re-exec adds it back."""
  out = dict(env)
  if out.get(OPT_OUT) == "glibc":
    rest = [t for t in out.get("GLIBC_TUNABLES", "").split(":") if t and t not in MALLOC_TUNABLES]
    out["GLIBC_TUNABLES"] = ":".join(rest)
    if not rest:
      del out["GLIBC_TUNABLES"]
  out[OPT_OUT] = "system"
  return out


def reexec_with_host_malloc() -> None:
  """Replace this process (same pid, argv and stdio) by one started with the malloc tunables,
  unless it already has them or they do not apply. Call first thing, before jax loads."""
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
