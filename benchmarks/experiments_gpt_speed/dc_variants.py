"""dcmodel's GPT train step against variants of itself, interleaved in one process: model patches
(attention layout, fused QKV), config overrides (dtype, remat) and XLA:CPU compiler options,
each compiled ahead of time (`lower(...).compile(compiler_options)`), so flags are compared
in one process like everything else. Loss and updated parameters are checked against the
baseline; speedup_X = baseline step time / X's, paired per round (median and quartiles).

Candidates (comma-separated names; `+` joins several, e.g. `qkv+bhtd`):
  bhtd     attention in (batch, heads, time, head_dim): the projections write that layout directly
           (einsum "bld,dhk->bhlk"), explicit softmax attention, output projection from it
  einsum   explicit softmax attention by einsums on dcmodel's (batch, time, heads, head_dim)
  tblockN  the same on (batch, time, heads, head_dim)
  blockN   bhtd, causal over N query blocks each against only the keys up to its end (flash's skip)
  qkv      Q, K, V as one (d, 3d) matmul through layers.matmul, the output projection 2-D too
  wg       layers.matmul as it is now (its weight gradient's small (n, k) product behind an
           optimization barrier before its transpose: else XLA folds (dY^T X)^T into one TT dot,
           which runs on Eigen); against a --base from before that change
  wgx      wg, and the transposed operand of the weight gradient first materialized as it is (the
           norm's output), so the transposing copy does not recompute the norm at a strided pace
  wot      the MLP output projection stored transposed, (d, f), read through its transpose
  wgo      wg, and the wider-input case's transposed (k, n) result materialized by one transposing
           copy, so the optimizer's elementwise fusions read the gradient contiguously
  gelu     tanh GELU with a custom VJP saving only its input (one fusion forward, one backward)
  wt       layers.matmul's input gradient dY W^T as an NN dot on an explicit W^T (XLA:CPU's NT form
           ran the (4096,512)x(512,2048) one at half the NN speed)
  bf16     model.dtype=bfloat16 (parameters and optimizer state stay float32)
  xlamm    model.matmul=xla: the dense layers on XLA's dots, not host BLAS (models/host_gemm.py)
  xlaattn  model.attention=xla: XLA's attention, not the fused CPU kernel (models/host_attention.py)
  remat    model.remat=dots
  fast     xla_cpu_enable_fast_math (honoring nothing: no NaN/inf/division/function guarantees)
  ynn_dot  YNNPACK fusions of dots only (xla_cpu_experimental_ynn_fusion_type=dot)
  ynn_idot ... of single dots only (individual_dot)
  xnn      xla_cpu_use_xnnpack
  ynn_elt  YNNPACK fusions of elementwise ops too (xla_cpu_experimental_ynn_fusion_type=dot,eltwise)
  ynn_red  ... and of reductions (dot,eltwise,reduce)
  conc     xla_cpu_enable_concurrency_optimized_scheduler
  cira     copy insertion's region analysis (ModelConfig.CPU_COMPILER_OPTIONS' default; not the transformers')
  noeigen  xla_cpu_multi_thread_eigen=false
  onednn   xla_cpu_use_onednn
  vec512   xla_cpu_prefer_vector_width=512
  o1       xla_backend_optimization_level=1

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.dc_variants --runs bhtd,qkv,fast [--variant gpt] [--rounds 5] [--devices=8] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

_n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "1")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_n}")

from benchmarks.experiments_gpt_speed import attribute  # noqa: E402  (sets the traceme flag before jax loads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import paired_speedup  # noqa: E402
from benchmarks.experiments_gpt_speed.dc_step import build, step_and_batch  # noqa: E402
from dcmodel.mesh import constrain  # noqa: E402
from dcmodel.models import transformer as tf  # noqa: E402
from dcmodel.models.attention import attend  # noqa: E402
from dcmodel.models.layers import matmul, weight_grad  # noqa: E402
from dcmodel.models.registry import ModelConfig  # noqa: E402


def _blocked(q, k, v, segment_ids, n: int, heads_first: bool = True):
  """Causal attention on (b, h, t, d) (else (b, t, h, d)) over n query blocks, each against the
  keys up to its end."""
  ax = 2 if heads_first else 1
  t, hd = q.shape[ax], q.shape[-1]
  c = t // n
  eq = ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd") if heads_first else ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
  take = lambda a, lo, hi: jax.lax.slice_in_dim(a, lo, hi, axis=ax)
  outs = []
  for i in range(n):
    qi, ki, vi = take(q, i * c, (i + 1) * c), take(k, 0, (i + 1) * c), take(v, 0, (i + 1) * c)
    s = jnp.einsum(eq[0], qi, ki, preferred_element_type=jnp.float32) * (hd ** -0.5)
    mask = (jnp.arange((i + 1) * c)[None, :] <= jnp.arange(i * c, (i + 1) * c)[:, None])[None, None]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, None, i * c:(i + 1) * c, None] == segment_ids[:, None, None, :(i + 1) * c])
    s = jnp.where(mask, s, -0.7 * jnp.finfo(jnp.float32).max)
    outs.append(jnp.einsum(eq[1], jax.nn.softmax(s, -1).astype(v.dtype), vi))
  return jnp.concatenate(outs, axis=ax)


def _explicit(q, k, v, segment_ids, heads_first: bool):
  """Causal softmax attention, segment-masked, by einsums; q, k, v in (b, h, t, d) if
  heads_first else (b, t, h, d); the output in the same layout."""
  t, hd = q.shape[2 if heads_first else 1], q.shape[-1]
  eq = ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd") if heads_first else ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
  s = jnp.einsum(eq[0], q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  s = jnp.where(mask, s, -0.7 * jnp.finfo(jnp.float32).max)
  return jnp.einsum(eq[1], jax.nn.softmax(s, -1).astype(v.dtype), v)


@jax.custom_vjp
def wt_matmul(x, w):
  """layers.matmul with the input gradient dX = dY W^T also as an NN dot: W^T materialized
  (a weight-sized transpose) behind an optimization barrier."""
  return x @ w


def _wt_fwd(x, w):
  return x @ w, (x, w)


def _wt_bwd(res, dy):
  x, w = res
  return (dy @ jax.lax.optimization_barrier(w.T)).astype(x.dtype), weight_grad(x, dy, w.dtype)


wt_matmul.defvjp(_wt_fwd, _wt_bwd)


def _t(a):
  """a.T of a materialized a, itself materialized: a plain transposing copy."""
  return jax.lax.optimization_barrier(jax.lax.optimization_barrier(a).T)


def weight_grad_plain_t(x, dy, dtype):
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if x2.shape[1] <= dy2.shape[1]:
    dw = _t(x2) @ dy2
  else:
    dw = jax.lax.optimization_barrier(_t(dy2) @ x2).T
  return dw.astype(dtype)


def with_weight_grad(wgrad):
  """layers.matmul with its weight gradient computed by `wgrad(x, dy, dtype)` instead."""
  @jax.custom_vjp
  def mm(x, w):
    return x @ w

  def bwd(res, dy):
    x, w = res
    return (dy @ w.T).astype(x.dtype), wgrad(x, dy, w.dtype)

  mm.defvjp(_wt_fwd, bwd)
  return mm


def weight_grad_t_out(x, dy, dtype):
  """layers.weight_grad with the wider-input case's transposed result materialized: one
  transposing copy instead of the optimizer's elementwise fusions each reading it transposed."""
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if x2.shape[1] <= dy2.shape[1]:
    return weight_grad(x, dy, dtype)
  return _t(jax.lax.optimization_barrier(dy2.T) @ x2).astype(dtype)


