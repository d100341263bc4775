"""dcmodel's own GPT train step (dc_step) profiled and attributed op by op (attribute.py):
  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.profile_dc [--variant gpt] [--set k=v ...]
writes benchmarks/results/raw/dc_VARIANT.hlo and the trace under benchmarks/results/raw/trace_dc_VARIANT."""

import argparse
import os

from benchmarks.experiments_gpt_speed import xla_ops  # sets the traceme flag before jax loads
from benchmarks.experiments_gpt_speed import attribute
from benchmarks.experiments_gpt_speed.dc_step import build, step_and_batch

import jax  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="gpt")
  p.add_argument("--set", action="append", default=[])
  args = p.parse_args()
  mesh, rules, step, state, batch = step_and_batch(build(args.variant, args.set))
  raw = "benchmarks/results/raw"
  os.makedirs(raw, exist_ok=True)
  name = f"dc_{args.variant}"
  from flax import nnx
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    hlo = step.lower(state, batch).compile().as_text()
    open(f"{raw}/{name}.hlo", "w").write(hlo)
    holder = [state]

    def run(b):
      holder[0], out = step(holder[0], b)
      return out

    xla_ops.profile(run, (batch,), calls=2, trace_dir=f"{raw}/trace_{name}")
  out = attribute.attribute(f"{raw}/trace_{name}", hlo, 2)
  print(f"step wall {out['wall_ms']:.0f} ms per call")
  for c, v in out["by_class_ms"].items():
    print(f"  {c:45s} {v:8.1f} ms  {v / out['wall_ms']:6.1%}")
  print("by model part:")
  for k, v in out["by_scope_ms"].items():
    if v >= 20:
      print(f"  {k:60s} {v:8.1f} ms")
  for c, v in list(out["top_ops_ms"].items())[:20]:
    print(f"  {c[:110]:110s} {v:7.1f} ms")


if __name__ == "__main__":
  main()
