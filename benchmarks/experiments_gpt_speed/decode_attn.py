"""Where a batch-8 decode step's time goes besides the weight matmuls: the attention over the KV
cache. `--profile` attributes `Generator`'s decode scan (lm_decode's 25M model) op by op; the
default times the attention alone over 8 layers' caches (batch 8, 8 heads, 256 positions, head
dim 64, filled to position 144: the mean context of lm_decode's 32 + 224 tokens) in the forms XLA
could run it, interleaved, each checked equal to `KVCache.attend` on one layer, with the number of
slices and copies in its compiled HLO:
  cache     KVCache.attend as it is: two batched dots (one query row per batch and head: matvecs)
  cache1t   the same compiled with xla_cpu_multi_thread_eigen=false (one thread per op): whether
            Eigen spreads those dots over both cores
  mulred    the dots as multiply-and-reduce fusions (no dot)
  split2    the batch in two halves, one pair of dots each (independent thunks for the 2 cores)
  stored2   the same with the cache stored as two batch halves (no slicing of it)
  sliceL    only the first L positions (static slices), the part a bucketed cache would read
  kT        keys cached as (batch, heads, head_dim, positions): the logits an NN dot over positions

  [DCMODEL_HOST_MALLOC=mimalloc] PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.decode_attn [--profile] [--rounds 7]
"""

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

from benchmarks.experiments_gpt_speed import attribute, xla_ops  # noqa: E402  (the traceme flag before jax loads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import paired_speedup, timed_calls  # noqa: E402
from benchmarks.lm_decode import NEW, config, prompts  # noqa: E402
from dcmodel import hostenv  # noqa: E402
from dcmodel.infer.generate import Generator, Sampling  # noqa: E402
from dcmodel.models.transformer import KVCache  # noqa: E402
from dcmodel.train import state as state_lib  # noqa: E402

B, H, S, D, LAYERS, FILLED = 8, 8, 256, 64, 8, 144
NEG = -0.7 * float(np.finfo(np.float32).max)


def profile(batch: int) -> None:
  placed = state_lib.place(config(), jax.devices()[:1])
  gen = Generator(placed, placed.init())
  sampling = Sampling(max_new_tokens=NEW)
  prefill, decode = gen._fns(sampling)     # the jitted scan alone, without the prompt's prefill
  with placed.context():
    tokens = jax.device_put(np.asarray(prompts(batch), np.int32), placed.data_sharding)
    start = jax.device_put(np.zeros((batch,), np.int32), placed.data_sharding)
    first, caches = prefill(gen.state, tokens, start, jax.random.key(0))
    hlo = decode.lower(gen.state, caches, first, jax.random.key(1)).compile().as_text()
    xla_ops.profile(lambda: decode(gen.state, caches, first, jax.random.key(1)), (), calls=2, trace_dir="/tmp/decode_attn_trace")
  # two profiled calls of NEW - 1 steps each; the model-part table says nothing here (one scope), so it is left out
  attribute.report(attribute.attribute("/tmp/decode_attn_trace", hlo, 2 * (NEW - 1)), scope_min_ms=float("inf"), top=12)


def probs(logits):
  """Softmax over the last axis (positions), the unfilled ones masked."""
  return jax.nn.softmax(jnp.where(jnp.arange(logits.shape[-1]) <= FILLED, logits, NEG), -1)


def attend(q, k, v, length=S):
  """Single-query attention over the first `length` positions, (b, 1, h, d) -> (b, 1, h, d)."""
  d = q.shape[-1]
  logits = jnp.einsum("bnhd,bhsd->bhns", q, k[:, :, :length], preferred_element_type=jnp.float32) * d ** -0.5
  return jnp.einsum("bhns,bhsd->bnhd", probs(logits), v[:, :, :length])


def mulred(q, k, v):
  logits = (q[:, 0, :, None, :] * k).sum(-1) * q.shape[-1] ** -0.5           # (b, h, s)
  return (probs(logits)[..., None] * v).sum(-2)[:, None]