class _Transposed:
  """`w[...]` of a weight stored transposed: the (in, out) the layer multiplies by."""

  def __init__(self, param):
    self.param = param

  def __getitem__(self, key):
    return self.param[key].T


def mlp_out_transposed():
  """transformer.MLP's (__init__, __call__) with the output projection stored (d, f), as
  torch.nn.Linear stores it (`wot`), and read through its transpose: layers.matmul's gradient
  (dY^T X)^T is transposed back, so XLA can write dY^T X in the stored layout and the
  optimizer reads it contiguously."""
  init, call = tf.MLP.__init__, tf.MLP.__call__

  def new_init(self, cfg, *, rngs):
    init(self, cfg, rngs=rngs)
    meta = {k: (tuple(reversed(v)) if k in ("out_sharding", "sharding_names", "sharding") and v else v)
            for k, v in self.wo.get_metadata().items()}
    self.wo = nnx.Param(self.wo[...].T, **meta)

  def new_call(self, x, dtype):
    view = types.SimpleNamespace(wi=self.wi, wg=self.wg, bi=self.bi, bo=self.bo, wo=_Transposed(self.wo))
    return call(view, x, dtype)
  return new_init, new_call


MATMULS = {"wt": wt_matmul, "wg": matmul, "wgx": with_weight_grad(weight_grad_plain_t),
           "wgo": with_weight_grad(weight_grad_t_out)}   # wg: landed as layers.weight_grad
