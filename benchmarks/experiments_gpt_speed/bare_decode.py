"""Decode step prototypes for the lm_decode model (d512, 8 layers, vocab 256, 256 slots): greedy
tokens/s of a jitted lax.scan over decode steps with a KV cache, for two cache layouts:

- bthd: (batch, slots, kv_heads, head_dim), as dcmodel's KVCache, attention by
  jax.nn.dot_product_attention with a mask over all slots (dcmodel's Attention);
- bhtd: (batch, kv_heads, slots, head_dim), as PyTorch's SDPA takes it, attention by two einsums
  whose batch dims (b, h) lead both operands, the same mask.

In dcmodel's layout XLA:CPU transposes each layer's whole K cache to (b, h, hd, slots) for the
scores' dot at every step (read in the decode HLO: copy(transpose) of f32[8,8,64,256] per layer),
which is more bytes than the step's weights at batch 8. Interleaved rounds, best and median.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.bare_decode [--batch 8]
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

from benchmarks.experiments_gpt_speed import bare_gpt  # noqa: E402

SHAPE = {"layers": 8, "seq": 256, "positions": "learned"}


def decode_fn(k: dict, layout: str, steps: int):
  h, d = k["heads"], k["d"]
  hd = d // h

  def attend(q, kc, vc, mask):
    if layout == "bthd":
      return jax.nn.dot_product_attention(q, kc, vc, mask=mask)
    s = jnp.einsum("bhqd,bhkd->bhqk", q.transpose(0, 2, 1, 3), kc) / np.sqrt(hd)
    s = jnp.where(mask, s, -1e30)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), vc).transpose(0, 2, 1, 3)

  def one(p, caches, tok, pos):
    b = tok.shape[0]
    x = p["embed"][tok][:, None] + p["pos"][pos][None, None]
    mask = (jnp.arange(k["seq"]) <= pos)[None, None, None, :]
    new = []
    for blk, (kc, vc) in zip(p["blocks"], caches):
      y = bare_gpt.rms(x, blk["norm1"])
      q, kk, v = (jnp.einsum("bld,dhk->blhk", y, blk[w]) for w in ("wq", "wk", "wv"))
      if layout == "bthd":
        kc = jax.lax.dynamic_update_slice(kc, kk, (0, pos, 0, 0))
        vc = jax.lax.dynamic_update_slice(vc, v, (0, pos, 0, 0))
      else:
        kc = jax.lax.dynamic_update_slice(kc, kk.transpose(0, 2, 1, 3), (0, 0, pos, 0))
        vc = jax.lax.dynamic_update_slice(vc, v.transpose(0, 2, 1, 3), (0, 0, pos, 0))
      new.append((kc, vc))
      x = x + jnp.einsum("blhk,hkd->bld", attend(q, kc, vc, mask), blk["wo"])
      y = bare_gpt.rms(x, blk["norm2"])
      x = x + jax.nn.gelu(y @ blk["wi"]) @ blk["wo_mlp"]
    x = bare_gpt.rms(x, p["final_norm"])
    return jnp.argmax((x @ p["embed"].T)[:, 0], -1).astype(jnp.int32), new

  def run(p, caches, tok, pos0):
    def body(carry, i):
      tok, caches = carry
      tok, caches = one(p, caches, tok, pos0 + i)
      return (tok, caches), tok
    (_, caches), toks = jax.lax.scan(body, (tok, caches), jnp.arange(steps))
    return toks, caches

  return jax.jit(run, donate_argnums=1)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=112, help="decode steps per call (from slot 128)")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()
  k = {**bare_gpt.DEFAULTS, **SHAPE}
  params = bare_gpt.init(k, jax.random.key(0))
  hd = k["d"] // k["heads"]
  runs = {}
  for layout in ("bthd", "bhtd"):
    shape = (args.batch, k["seq"], k["heads"], hd) if layout == "bthd" else (args.batch, k["heads"], k["seq"], hd)
    fn = decode_fn(k, layout, args.steps)
    make = lambda shape=shape: [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(k["layers"])]
    tok = jnp.zeros((args.batch,), jnp.int32)
    jax.block_until_ready(fn(params, make(), tok, 128))
    runs[layout] = (fn, make, tok, [])
  for _ in range(args.rounds):
    for layout, (fn, make, tok, times) in runs.items():
      caches = make()
      jax.block_until_ready(caches)
      t = time.perf_counter()
      jax.block_until_ready(fn(params, caches, tok, 128))
      times.append(time.perf_counter() - t)
  out = {}
  for layout, (*_, times) in runs.items():
    out[layout] = {"best_tokens_per_s": args.batch * args.steps / min(times), "median_tokens_per_s": args.batch * args.steps / np.median(times)}
  print(json.dumps({"batch": args.batch, **out}))


if __name__ == "__main__":
  main()
