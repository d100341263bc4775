"""dcmodel's GPT train step measured against variants of itself in one process (compiled
first, then timed interleaved, paired per round; loss and updated parameters checked equal):
- plain: the dense layers and unembedding as plain `x @ w` (XLA's own backward), i.e. without
  layers.matmul: its dW dots contract the token dim of the lhs, which XLA:CPU runs on Eigen;
- proj: also the attention projections through layers.matmul, as 2-D matmuls over flat heads;
- noseg: the model called without segment ids and positions (no packing mask).
speedup_X = dcmodel's step time / X's (so plain < 1 is what layers.matmul buys).

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.dc_patched [--variant gpt|llama] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import paired_speedup  # noqa: E402
from benchmarks.experiments_gpt_speed.dc_step import build, step_and_batch  # noqa: E402
from dcmodel.mesh import constrain  # noqa: E402
from dcmodel.models import transformer as tf  # noqa: E402
from dcmodel.models.attention import attend  # noqa: E402
from dcmodel.models.layers import matmul  # noqa: E402


def attention_call(self, x, causal, positions, dtype, cache=None, segment_ids=None):
  """transformer.Attention.__call__ (training path) with the projections as 2-D matmuls."""
  assert cache is None
  cfg = self.cfg
  b, l, d = x.shape
  proj = lambda w, heads: matmul(x, w[...].astype(dtype).reshape(d, heads * cfg.head_dim)).reshape(b, l, heads, cfg.head_dim)
  q, k, v = proj(self.wq, cfg.num_heads), proj(self.wk, cfg.kv_heads), proj(self.wv, cfg.kv_heads)
  if cfg.positions == "rope":
    q, k = tf.rope(q, positions), tf.rope(k, positions)
  q = constrain(q, ("batch", "act_length", "act_heads", None))
  out = attend(q, k, v, causal=causal, segment_ids=segment_ids, impl=cfg.attention)
  out = constrain(out, ("batch", "act_length", "act_heads", None))
  y = matmul(out.reshape(b, l, d), self.wo[...].astype(dtype).reshape(d, d))
  return y + self.bo[...].astype(dtype) if self.bo is not None else y


def plain_matmul(x, w):
  """The transformer's dense layers before layers.matmul: XLA's own backward of x @ w."""
  return x @ w


PATCHES = {"plain": {(tf, "matmul"): plain_matmul},
           "proj": {(tf.Attention, "__call__"): attention_call}}


def compiled(variant: str, patch: dict, sets=(), inputs=None):
  originals = {key: getattr(*key) for patch in PATCHES.values() for key in patch}
  for (cls, name), fn in patch.items():
    setattr(cls, name, fn)
  try:
    mesh, rules, step, state, batch = step_and_batch(build(variant, sets), inputs)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      first_state, first = step(jax.tree.map(jnp.copy, state), batch)   # trace + compile now, patched or not
      jax.block_until_ready(first_state)
  finally:
    for (cls, name), fn in originals.items():
      setattr(cls, name, fn)
  return mesh, rules, step, state, batch, (first_state, first)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="gpt")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--set", action="append", default=[])
  p.add_argument("--runs", default="plain,proj,noseg", help="which variants to time beside dcmodel")
  args = p.parse_args()
  wanted = args.runs.split(",")
  runs = {"dcmodel": compiled(args.variant, {}, args.set),
          **{name: compiled(args.variant, PATCHES[name], args.set) for name in PATCHES if name in wanted},
          # the model called without segment ids and positions (one document per row, as the batch is)
          **({"noseg": compiled(args.variant, {}, args.set, ("x",))} if "noseg" in wanted else {})}
  s0, m0 = runs["dcmodel"][5]
  gaps = {}
  for name in [n for n in runs if n != "dcmodel"]:
    s1, m1 = runs[name][5]
    gaps[name] = {"loss_rel": abs(float(m0["loss_sum"]) - float(m1["loss_sum"])) / abs(float(m0["loss_sum"])),
                  "max_param": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1))
                                   if a.dtype == jnp.float32)}
  times = {name: [] for name in runs}
  states = {name: r[3] for name, r in runs.items()}
  for _ in range(args.rounds):
    for name, (mesh, rules, step, _, batch, _) in runs.items():
      with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        t = time.perf_counter()
        states[name], sums = step(states[name], batch)
        jax.block_until_ready((states[name], sums))
        times[name].append(time.perf_counter() - t)
  out = {"variant": args.variant, "same_values": gaps, "min_step_s": {n: min(t) for n, t in times.items()},
         "tokens_per_s_best": {n: 4096 / min(t) for n, t in times.items()}}
  for name in [n for n in runs if n != "dcmodel"]:
    paired = paired_speedup(times["dcmodel"], times[name])
    out[f"speedup_{name}"] = {"paired_median": paired["median"], "quartiles": paired["quartiles"]}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