_GELU_C = float(np.sqrt(2 / np.pi))


@jax.custom_vjp
def gelu_tanh(x):
  return 0.5 * x * (1 + jnp.tanh(_GELU_C * (x + 0.044715 * x ** 3)))


def _gelu_fwd(x):
  return gelu_tanh(x), x


def _gelu_bwd(x, g):
  t = jnp.tanh(_GELU_C * (x + 0.044715 * x ** 3))
  return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x, approximate: bool = True):
  assert approximate
  return gelu_tanh(x)



def make_attention(qkv: bool, layout: str):
  """transformer.Attention.__call__ (training path) with the chosen projection and attention
  forms. layout: dpa (dcmodel's: jax.nn.dot_product_attention), einsum (explicit, same layout), bhtd."""
  def call(self, x, causal, positions, dtype, cache=None, segment_ids=None):
    assert cache is None and causal
    cfg = self.cfg
    b, l, d = x.shape
    h, kv, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    ws = [self.wq[...], self.wk[...], self.wv[...]]
    if qkv:
      w = jnp.concatenate(ws, axis=1).astype(dtype).reshape(d, (h + 2 * kv) * hd)
      q, k, v = jnp.split(matmul(x, w).reshape(b, l, h + 2 * kv, hd), [h, h + kv], axis=2)
      if layout not in BTHD:
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    else:
      eq = "bld,dhk->blhk" if layout in BTHD else "bld,dhk->bhlk"
      q, k, v = (jnp.einsum(eq, x, w.astype(dtype)) for w in ws)
    if self.bq is not None:
      shape = (1, 1, -1, hd) if layout in BTHD else (1, -1, 1, hd)
      q, k, v = (t + bb[...].astype(dtype).reshape(shape) for t, bb in ((q, self.bq), (k, self.bk), (v, self.bv)))
    if cfg.positions == "rope":
      if layout not in BTHD:
        q, k = (tf.rope(a.swapaxes(1, 2), positions, cfg.rope_theta).swapaxes(1, 2) for a in (q, k))
      else:
        q, k = tf.rope(q, positions, cfg.rope_theta), tf.rope(k, positions, cfg.rope_theta)
    if layout == "dpa":
      q = constrain(q, ("batch", "act_length", "act_heads", None))
      out = attend(q, k, v, causal=True, segment_ids=segment_ids, impl=cfg.attention)
    elif layout.startswith("block"):
      out = _blocked(q, k, v, segment_ids, int(layout[5:]))
    elif layout.startswith("tblock"):
      out = _blocked(q, k, v, segment_ids, int(layout[6:]), heads_first=False)
    else:
      out = _explicit(q, k, v, segment_ids, layout == "bhtd")
    wo = self.wo[...].astype(dtype)
    if layout not in BTHD:
      y = jnp.einsum("bhlk,hkd->bld", out, wo) if not qkv else matmul(out.transpose(0, 2, 1, 3).reshape(b, l, d), wo.reshape(d, d))
    else:
      y = jnp.einsum("blhk,hkd->bld", out, wo) if not qkv else matmul(out.reshape(b, l, d), wo.reshape(d, d))
    return y + self.bo[...].astype(dtype) if self.bo is not None else y
  return call


