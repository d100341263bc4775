"""Small shared pieces: initializers that carry logical-axis annotations, compute dtypes, and
convolution as one matmul."""

import jax
import jax.numpy as jnp
from flax import nnx

from dcmodel.data.types import Field
from dcmodel.errors import UserError

# Compute dtypes by config name. Parameters and optimizer state stay float32 whatever is chosen
# (mixed precision); logits go back to float32 before the loss.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise UserError(f"model.dtype='{name}' is not one of {', '.join(DTYPES)}")
  return DTYPES[name]


def label_fields(task: str, num_outputs: int) -> dict[str, Field]:
  """The fields a classification or binary task reads beside the inputs: the label (in the
  classes the model predicts) and the example mask (0 for an evaluation batch's padding)."""
  classes = num_outputs if task == "classification" else 2
  return {"y": Field((), "int32", 0, classes), "mask": Field((), "float32")}


def param_init(axes: tuple, init=None):
  """An initializer annotated with logical axes (resolved to mesh axes by the rules)."""
  return nnx.with_partitioning(init or nnx.initializers.lecun_normal(), axes)


def zeros(axes: tuple):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def dense(d_in: int, d_out: int, axes: tuple, *, rngs, use_bias: bool = True, dtype=None, init=None):
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, rngs=rngs,
                    kernel_init=param_init(axes, init), bias_init=zeros(axes[-1:]))


# How a convolution is computed, by config name: XLA's convolution, or its taps gathered into one
# matmul. "auto" takes the matmul on CPU, where XLA:CPU's convolutions on small images are slow
# (the digits CNN's train step: 45k vs 31k examples/s at batch 32, measured here), and XLA's own
# convolution on accelerators, whose compilers lower it to the matrix units themselves.
CONVS = ("auto", "xla", "matmul")


def conv_function(name: str):
  """The `conv_general_dilated` for nnx.Conv that config name `name` selects."""
  if name not in CONVS:
    raise UserError(f"model.conv='{name}' is not one of {', '.join(CONVS)}")
  if name == "auto":
    name = "matmul" if jax.default_backend() == "cpu" else "xla"
  return conv_as_matmul if name == "matmul" else jax.lax.conv_general_dilated


def conv_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """lax.conv_general_dilated for nnx.Conv's 2-D channels-last case (NHWC input, HWIO kernel,
  stride 1, no dilation, one group): the padded input's kh*kw shifted windows side by side, then
  one matmul with the kernel flattened to (kh*kw*in, out). Equal to XLA's convolution (same
  products, summed in another order). Other cases go to lax.conv_general_dilated. (jax's
  conv_general_dilated_patches gathers the windows by a convolution, 6x slower here.)"""
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  plain = (lhs.ndim == 4 and tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1)
           and tuple(dn.out_spec) == (0, 3, 1, 2) and tuple(window_strides) == (1, 1) and feature_group_count == 1
           and all(d in (None, (1, 1)) for d in (lhs_dilation and tuple(lhs_dilation), rhs_dilation and tuple(rhs_dilation)))
           and kwargs.get("out_sharding") is None and kwargs.get("preferred_element_type") is None)
  if not plain:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
  b, h, w, c = lhs.shape
  kh, kw, _, out = rhs.shape
  pads = jax.lax.padtype_to_pads((h, w), (kh, kw), (1, 1), padding) if isinstance(padding, str) else padding
  x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  taps = jnp.concatenate([x[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
  # As a 2-D matmul: XLA:CPU ran the CNN step with a 4-D dot_general 1.3x slower.
  y = jnp.dot(taps.reshape(b * oh * ow, kh * kw * c), rhs.reshape(kh * kw * c, out), precision=precision)
  return y.reshape(b, oh, ow, out)
