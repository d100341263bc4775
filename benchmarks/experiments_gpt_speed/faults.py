"""Page faults and kernel time of dcmodel's GPT train step (make_train_step, no compiler options)
on N simulated devices: step time (median of 5 after 3 warm-up calls) beside the minor page
faults and system CPU time per step (getrusage). Run it under different malloc settings to see
what they change (dcmodel/hostenv.py). `--per-step` also prints each step with the kernel's
transparent-huge-page and compaction counters it moved (/proc/vmstat, machine-wide) and the
memory the guest kernel reported free to its hypervisor (free page reporting, where the kernel
has it: the host then drops those pages and the next touch faults on the host, unseen here).

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.faults [--devices 8] [--variant gpt] [--steps 5] [--per-step]
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.faults
"""

from __future__ import annotations

import argparse
import os
import resource
import time

p = argparse.ArgumentParser()
p.add_argument("--devices", type=int, default=1)
p.add_argument("--variant", default="gpt")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--per-step", action="store_true")
args = p.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.experiments_gpt_speed.dc_step import build, step_and_batch  # noqa: E402

VMSTAT = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "compact_success", "compact_fail",
          "pgmajfault", "thp_split_pmd")
REPORTED = "/sys/module/page_reporting/parameters/reported_kib"


def vmstat() -> dict[str, int]:
  out = {}
  try:
    with open("/proc/vmstat") as f:
      out = {k: int(v) for k, v in (line.split() for line in f) if k in VMSTAT}
    with open(REPORTED) as f:
      out["reported_mib"] = int(f.read()) // 1024
  except OSError:    # not Linux, or no free page reporting
    pass
  return out


def main():
  cfg = build(args.variant, [f"mesh.data={args.devices}"] if args.devices > 1 else [])
  mesh, rules, step, state, batch = step_and_batch(cfg, devices=args.devices)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    for _ in range(3):
      state, sums = step(state, batch)
      jax.block_until_ready((state, sums))
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for i in range(args.steps):
      if args.per_step:     # the counters are read outside the timed call, and only when printed
        a, v = resource.getrusage(resource.RUSAGE_SELF), vmstat()
      t = time.perf_counter()
      state, sums = step(state, batch)
      jax.block_until_ready((state, sums))
      times.append(time.perf_counter() - t)
      if args.per_step:
        b, w = resource.getrusage(resource.RUSAGE_SELF), vmstat()
        moved = " ".join(f"{k} {w[k] - v[k]}" for k in (*VMSTAT, "reported_mib") if k in w and w[k] != v[k])
        print(f"step {i}: {times[-1] * 1e3:.0f} ms, {b.ru_minflt - a.ru_minflt} faults, "
              f"{(b.ru_stime - a.ru_stime) * 1e3:.0f} ms system; {moved or 'no THP/compaction counter moved'}", flush=True)
    r1, n = resource.getrusage(resource.RUSAGE_SELF), args.steps
  print(f"{args.variant}, {args.devices} device(s), GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}: "
        f"step {np.median(times) * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}); per step "
        f"{(r1.ru_minflt - r0.ru_minflt) / n:.0f} minor faults, {(r1.ru_stime - r0.ru_stime) / n * 1e3:.0f} ms system, "
        f"{(r1.ru_utime - r0.ru_utime) / n * 1e3:.0f} ms user CPU")


if __name__ == "__main__":
  main()