OPTIONS = {
  "fast": {"xla_cpu_enable_fast_math": True, "xla_cpu_fast_math_honor_nans": False, "xla_cpu_fast_math_honor_infs": False,
           "xla_cpu_fast_math_honor_division": False, "xla_cpu_fast_math_honor_functions": False},
  # the option takes whole lists only when set per compilation ("+X" is refused); dot is the default
  "ynn_dot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
  "ynn_idot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
  "xnn": {"xla_cpu_use_xnnpack": True},
  "ynn_elt": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"},
  "ynn_red": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,"
                                                      "LIBRARY_FUSION_TYPE_REDUCE"},
  "conc": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
  "cira": dict(ModelConfig.CPU_COMPILER_OPTIONS),   # the families' default CPU option
  "noeigen": {"xla_cpu_multi_thread_eigen": False},
  "onednn": {"xla_cpu_use_onednn": True},
  "vec512": {"xla_cpu_prefer_vector_width": 512},
  "o1": {"xla_backend_optimization_level": 1},
  "tileprop": {"xla_cpu_experimental_enable_tiling_propagation": True},
  "noemit": {"xla_cpu_use_fusion_emitters": False},
}
SETS = {"bf16": ["model.dtype=bfloat16"], "remat": ["model.remat=dots"], "xlamm": ["model.matmul=xla"],
        "xlaattn": ["model.attention=xla"]}
LAYOUTS = ("bhtd", "einsum", "block2", "block4", "tblock2", "tblock4")
BTHD = ("dpa", "einsum", "tblock2", "tblock4")


def candidate(spec: str):
  """(attention patch or None, config sets, compiler options) for a `+`-joined name."""
  parts = spec.split("+")
  unknown = [p for p in parts if p not in OPTIONS and p not in SETS and p not in LAYOUTS and p not in ("qkv", "gelu", "wot", *MATMULS)]
  if unknown:
    raise SystemExit(f"unknown candidate part(s) {unknown}")
  layout = next((p for p in parts if p in LAYOUTS), "dpa")
  patch = make_attention("qkv" in parts, layout) if ("qkv" in parts or layout != "dpa") else None
  sets = [s for p in parts for s in SETS.get(p, [])]
  options = {k: v for p in parts for k, v in OPTIONS.get(p, {}).items()}
  return patch, sets, options, next((MATMULS[p] for p in parts if p in MATMULS), None), "gelu" in parts


