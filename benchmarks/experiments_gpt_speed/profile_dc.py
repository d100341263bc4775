"""dcmodel's own GPT train step (dc_step) profiled and attributed op by op (attribute.py):
  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.profile_dc [--variant gpt] [--set k=v ...]
writes benchmarks/results/raw/dc_VARIANT.hlo and the trace under benchmarks/results/raw/trace_dc_VARIANT."""

import argparse

from benchmarks.experiments_gpt_speed import attribute  # imports xla_ops: the traceme flag before jax loads
from benchmarks.experiments_gpt_speed.dc_step import build, step_and_batch

import jax  # noqa: E402
from flax import nnx  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="gpt")
  p.add_argument("--set", action="append", default=[])
  args = p.parse_args()
  mesh, rules, step, state, batch = step_and_batch(build(args.variant, args.set))
  name = f"dc_{args.variant}"
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    hlo = step.lower(state, batch).compile().as_text()
    out = attribute.attribute_step(step, state, batch, hlo, name)
  attribute.report(out, scope_min_ms=20, top=20)


if __name__ == "__main__":
  main()
