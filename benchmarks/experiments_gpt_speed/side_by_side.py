"""The GPT (or Llama) train step (d512, 4 layers, T=128, batch 32, one device, 2 threads) in dcmodel and in
PyTorch eager, profiled in one process and split into the same classes: dense matmuls,
attention (dcmodel: its batched dots; PyTorch: the flash kernel, which also does the softmax),
layout copies, everything else, and time with no op running. dcmodel's step is `make_train_step`
compiled with the loop's XLA:CPU options (`dc_variants` "ynn_dot"); its split is `attribute`'s
(concurrent thunks share the instants they overlap); PyTorch's is torch.profiler's self CPU time
per op. DCMODEL_HOST_MALLOC (mimalloc, hugetlb) applies to both (dcmodel/hostenv.py). Not a speed
comparison: in one process the two contend (PyTorch's OpenMP threads spin on after its ops; timed
interleaved here, dcmodel's step took 3.4 s against 2.2 s in a process of its own), so each side's
absolute times are inflated; lm_peers compares speed, each contender in its own process.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.side_by_side [--variant gpt|llama] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from benchmarks.experiments_gpt_speed import attribute, dc_variants  # attribute first: the traceme flag
from benchmarks.experiments_gpt_speed.torch_step import make_step
from dcmodel import hostenv

import jax  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

GROUPS = ("dense matmuls", "attention", "layout copies", "everything else", "no op running")


def dc_group(cls: str) -> str:
  if "attention (batched)" in cls:
    return "attention"
  if "matmul" in cls:
    return "dense matmuls"
  if cls.startswith("transposing copy") or cls == "copy":
    return "layout copies"
  if cls.startswith("no thunk event"):
    return "no op running"
  return "everything else"


def torch_group(name: str) -> str:
  if name in ("aten::mm", "aten::addmm", "aten::bmm"):
    return "dense matmuls"
  if "scaled_dot_product" in name:
    return "attention"
  if name in ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy"):
    return "layout copies"
  return "everything else"


def torch_profile(step, calls: int) -> dict:
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    t = time.perf_counter()
    for _ in range(calls):
      step()
    wall = (time.perf_counter() - t) / calls
  by = collections.Counter()
  for e in prof.key_averages():
    by[torch_group(e.key)] += e.self_cpu_time_total / 1e3 / calls
  by["no op running"] = max(wall * 1e3 - sum(by.values()), 0.0)
  return {"wall_ms": wall * 1e3, "groups_ms": dict(by)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="gpt", choices=("gpt", "llama"))
  p.add_argument("--calls", type=int, default=2, help="profiled steps per framework")
  p.add_argument("--out")
  args = p.parse_args()
  dc = dc_variants.compiled(args.variant, "ynn_dot")
  holder = [dc["state"]]

  def dc_step():
    holder[0], sums = dc["exe"](holder[0], dc["batch"])
    jax.block_until_ready((holder[0], sums))

  pt_step = make_step(args.variant)
  for f in (dc_step, pt_step, dc_step, pt_step):    # warm-up
    f()
  dc_prof = attribute.attribute_step(dc["exe"], holder[0], dc["batch"], dc["exe"].as_text(), "side_by_side", calls=args.calls)
  dc_groups = collections.Counter()
  for cls, ms in dc_prof["by_class_ms"].items():
    dc_groups[dc_group(cls)] += ms
  pt_prof = torch_profile(pt_step, args.calls)
  out = {"profiled": {"dcmodel": {"wall_ms": dc_prof["wall_ms"], "groups_ms": dict(dc_groups),
                                  "classes_ms": dc_prof["by_class_ms"]},
                      "pytorch": pt_prof}}
  print(f"profiled, ms per step: {'':22s} dcmodel  PyTorch")
  for g in GROUPS:
    print(f"  {g:38s} {dc_groups.get(g, 0.0):7.0f}  {pt_prof['groups_ms'].get(g, 0.0):7.0f}")
  print(f"  {'step under the profiler':38s} {dc_prof['wall_ms']:7.0f}  {pt_prof['wall_ms']:7.0f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # as the `dcmodel` command does
  main()
