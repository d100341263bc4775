"""The process environment dcmodel sets before jax loads: how many simulated CPU devices, and
(opt-in) which allocator backs the large blocks XLA:CPU asks for.

XLA:CPU takes each call's temporaries (~1.2 GB for the benchmark GPT's train step) from malloc.
glibc serves a block that size from fresh mmap'd pages and unmaps it on free, so every step
faults all of it in again, 4 KiB at a time: ~300k page faults and ~0.6 s of kernel time in a
2.4 s step on one device. DCMODEL_HOST_MALLOC picks what serves those blocks:

  system    glibc's defaults (the default).
  mimalloc  mimalloc (the cmeel-mimalloc wheel, a dependency on Linux) preloaded, with freed
            memory kept by the process (MIMALLOC_PURGE_DELAY=-1) in huge OS pages where the
            kernel gives them: a step reuses the last step's pages, 0 faults after the first.
            The cost is that the process keeps its peak memory, as a GPU runtime's pool does.
  hugetlb   glibc.malloc.hugetlb=1 (glibc >= 2.35): glibc still maps and unmaps each block, in
            2 MiB transparent huge pages, ~1k faults a step; some steps in the step-time sweep
            ran erratically with it (spreads up to 0.88).

Measured in benchmarks/experiments_gpt_speed/README.md. An allocator is chosen when a process
starts (the dynamic loader reads LD_PRELOAD, glibc its tunables), so the CLI and the benchmarks
re-execute themselves once with it: same pid, argv and stdio. The environment passes to child
processes, which therefore run with the same allocator whatever their own switch says. Elsewhere
than Linux (and for hugetlb, glibc before 2.35) the switch changes nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1",)
SWITCH = "DCMODEL_HOST_MALLOC"
MODES = ("system", "mimalloc", "hugetlb")
# Keep freed memory (never purge it back to the OS) and back it by huge pages where allowed.
MIMALLOC_OPTIONS = {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}


def _glibc() -> bool:
  """glibc with the hugetlb malloc tunable (2.35 and later)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    return sys.platform == "linux" and name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
  except (ValueError, OSError, AttributeError):
    return False


def mimalloc_library() -> str | None:
  """The absolute path of the mimalloc shared library the cmeel-mimalloc wheel installed, or None
  if it is not installed or sits at a path LD_PRELOAD cannot carry (':' or whitespace in it)."""
  try:
    files = importlib.metadata.files("cmeel-mimalloc") or []
  except importlib.metadata.PackageNotFoundError:
    return None
  path = next((os.path.abspath(f.locate()) for f in files if f.name == "libmimalloc.so"), None)
  if path is None or not os.path.isfile(path) or any(c in path for c in ": \t\n"):
    return None
  return path


def active(env: Mapping[str, str] = os.environ) -> str:
  """The allocator this environment runs with (what a benchmark records beside its figures)."""
  if "libmimalloc" in env.get("LD_PRELOAD", ""):
    return "mimalloc"
  tunables = env.get("GLIBC_TUNABLES", "").split(":")
  return "hugetlb" if all(t in tunables for t in MALLOC_TUNABLES) else "system"


def with_host_malloc(env: Mapping[str, str]) -> dict[str, str]:
  """`env` with what its DCMODEL_HOST_MALLOC asks for and this host can give, added beside a
  user's own GLIBC_TUNABLES, LD_PRELOAD and MIMALLOC_* settings. Unchanged when already there
  (a re-executed process) or not applicable. ValueError for an unknown mode, or for mimalloc on
  Linux without its library."""
  out = dict(env)
  mode = out.get(SWITCH) or "system"
  if mode not in MODES:
    raise ValueError(f"{SWITCH}={mode!r} is not one of {', '.join(MODES)}")
  if mode == "hugetlb" and _glibc() and "glibc.malloc.hugetlb" not in out.get("GLIBC_TUNABLES", ""):
    out["GLIBC_TUNABLES"] = ":".join(filter(None, [out.get("GLIBC_TUNABLES", ""), *MALLOC_TUNABLES]))
  if mode != "mimalloc" or sys.platform != "linux":
    return out
  library = mimalloc_library()
  if library is None:
    raise ValueError(f"{SWITCH}=mimalloc needs the cmeel-mimalloc package (pip install cmeel-mimalloc), "
                     "installed at a path without ':' or spaces")
  if library not in out.get("LD_PRELOAD", "").split(":"):
    out["LD_PRELOAD"] = ":".join(filter(None, [library, out.get("LD_PRELOAD", "")]))
    out.update({k: v for k, v in MIMALLOC_OPTIONS.items() if k not in out})
  return out


def reexec_with_host_malloc() -> None:
  """Replace this process (same pid, argv and stdio) by one started with the allocator
  DCMODEL_HOST_MALLOC asks for, if it lacks it. Call first thing, before jax loads. An unknown
  mode is a one-line error and exit 2."""
  try:
    env = with_host_malloc(os.environ)
  except ValueError as e:
    print(f"dcmodel: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  if env == os.environ:    # already started with it (the re-executed process), or nothing applies
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def set_host_devices(n: int) -> None:
  """Split the CPU into n simulated devices, unless XLA_FLAGS already says; before jax loads."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags and n > 1:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
