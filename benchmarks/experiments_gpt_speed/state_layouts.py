"""dcmodel's GPT train step with chosen train-state arrays in another physical layout at the jit
boundary (`jax.experimental.layout.Format`): the layout PyTorch's nn.Linear keeps, (out, in)
row-major, without changing the model's logical shapes, checkpoints or sharding rules. Each
candidate's parameters and both Adam moments get that layout in and out (the carried state
keeps it); compiled with the loop's XLA:CPU options, timed interleaved in one process, paired
per round against the first candidate; the state after three steps is compared with it.
`--auto` first asks XLA for its own choice (`Layout.AUTO`) and prints every state array it
does not keep row-major.

Candidates (comma-separated; `+` joins): base (every array row-major), mlpwo (MLP output
projection (f, d) stored d-major), mlpwi (MLP input projection), attnwo (attention output
projection (h, k, d) stored d-major), qkv (the (d, h, k) projections stored d-minor), all
(mlpwo+attnwo+qkv).

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.state_layouts --runs base,mlpwo,attnwo,qkv,all [--rounds 5] [--auto]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental.layout import Format, Layout  # noqa: E402

from benchmarks.common import paired_speedup  # noqa: E402
from benchmarks.experiments_gpt_speed import dc_step  # noqa: E402

RULES = {"mlpwo": [("['mlp']['wo']", (1, 0))], "mlpwi": [("['mlp']['wi']", (1, 0))],
         "attnwo": [("['attn']['wo']", (2, 0, 1))],
         "qkv": [(f"['attn']['{w}']", (1, 2, 0)) for w in ("wq", "wk", "wv")]}
RULES["all"] = RULES["mlpwo"] + RULES["attnwo"] + RULES["qkv"]


def formats(state, spec: str):
  """Each state array's Format: the candidate's major-to-minor order where a rule names it, else row-major."""
  rules = [r for name in spec.split("+") if name != "base" for r in RULES[name]]

  def one(path, a):
    key = jax.tree_util.keystr(path)
    order = next((m2m for frag, m2m in rules if frag in key), tuple(range(a.ndim)))
    return Format(Layout(major_to_minor=order), a.sharding)
  return jax.tree_util.tree_map_with_path(one, state)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="gpt")
  p.add_argument("--runs", default="base,mlpwo,attnwo,qkv,all")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--auto", action="store_true", help="print the state layouts XLA:CPU picks itself")
  args = p.parse_args()
  cfg = dc_step.build(args.variant)
  options = cfg.model.cpu_compiler_options(1)
  mesh, rules, step, state0, batch = dc_step.step_and_batch(cfg)
  specs = args.runs.split(",")
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    fn = step.__wrapped__
    data = jax.tree.map(lambda a: a.sharding, batch)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if args.auto:
      auto = jax.tree.map(lambda a: Format(Layout.AUTO, a.sharding), state0)
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state0)
      c = jax.jit(fn, in_shardings=(auto, data), out_shardings=(auto, rep), donate_argnums=0).lower(abstract, batch).compile(
          compiler_options=options)
      chosen = jax.tree.leaves(c.input_formats[0][0], is_leaf=lambda x: isinstance(x, Format))
      names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(state0)[0]]
      moved = [(n, f.layout.major_to_minor) for n, f in zip(names, chosen) if f.layout.major_to_minor != tuple(range(len(f.layout.major_to_minor)))]
      print(f"Layout.AUTO: XLA:CPU keeps {len(chosen) - len(moved)} of {len(chosen)} state arrays row-major; others: {moved}")
    host = jax.tree.map(np.asarray, state0)
    runs = {}
    for spec in specs:
      fm = formats(state0, spec)
      st = jax.device_put(host, fm)
      c = jax.jit(fn, in_shardings=(fm, data), out_shardings=(fm, rep), donate_argnums=0).lower(st, batch).compile(
          compiler_options=options)
      runs[spec] = {"call": c, "state": st, "times": []}
      print(f"{spec:12s} copy ops in the optimized HLO: {c.as_text().count(' copy(')}", flush=True)
    for spec in specs:                              # warm-up: three steps from the same start
      r = runs[spec]
      for _ in range(3):
        r["state"], sums = r["call"](r["state"], batch)
      jax.block_until_ready(r["state"])
    ref = [np.asarray(a) for a in jax.tree.leaves(runs[specs[0]]["state"])]
    for spec in specs[1:]:
      diff = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(ref, jax.tree.leaves(runs[spec]["state"])))
      print(f"{spec:12s} max |state - {specs[0]}'s| after 3 steps: {diff:.2e}")
    for _ in range(args.rounds):
      for spec in specs:
        r = runs[spec]
        t = time.perf_counter()
        for _ in range(2):
          r["state"], sums = r["call"](r["state"], batch)
        jax.block_until_ready((r["state"], sums))
        r["times"].append((time.perf_counter() - t) / 2)
    for spec in specs:
      t, paired = runs[spec]["times"], paired_speedup(runs[specs[0]]["times"], runs[spec]["times"])
      print(f"{spec:12s} {np.median(t) * 1e3:7.1f} ms per step, speedup vs {specs[0]} {paired['median']:.3f} "
            f"(quartiles {paired['quartiles'][0]:.3f}-{paired['quartiles'][1]:.3f}, {len(t)} rounds)")


if __name__ == "__main__":
  main()
