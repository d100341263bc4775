"""The design documents' MLPs: the 256 -> 128 -> 10 classifier (and, by config, the others)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from dcmodel.errors import UserError
from dcmodel.data.types import BatchSpec, Field
from dcmodel.models.layers import compute_dtype, dense, label_fields
from dcmodel.models.registry import ModelConfig, register


@register("mlp")
@dataclasses.dataclass(frozen=True)
class MLPConfig(ModelConfig):
  input_dim: int = 64
  hidden: tuple[int, ...] = (256, 128)
  num_outputs: int = 10
  task: str = "classification"   # classification (softmax) | binary (sigmoid, one output)
  dtype: str = "float32"         # compute dtype (bfloat16: mixed precision)
  name: ClassVar[str]

  def validate(self):
    compute_dtype(self.dtype)
    if self.input_dim <= 0 or self.num_outputs <= 0 or any(h <= 0 for h in self.hidden):
      raise UserError(f"model sizes must be positive: input_dim={self.input_dim}, hidden={self.hidden}, num_outputs={self.num_outputs}")

  def batch_spec(self) -> BatchSpec:
    return BatchSpec({"x": Field((self.input_dim,), "float32"), **label_fields(self.task, self.num_outputs)}, ("x",))

  def make(self, rngs):
    return MLP(self, rngs=rngs)


class MLP(nnx.Module):
  """Hidden layers alternate column- and row-split (Megatron style) when 'mlp' maps to a mesh axis."""

  def __init__(self, cfg: MLPConfig, *, rngs: nnx.Rngs):
    dims = (cfg.input_dim, *cfg.hidden)
    axes = [("embed", "mlp") if i % 2 == 0 else ("mlp", "embed") for i in range(len(cfg.hidden))]
    dtype = compute_dtype(cfg.dtype)
    self.layers = nnx.List([dense(a, b, ax, rngs=rngs, dtype=dtype) for a, b, ax in zip(dims[:-1], dims[1:], axes)])
    last_axis = "mlp" if len(cfg.hidden) % 2 else "embed"
    self.head = dense(dims[-1], cfg.num_outputs, (last_axis, "classes"), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.head(x).astype(jnp.float32)
