"""`dlrm`: the documents' e-commerce recommender (Naumov et al. 2019, arXiv:1906.00091).

Categorical tables are split by rows over the model axis ('table_rows' -> model): each device
holds a slice of every table, the model-parallel embeddings of DLRM. A bottom MLP embeds the
dense features, all pairs of vectors are dotted, and a top MLP gives one click logit.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcmodel.errors import UserError
from dcmodel.data.types import BatchSpec, Field
from dcmodel.models.layers import compute_dtype, dense, label_fields, param_init
from dcmodel.models.registry import ModelConfig, register


@register("dlrm")
@dataclasses.dataclass(frozen=True)
class DLRMConfig(ModelConfig):
  num_dense: int = 13
  table_sizes: tuple[int, ...] = (1000, 500, 200, 100)
  embed_dim: int = 16
  bottom: tuple[int, ...] = (64, 16)
  top: tuple[int, ...] = (64, 32)
  task: str = "binary"
  dtype: str = "float32"           # compute dtype (bfloat16: mixed precision)
  name: ClassVar[str]

  def validate(self):
    compute_dtype(self.dtype)
    if self.bottom[-1] != self.embed_dim:
      raise UserError(f"model.bottom must end in model.embed_dim={self.embed_dim} (dot interactions), got {self.bottom}")
    if min((*self.table_sizes, *self.bottom, *self.top, self.embed_dim, self.num_dense)) <= 0:
      raise UserError("model sizes must be positive")

  def batch_spec(self) -> BatchSpec:
    return BatchSpec({"x": Field((self.num_dense,), "float32"),
                      "cat": Field((len(self.table_sizes),), "int32", 0, tuple(self.table_sizes)),
                      **label_fields(self.task, 1)}, ("x", "cat"))

  def make(self, rngs):
    return DLRM(self, rngs=rngs)


def _mlp(dims, rngs, dtype):
  return nnx.List([dense(a, b, (None, "mlp") if i % 2 == 0 else ("mlp", None), rngs=rngs, dtype=dtype)
                   for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])


class DLRM(nnx.Module):
  def __init__(self, cfg: DLRMConfig, *, rngs):
    self.tables = nnx.List([nnx.Param(param_init(("table_rows", "table_dim"), nnx.initializers.normal(0.05))(
        rngs.params(), (n, cfg.embed_dim))) for n in cfg.table_sizes])
    self.dtype = dtype = compute_dtype(cfg.dtype)
    self.bottom = _mlp((cfg.num_dense, *cfg.bottom), rngs, dtype)
    f = len(cfg.table_sizes) + 1
    self.pairs = tuple(tuple(int(i) for i in a) for a in np.triu_indices(f, 1))   # static, hashable
    self.top = _mlp((cfg.embed_dim + f * (f - 1) // 2, *cfg.top), rngs, dtype)
    self.out = dense(cfg.top[-1], 1, (None, None), rngs=rngs, dtype=dtype)

  def __call__(self, x, cat):
    for i, layer in enumerate(self.bottom):
      x = jax.nn.relu(layer(x))
    rows = [t[...][cat[:, i]].astype(self.dtype) for i, t in enumerate(self.tables)]
    vectors = jnp.stack([x] + rows, axis=1)                                                       # (B, F, D)
    dots = jnp.einsum("bfd,bgd->bfg", vectors, vectors)[:, np.array(self.pairs[0]), np.array(self.pairs[1])]
    z = jnp.concatenate([x, dots], axis=1)
    for layer in self.top:
      z = jax.nn.relu(layer(z))
    return self.out(z)[:, 0].astype(jnp.float32)
