"""Page faults and kernel time of dcmodel's GPT train step (make_train_step, no compiler options)
on N simulated devices: step time (median of 5 after 3 warm-up calls) beside the minor page
faults and system CPU time per step (getrusage). Run it under different malloc settings to see
what they change (dcmodel/hostenv.py):

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.faults [--devices 8] [--variant gpt]
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
args = p.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.experiments_gpt_speed.dc_step import build, step_and_batch  # noqa: E402


def main():
  cfg = build(args.variant, [f"mesh.data={args.devices}"] if args.devices > 1 else [])
  mesh, rules, step, state, batch = step_and_batch(cfg, devices=args.devices)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    for _ in range(3):
      state, sums = step(state, batch)
      jax.block_until_ready((state, sums))
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(5):
      t = time.perf_counter()
      state, sums = step(state, batch)
      jax.block_until_ready((state, sums))
      times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
  print(f"{args.variant}, {args.devices} device(s), GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}: "
        f"step {np.median(times) * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}); per step "
        f"{(r1.ru_minflt - r0.ru_minflt) / 5:.0f} minor faults, {(r1.ru_stime - r0.ru_stime) / 5 * 1e3:.0f} ms system, "
        f"{(r1.ru_utime - r0.ru_utime) / 5 * 1e3:.0f} ms user CPU")


if __name__ == "__main__":
  main()
