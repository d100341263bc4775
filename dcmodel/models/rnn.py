"""`gru`: the documents' recurrent classifier (financial sentiment), over byte sequences.

The recurrence is `nnx.scan` over time (one compiled cell, not a Python loop); the final
hidden state feeds a linear head.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from dcmodel.errors import UserError
from dcmodel.data.types import BatchSpec, Field
from dcmodel.models.layers import compute_dtype, dense, label_fields, param_init
from dcmodel.models.registry import ModelConfig, register


@register("gru")
@dataclasses.dataclass(frozen=True)
class GRUConfig(ModelConfig):
  vocab_size: int = 256
  seq_len: int = 256
  embed_dim: int = 64
  hidden: int = 256
  num_outputs: int = 10
  unroll: int = 1                  # time steps per loop iteration (seq_len: no loop at all)
  task: str = "classification"
  dtype: str = "float32"           # compute dtype (bfloat16: mixed precision)
  name: ClassVar[str]
  COMPUTE_ONLY: ClassVar[tuple[str, ...]] = ("unroll",)   # a checkpoint resumes under any of these

  def validate(self):
    compute_dtype(self.dtype)
    for f in ("vocab_size", "seq_len", "embed_dim", "hidden", "num_outputs", "unroll"):
      if getattr(self, f) <= 0:
        raise UserError(f"model.{f} must be positive, got {getattr(self, f)}")

  def batch_spec(self) -> BatchSpec:
    return BatchSpec({"x": Field((self.seq_len,), "int32", 0, self.vocab_size), **label_fields(self.task, self.num_outputs)},
                     ("x",))

  def make(self, rngs):
    return GRU(self, rngs=rngs)


class GRU(nnx.Module):
  def __init__(self, cfg: GRUConfig, *, rngs):
    dtype = compute_dtype(cfg.dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim, rngs=rngs, dtype=dtype,
                           embedding_init=param_init(("vocab", "embed"), nnx.initializers.normal(0.1)))
    self.cell = nnx.GRUCell(cfg.embed_dim, cfg.hidden, rngs=rngs, dtype=dtype,
                            kernel_init=param_init(("embed", "mlp")), recurrent_kernel_init=param_init((None, "mlp"), nnx.initializers.orthogonal()))
    self.head = dense(cfg.hidden, cfg.num_outputs, (None, "classes"), rngs=rngs, dtype=dtype)
    self.hidden, self.unroll = cfg.hidden, cfg.unroll

  def __call__(self, x):
    x = self.embed(x)                                               # (batch, length, embed)
    h0 = jnp.zeros((x.shape[0], self.hidden), x.dtype)

    @nnx.scan(in_axes=(nnx.Carry, None, 1), out_axes=nnx.Carry, unroll=self.unroll)
    def step(h, cell, xt):
      h, _ = cell(h, xt)
      return h

    return self.head(step(h0, self.cell, x)).astype(jnp.float32)
