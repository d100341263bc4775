"""The benchmark GPT's attention alone (batch 32, T=128, 8 heads of 64, causal), forward and
backward (the gradients of sum(out * cotangent) with respect to q, k, v), in each form XLA:CPU
may be given, timed interleaved in one process beside PyTorch's scaled_dot_product_attention on
the same arrays (2 threads). Outputs and gradients are checked against the first form.

Forms:
  dpa      jax.nn.dot_product_attention(implementation="xla", is_causal=True) on (b, t, h, d): dcmodel's
  einsum   explicit softmax attention by einsums on (b, t, h, d)
  bhtd     the same on (b, h, t, d) (q, k, v given in that layout: the projections would write it)
  blockN   causal attention over N query blocks, each against only the keys up to its end (the
           work above the diagonal skipped, as a flash kernel does), on (b, h, t, d)
  tblockN  the same on (b, t, h, d)
  halves   dcmodel's XLA path (attention.attend(impl="xla"): two query halves on (b, t, h, d))
  cpu      dcmodel's fused CPU kernel (attention.attend(impl="cpu"), models/host_attention.cc)
  torch    torch.nn.functional.scaled_dot_product_attention(is_causal=True), (b, h, t, d), eager

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.attn_forms [--forms halves,cpu,torch] [--rounds 7]
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
import torch  # noqa: E402

from dcmodel.models.attention import attend  # noqa: E402

B, T, H, D = 32, 128, 8, 64
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def explicit(q, k, v, heads_first: bool):
  eq = ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd") if heads_first else ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
  s = jnp.einsum(eq[0], q, k) * (D ** -0.5)
  s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, NEG)
  return jnp.einsum(eq[1], jax.nn.softmax(s, -1), v)


def blocked(q, k, v, n: int, heads_first: bool = True):
  """Query block i attends keys [0, (i + 1) * t / n), the last key block masked causally; on
  (b, h, t, d) if heads_first else (b, t, h, d)."""
  c = T // n
  tri = jnp.tril(jnp.ones((c, c), bool))
  ax = 2 if heads_first else 1
  eq = ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd") if heads_first else ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
  take = lambda a, lo, hi: jax.lax.slice_in_dim(a, lo, hi, axis=ax)
  outs = []
  for i in range(n):
    qi, ki, vi = take(q, i * c, (i + 1) * c), take(k, 0, (i + 1) * c), take(v, 0, (i + 1) * c)
    s = jnp.einsum(eq[0], qi, ki) * (D ** -0.5)
    mask = jnp.concatenate([jnp.ones((c, i * c), bool), tri], axis=1)
    s = jnp.where(mask, s, NEG)
    outs.append(jnp.einsum(eq[1], jax.nn.softmax(s, -1), vi))
  return jnp.concatenate(outs, axis=ax)


def form(name: str):
  """(fn on (b, h, t, d) arrays or (b, t, h, d) ones, whether it takes heads first)."""
  if name == "dpa":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"), False
  if name == "einsum":
    return lambda q, k, v: explicit(q, k, v, False), False
  if name == "bhtd":
    return lambda q, k, v: explicit(q, k, v, True), True
  if name.startswith("block"):
    n = int(name[5:])
    return lambda q, k, v: blocked(q, k, v, n), True
  if name in ("halves", "cpu"):
    return lambda q, k, v: attend(q, k, v, causal=True, impl="xla" if name == "halves" else "cpu"), False
  if name.startswith("tblock"):
    n = int(name[6:])
    return lambda q, k, v: blocked(q, k, v, n, heads_first=False), False
  raise SystemExit(f"unknown form {name}")


def jax_runner(name: str, q, k, v, ct):
  fn, heads_first = form(name)
  tr = (lambda a: a.transpose(0, 2, 1, 3)) if not heads_first else (lambda a: a)

  @jax.jit
  def fwd_bwd(q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)

  args = [jnp.asarray(tr(a)) for a in (q, k, v, ct)]
  fwd_bwd(*args)[0].block_until_ready()

  def run():
    return jax.block_until_ready(fwd_bwd(*args))
  return run, lambda res: [np.asarray(tr(np.asarray(r))) for r in res]


def torch_runner(q, k, v, ct):
  torch.set_num_threads(2)
  tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
  tct = torch.tensor(ct)

  def run():
    for t in (tq, tk, tv):
      t.grad = None
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    out.backward(tct)
    return out.detach(), tq.grad, tk.grad, tv.grad
  return run, lambda res: [t.numpy() for t in res]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--forms", default="dpa,einsum,bhtd,block2,block4,torch")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--reps", type=int, default=5, help="calls per timed round")
  args = p.parse_args()
  r = np.random.default_rng(0)
  q, k, v, ct = (r.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))   # (b, h, t, d)
  runners = {n: torch_runner(q, k, v, ct) if n == "torch" else jax_runner(n, q, k, v, ct) for n in args.forms.split(",")}
  ref = None
  errs = {}
  for n, (run, to_np) in runners.items():
    res = to_np(run())
    ref = ref or res
    errs[n] = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, res))
  times = {n: [] for n in runners}
  for _ in range(args.rounds):
    for n, (run, _) in runners.items():
      t = time.perf_counter()
      for _ in range(args.reps):
        run()
      times[n].append((time.perf_counter() - t) / args.reps)
  base = next(iter(runners))
  out = {}
  for n, ts in times.items():
    ratios = [a / b for a, b in zip(times[base], ts)]
    out[n] = {"median_ms": 1e3 * float(np.median(ts)), "speedup_paired": float(np.median(ratios)), "max_abs_err": errs[n]}
    print(f"{n:8s} fwd+bwd {out[n]['median_ms']:6.1f} ms  x{out[n]['speedup_paired']:.2f} vs {base}  max|err| {errs[n]:.1e}", flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