def split2(q, k, v):
  h = q.shape[0] // 2
  return jnp.concatenate([attend(q[:h], k[:h], v[:h]), attend(q[h:], k[h:], v[h:])], 0)


def stored2(q, k, v):
  """k, v: the cache's two batch halves, each its own array."""
  h = q.shape[0] // 2
  return jnp.concatenate([cache(q[:h], k[0], v[0]), cache(q[h:], k[1], v[1])], 0)


def keys_t(q, k, v):
  """k as (b, h, d, s)."""
  logits = jnp.einsum("bnhd,bhds->bhns", q, k) * q.shape[-1] ** -0.5
  return jnp.einsum("bhns,bhsd->bnhd", probs(logits), v)


def cache(q, k, v):
  index = jnp.full((q.shape[0],), FILLED, jnp.int32)
  return KVCache(k, v, index, jnp.zeros_like(index)).attend(q)


def chained(form):
  """The form over every layer's cache, each layer's query the previous output (no reuse across layers)."""
  @jax.jit
  def run(q, ks, vs):
    for k, v in zip(ks, vs):
      q = q + 1e-3 * form(q, k, v)
    return q
  return run


def time_forms(rounds: int) -> None:
  keys = iter(jax.random.split(jax.random.key(0), 2 * LAYERS + 1))
  ks = [jax.random.normal(next(keys), (B, H, S, D)) for _ in range(LAYERS)]
  vs = [jax.random.normal(next(keys), (B, H, S, D)) for _ in range(LAYERS)]
  q = jax.random.normal(next(keys), (B, 1, H, D))
  forms = {"cache": cache, "cache1t": cache, "mulred": mulred, "split2": split2, "stored2": stored2, "kT": keys_t}
  forms.update({f"slice{n}": (lambda q, k, v, n=n: attend(q, k, v, n)) for n in (160, 192)})
  args = {name: (q, ks, vs) for name in forms}
  args["kT"] = (q, [k.transpose(0, 1, 3, 2) for k in ks], vs)
  args["stored2"] = (q, [tuple(jnp.split(k, 2)) for k in ks], [tuple(jnp.split(v, 2)) for v in vs])
  options = {"cache1t": {"xla_cpu_multi_thread_eigen": False}}
  fns = {name: chained(f).lower(*args[name]).compile(compiler_options=options.get(name)) for name, f in forms.items()}
  for name, f in forms.items():          # one layer, no residual: the form's own output
    q1, k1, v1 = args[name][0], args[name][1][0], args[name][2][0]
    np.testing.assert_allclose(np.asarray(jax.jit(f)(q1, k1, v1)), np.asarray(jax.jit(cache)(q, ks[0], vs[0])),
                               rtol=1e-5, atol=1e-6, err_msg=name)
  moves = {name: sum(op in ("slice", "dynamic-slice", "copy") or (op == "fusion" and ("slice" in i or "copy" in i))
                     for i, (_, op, *_) in attribute._instructions(fn.as_text()).items()) for name, fn in fns.items()}
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name].append(float(np.median(timed_calls(fn, *args[name], repeats=20, warmup=1))))
  whole = 2 * LAYERS * B * H * S * D * 4    # every layer's K and V, all 256 positions: 67 MB
  for name, ts in times.items():
    speedup = paired_speedup(times["cache"], ts)
    print(f"{name:9s} {np.median(ts) * 1e3:6.2f} ms ({min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f})  "
          f"{whole / np.median(ts) / 1e9:5.1f} GB/s of the whole cache  speedup {speedup['median']:.3f} "
          "({:.3f}-{:.3f})".format(*speedup["quartiles"]) + f"  slices/copies in the HLO {moves[name]}")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--profile", action="store_true", help="attribute Generator's decode op by op instead")
  p.add_argument("--batch", type=int, default=8, help="--profile's decode batch")
  p.add_argument("--rounds", type=int, default=7)
  args = p.parse_args()
  profile(args.batch) if args.profile else time_forms(args.rounds)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # as the `dcmodel` command does
  main()
