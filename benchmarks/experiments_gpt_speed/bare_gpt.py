"""A bare JAX reimplementation of dcmodel's benchmark GPT (plain dicts of arrays, optax, one
jax.jit), with a knob for each formulation choice XLA:CPU might care about, timed interleaved
against the dcmodel-equivalent baseline in one process. Each candidate is a dict of knob
values; the first is the baseline. Tokens/s are medians over rounds, with the spread.

Knobs (defaults = dcmodel's formulation):
  proj   heads: Q, K, V, O as (d, h, hd) / (h, hd, d) einsums (dcmodel) | fused: one (d, 3d) matmul for
         Q, K, V and a (d, d) output, all 2-D
  attn   dpa: jax.nn.dot_product_attention(is_causal=True) on (b, t, h, hd) (dcmodel) |
         bhtd: explicit softmax attention with q, k, v transposed to (b, h, t, hd) first, an
         additive causal mask built once | bthd: the same explicit attention on (b, t, h, hd) einsums
  guard  true: dcmodel's non-finite guard (lax.cond around the update) | false
  clip   true: clip_by_global_norm(1.0) as the experiment | false
  dtype  float32 | bfloat16 (matmul inputs; parameters and optimizer state float32)
  mlp    gelu | swiglu;  positions  learned | rope
  ce     optax: softmax_cross_entropy_with_integer_labels + argmax accuracy (dcmodel's lm task) |
         plain: logsumexp minus the picked logit, no accuracy
  dense  xla: 2-D matmuls as `x @ w`, XLA's own backward | nn: layers.matmul (every backward
         matmul NN, for YNNPACK) for the MLP, the 2-D projections and the head
  impl   bare (this file) | dcmodel: dcmodel's own make_train_step on the same shape (the other knobs
         then pick dcmodel config overrides: see DCMODEL_SETS), to tie these numbers to dcmodel's

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.bare_gpt --candidates '[{}, {"proj": "fused"}]'
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import paired_speedup  # noqa: E402
from benchmarks.experiments_gpt_speed import quiet  # noqa: E402
from dcmodel.models import layers  # noqa: E402

DEFAULTS = {"impl": "bare", "dense": "xla", "proj": "heads", "attn": "dpa", "guard": True, "clip": True, "dtype": "float32", "mlp": "gelu",
            "positions": "learned", "ce": "optax", "d": 512, "layers": 4, "heads": 8, "d_ff": 2048, "vocab": 256,
            "seq": 128, "batch": 32, "tie": True}


def init(k: dict, key):
  d, h, f, v, t = k["d"], k["heads"], k["d_ff"], k["vocab"], k["seq"]
  hd = d // h
  keys = iter(jax.random.split(key, 64))
  normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) / np.sqrt(fan_in)
  p = {"embed": 0.02 * jax.random.normal(next(keys), (v, d)), "final_norm": jnp.ones(d), "blocks": []}
  if k["positions"] == "learned":
    p["pos"] = 0.02 * jax.random.normal(next(keys), (t, d))
  if not k["tie"]:
    p["unembed"] = normal((d, v), d)
  for _ in range(k["layers"]):
    b = {"norm1": jnp.ones(d), "norm2": jnp.ones(d), "wi": normal((d, f), d), "wo_mlp": normal((f, d), f)}
    if k["mlp"] == "swiglu":
      b["wg"] = normal((d, f), d)
    if k["proj"] == "heads":
      b.update(wq=normal((d, h, hd), d), wk=normal((d, h, hd), d), wv=normal((d, h, hd), d), wo=normal((h, hd, d), d))
    else:
      b.update(wqkv=normal((d, 3 * d), d), wo=normal((d, d), d))
    p["blocks"].append(b)
  return p


def mm(k: dict, x, w):
  return layers.matmul(x, w) if k["dense"] == "nn" else x @ w


def rms(x, scale):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6) * scale).astype(x.dtype)


def rope(x, positions):
  half = x.shape[-1] // 2
  freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[:, None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle)[:, None, :], jnp.cos(angle)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def attention(k: dict, b: dict, x, positions, dt):
  bsz, t, d = x.shape
  h = k["heads"]
  hd = d // h
  if k["proj"] == "heads":
    q, kk, v = (jnp.einsum("bld,dhk->blhk", x, b[w].astype(dt)) for w in ("wq", "wk", "wv"))
  else:
    q, kk, v = jnp.split(mm(k, x, b["wqkv"].astype(dt)).reshape(bsz, t, 3 * h, hd), 3, axis=2)
  if k["positions"] == "rope":
    q, kk = rope(q, positions), rope(kk, positions)
  if k["attn"] == "dpa":
    out = jax.nn.dot_product_attention(q, kk, v, is_causal=True)
  else:
    causal = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, -1e30).astype(jnp.float32)
    if k["attn"] == "bhtd":
      q, kk, v = (a.transpose(0, 2, 1, 3) for a in (q, kk, v))
      s = jnp.einsum("bhqd,bhkd->bhqk", q, kk).astype(jnp.float32) / np.sqrt(hd) + causal
      out = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1).astype(dt), v).transpose(0, 2, 1, 3)
    else:
      s = jnp.einsum("bqhd,bkhd->bhqk", q, kk).astype(jnp.float32) / np.sqrt(hd) + causal
      out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1).astype(dt), v)
  if k["proj"] == "heads":
    return jnp.einsum("blhk,hkd->bld", out, b["wo"].astype(dt))
  return mm(k, out.reshape(bsz, t, d), b["wo"].astype(dt))


def forward(k: dict, p, tokens):
  dt = jnp.dtype(k["dtype"])
  positions = jnp.arange(tokens.shape[1])
  x = p["embed"][tokens]
  if "pos" in p:
    x = x + p["pos"][positions]
  x = x.astype(dt)
  # named scopes: each op's metadata says which part of the model it belongs to (attribute.py)
  for b in p["blocks"]:
    with jax.named_scope("norm"):
      y = rms(x, b["norm1"])
    with jax.named_scope("attn"):
      x = x + attention(k, b, y, positions, dt)
    with jax.named_scope("norm"):
      y = rms(x, b["norm2"])
    with jax.named_scope("mlp"):
      hid = mm(k, y, b["wi"].astype(dt))
      hid = jax.nn.silu(mm(k, y, b["wg"].astype(dt))) * hid if k["mlp"] == "swiglu" else jax.nn.gelu(hid)
      x = x + mm(k, hid, b["wo_mlp"].astype(dt))
  with jax.named_scope("head"):
    x = rms(x, p["final_norm"])
    w = p["embed"].T if "unembed" not in p else p["unembed"]
    return mm(k, x, w.astype(dt)).astype(jnp.float32)


def loss_fn(k: dict, p, batch):
  logits = forward(k, p, batch["x"])
  with jax.named_scope("loss"):
    return _ce(k, logits, batch)


def _ce(k, logits, batch):
  if k["ce"] == "optax":
    per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    acc = jnp.sum(jnp.argmax(logits, -1) == batch["y"])
  else:
    per = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["y"][..., None], -1)[..., 0]
    acc = 0.0
  return jnp.mean(per), acc


def make_step(k: dict, total_steps: int = 1000):
  sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, total_steps, 3e-4)
  tx = optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.01)
  if k["clip"]:
    tx = optax.chain(optax.clip_by_global_norm(1.0), tx)

  def step(state, batch):
    params, opt = state
    (loss, acc), grads = jax.value_and_grad(lambda p: loss_fn(k, p, batch), has_aux=True)(params)

    @jax.named_scope("optimizer")
    def update(state):
      params, opt = state
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt

    if k["guard"]:
      finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
      state = jax.lax.cond(finite, update, lambda s: s, state)
    else:
      state = update(state)
    return state, (loss, acc)

  return jax.jit(step, donate_argnums=0), tx


def batch_for(k: dict, seed: int = 0):
  r = np.random.default_rng(seed)
  shape = (k["batch"], k["seq"])
  return {"x": jnp.asarray(r.integers(0, k["vocab"], shape), jnp.int32), "y": jnp.asarray(r.integers(0, k["vocab"], shape), jnp.int32)}


def flops_per_step(k: dict) -> float:
  """dcmodel.perf.accounting's closed form (model FLOPs: matmuls only, full T x T attention)."""
  d, f, L, t, b, v = k["d"], k["d_ff"], k["layers"], k["seq"], k["batch"], k["vocab"]
  tokens = b * t
  per_layer = 2 * tokens * 4 * d * d + 2 * tokens * (3 if k["mlp"] == "swiglu" else 2) * d * f + 4 * b * t * t * d
  return 3.0 * (L * per_layer + 2 * tokens * d * v)


