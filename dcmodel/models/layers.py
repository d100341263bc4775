"""Small shared pieces: initializers that carry logical-axis annotations, compute dtypes."""

import jax.numpy as jnp
from flax import nnx

from dcmodel.errors import UserError

# Compute dtypes by config name. Parameters and optimizer state stay float32 whatever is chosen
# (mixed precision); logits go back to float32 before the loss.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise UserError(f"model.dtype='{name}' is not one of {', '.join(DTYPES)}")
  return DTYPES[name]


def param_init(axes: tuple, init=None):
  """An initializer annotated with logical axes (resolved to mesh axes by the rules)."""
  return nnx.with_partitioning(init or nnx.initializers.lecun_normal(), axes)


def zeros(axes: tuple):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def dense(d_in: int, d_out: int, axes: tuple, *, rngs, use_bias: bool = True, dtype=None, init=None):
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, rngs=rngs,
                    kernel_init=param_init(axes, init), bias_init=zeros(axes[-1:]))