def compiled(variant: str, spec: str, extra_sets=(), devices: int = 1):
  patch, sets, options, mm, new_gelu = candidate(spec) if spec != "dcmodel" else (None, [], {}, None, False)
  global matmul
  original, original_mm, original_gelu = tf.Attention.__call__, (tf.matmul, matmul), jax.nn.gelu
  original_mlp = tf.MLP.__init__, tf.MLP.__call__
  if "wot" in spec.split("+"):
    tf.MLP.__init__, tf.MLP.__call__ = mlp_out_transposed()
  if patch is not None:
    tf.Attention.__call__ = patch
  if mm is not None:   # the patches replace the 2-D products; the attention's projections stay tensordots
    tf.matmul = matmul = lambda x, w, impl="auto", contract=1: mm(x, w) if contract == 1 else jnp.tensordot(x, w, contract)
  if new_gelu:
    jax.nn.gelu = gelu
  try:
    mesh_set = [f"mesh.data={devices}"] if devices > 1 else []
    mesh, rules, step, state, batch = step_and_batch(build(variant, list(extra_sets) + mesh_set + sets), devices=devices)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      t = time.perf_counter()
      exe = step.lower(state, batch).compile(compiler_options=options or None)
      compile_s = time.perf_counter() - t
      first = exe(jax.tree.map(jnp.copy, state), batch)
      jax.block_until_ready(first)
  finally:
    tf.Attention.__call__ = original
    tf.MLP.__init__, tf.MLP.__call__ = original_mlp
    tf.matmul, matmul = original_mm
    jax.nn.gelu = original_gelu
  return {"exe": exe, "state": state, "batch": batch, "first": first, "compile_s": compile_s, "times": []}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="gpt")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--set", action="append", default=[], help="config overrides for every candidate")
  p.add_argument("--runs", default="bhtd,qkv", help="candidates beside the baseline (see the module doc)")
  p.add_argument("--base", default="dcmodel", help="the candidate the speedups are against (e.g. ynn_dot: the loop's options)")
  p.add_argument("--out", help="write the result JSON here")
  p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (data parallel); set before jax loads")
  p.add_argument("--profile", action="store_true", help="instead of timing, attribute each candidate op by op (attribute.py)")
  args = p.parse_args()
  if args.profile:
    for name in ["dcmodel", *filter(None, args.runs.split(","))]:
      r = compiled(args.variant, name, args.set, args.devices)
      print(f"=== {name}")
      attribute.report(attribute.attribute_step(r["exe"], r["state"], r["batch"], r["exe"].as_text(), f"dcv_{name}"),
                       scope_min_ms=1e9, top=12)
    return
  runs = {name: compiled(args.variant, name, args.set, args.devices) for name in ["dcmodel", *filter(None, args.runs.split(","))]}
  (s0, m0) = runs["dcmodel"]["first"]
  same = {}
  for name, r in runs.items():
    s1, m1 = r["first"]
    same[name] = {"loss_rel": abs(float(m0["loss_sum"]) - float(m1["loss_sum"])) / abs(float(m0["loss_sum"])),
                  "max_param": max(float(jnp.max(jnp.abs(a - (b if b.shape == a.shape else b.T))))   # wot's transposed weight
                                   for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)) if a.dtype == jnp.float32)}
    del r["first"]
  for r in runs.values():   # one warm-up step each, untimed
    r["state"], _ = r["exe"](r["state"], r["batch"])
    jax.block_until_ready(r["state"])
  for _ in range(args.rounds):
    for r in runs.values():
      t = time.perf_counter()
      r["state"], sums = r["exe"](r["state"], r["batch"])
      jax.block_until_ready((r["state"], sums))
      r["times"].append(time.perf_counter() - t)
  base = runs[args.base]["times"]
  out = {"variant": args.variant, "rounds": args.rounds, "base": args.base, "candidates": {}}
  for name, r in runs.items():
    paired = paired_speedup(base, r["times"])
    out["candidates"][name] = {"median_step_s": float(np.median(r["times"])), "min_step_s": min(r["times"]),
                               "speedup_paired": paired["median"], "quartiles": paired["quartiles"],
                               "compile_s": r["compile_s"], **same[name]}
    c = out["candidates"][name]
    print(f"{name:22s} x{c['speedup_paired']:.3f} ({c['quartiles'][0]:.3f}-{c['quartiles'][1]:.3f})  median "
          f"{c['median_step_s'] * 1e3:5.0f} ms  min {c['min_step_s'] * 1e3:5.0f} ms  loss_rel {c['loss_rel']:.1e}  "
          f"max_param {c['max_param']:.1e}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