def dcmodel_step(k: dict):
  """dcmodel's own jitted train step on this shape (mlp, positions, dtype, tie from the knobs),
  wrapped to run inside its mesh and rules; with its device-resident random batch."""
  from flax import nnx
  from benchmarks.experiments_gpt_speed.dc_step import build, step_and_batch
  sets = [f"model.mlp={k['mlp']}", f"model.positions={k['positions']}", f"model.dtype={k['dtype']}",
          f"model.tie_embeddings={str(k['tie']).lower()}", f"model.d_ff={k['d_ff']}"]
  mesh, rules, step, state, batch = step_and_batch(build("gpt", sets))

  def run(state, batch):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      return step(state, batch)

  return run, state, batch


def run(candidates: list[dict], rounds: int, steps: int, gate_s: float = 0.0) -> list[dict]:
  built = []
  for c in candidates:
    k = {**DEFAULTS, **c}
    if k["impl"] == "dcmodel":
      step, state, batch = dcmodel_step(k)
    else:
      step, tx = make_step(k)
      params = init(k, jax.random.key(0))
      state = (params, tx.init(params))
      batch = batch_for(k)
    for _ in range(2):   # compile and warm up
      state, _ = step(state, batch)
    jax.block_until_ready(state)
    built.append([k, step, state, batch, []])
  for _ in range(rounds):   # interleaved: the shared host's load drifts over every candidate alike
    for item in built:
      k, step, state, batch, times = item
      if gate_s:
        quiet.wait(max_wait_s=gate_s)
      t, cpu = time.perf_counter(), time.process_time()
      for _ in range(steps):
        state, out = step(state, batch)
      jax.block_until_ready((state, out))
      times.append(((time.perf_counter() - t) / steps, (time.process_time() - cpu) / steps))
      item[2] = state
  # On a shared host the load moves between rounds but little within one, so each candidate is
  # compared with the baseline of the same round (paired ratios, median over rounds); the
  # minimum wall time and the process CPU seconds per step are reported beside it.
  rows = []
  for (k, _, _, _, times), c in zip(built, candidates):
    wall, cpu = [w for w, _ in times], [u for _, u in times]
    rows.append({"candidate": c, "step_s_runs": wall, "cpu_s_runs": cpu, "min_step_s": min(wall),
                 "median_step_s": float(np.median(wall)), "cpu_s": float(np.median(cpu)),
                 "tokens_per_s": k["batch"] * k["seq"] / min(wall), "gflops": flops_per_step(k) / min(wall) / 1e9})
  base = rows[0]["step_s_runs"]
  for r in rows:
    paired = paired_speedup(base, r["step_s_runs"])
    r["speedup_paired"], r["speedup_paired_quartiles"] = paired["median"], paired["quartiles"]
    r["cpu_speedup"] = rows[0]["cpu_s"] / r["cpu_s"]
    print(f"{json.dumps(r['candidate']):50s} x{r['speedup_paired']:.3f} paired (quartiles {r['speedup_paired_quartiles'][0]:.3f}-"
          f"{r['speedup_paired_quartiles'][1]:.3f})  min {r['min_step_s'] * 1e3:6.0f} ms = {r['tokens_per_s']:5.0f} tok/s "
          f"{r['gflops']:5.1f} GFLOP/s  cpu {r['cpu_s']:5.2f} s (x{r['cpu_speedup']:.3f})", flush=True)
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--candidates", default="[{}]", help="JSON list of knob dicts; the first is the baseline")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2, help="steps per timed round")
  p.add_argument("--out", help="write the rows as JSON here")
  p.add_argument("--gate", type=float, default=0.0, help="wait up to this many seconds for a quiet host before each timed run")
  args = p.parse_args()
  rows = run(json.loads(args.candidates), args.rounds, args.steps, args.gate)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
