"""Megatron tensor parallelism (Shoeybi et al. 2019, arXiv:1909.08053) with its collectives
written out, over the 'model' axis, for the transformer's own MLP and attention parameters.

MLP: the first matmul is split by columns and the second by rows, so each device computes a
partial output and one all-reduce (psum) sums them. Attention: heads are split; each device
attends with its own heads and the row-split output projection ends in one psum. The
sequence-parallel variant replaces the psum by an all-gather of the input and a reduce-scatter
of the output (same bytes, activations split between blocks).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def mlp(mesh, params: dict, x, kind: str = "gelu", sequence_parallel: bool = False):
  """params: wi (D, F), wo (F, D), optional wg (D, F), bi (F,), bo (D,); x (B, T, D)."""
  specs = {"wi": P(None, "model"), "wo": P("model", None), "wg": P(None, "model"), "bi": P("model")}
  local = {k: v for k, v in params.items() if k in specs and v is not None}
  x_spec = P(None, "model") if sequence_parallel else P()

  @partial(jax.shard_map, mesh=mesh, in_specs=({k: specs[k] for k in local}, x_spec), out_specs=x_spec,
           check_vma=False)
  def block(p, x):
    if sequence_parallel:
      x = jax.lax.all_gather(x, "model", axis=1, tiled=True)             # gather the sequence
    h = x @ p["wi"]
    if "bi" in p:
      h = h + p["bi"]
    h = jax.nn.silu(x @ p["wg"]) * h if "wg" in p else jax.nn.gelu(h)
    partial_out = h @ p["wo"]                                           # (B, T, D), partial sum
    if sequence_parallel:
      return jax.lax.psum_scatter(partial_out, "model", scatter_dimension=1, tiled=True)
    return jax.lax.psum(partial_out, "model")

  y = block(local, x)
  return y + params["bo"] if params.get("bo") is not None else y


def attention(mesh, params: dict, x, causal: bool = True, rope_fn=None):
  """params: wq (D, H, hd), wk/wv (D, K, hd), wo (H, hd, D), optional bq (H, hd), bk/bv (K, hd),
  bo (D,); heads split over 'model'."""
  specs = {"wq": P(None, "model", None), "wk": P(None, "model", None), "wv": P(None, "model", None),
           "wo": P("model", None, None), "bq": P("model", None), "bk": P("model", None), "bv": P("model", None)}
  local = {k: v for k, v in params.items() if k in specs and v is not None}

  @partial(jax.shard_map, mesh=mesh, in_specs=({k: specs[k] for k in local}, P()), out_specs=P(), check_vma=False)
  def block(p, x):
    q = jnp.einsum("bld,dhk->blhk", x, p["wq"]) + p.get("bq", 0.0)
    k = jnp.einsum("bld,dhk->blhk", x, p["wk"]) + p.get("bk", 0.0)
    v = jnp.einsum("bld,dhk->blhk", x, p["wv"]) + p.get("bv", 0.0)
    if rope_fn is not None:
      positions = jnp.arange(x.shape[1])
      q, k = rope_fn(q, positions), rope_fn(k, positions)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal)       # local heads only
    return jax.lax.psum(jnp.einsum("blhk,hkd->bld", out, p["wo"]), "model")

  y = block(local, x)
  return y + params["bo"] if params.get("bo") is not None else y
