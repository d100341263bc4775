"""Wait for the shared host to go quiet before a timed run: the CPU share other processes use,
sampled from /proc/stat over half a second while this process is idle. For prototype
comparisons on a machine shared with other agents; the benchmarks themselves interleave instead."""

import time


def _busy_idle():
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:]]
  idle = v[3] + v[4]
  return sum(v) - idle, idle


def others_busy(sample_s: float = 0.5) -> float:
  b0, i0 = _busy_idle()
  time.sleep(sample_s)
  b1, i1 = _busy_idle()
  return (b1 - b0) / max((b1 - b0) + (i1 - i0), 1)


def wait(threshold: float = 0.15, max_wait_s: float = 120.0) -> float:
  """Block until others use < threshold of the cores (or max_wait_s passed); returns the last share."""
  deadline = time.monotonic() + max_wait_s
  while True:
    share = others_busy()
    if share < threshold or time.monotonic() > deadline:
      return share
    time.sleep(1.0)
