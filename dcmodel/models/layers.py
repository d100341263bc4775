"""Small shared pieces: initializers that carry logical-axis annotations, compute dtypes, and
the formulations the CPU runs fastest (matmul, argmax, convolution as one matmul)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from dcmodel.data.types import Field
from dcmodel.errors import UserError
from dcmodel.mesh import logical_spec, spec_axes
from dcmodel.models import host_gemm, host_kernels

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


# How the transformer's dense layers multiply, by config name (model.matmul): "blas" is OpenBLAS
# through an XLA custom call (host_gemm.py), which takes transposed operands without a copy; "xla"
# is XLA's dot. "auto" takes blas for float32 products of at least FEW_ROWS rows on CPU where the
# product is one device's alone (one device, or a shard_map's per-device body), and XLA's dot
# elsewhere: on a split mesh, few rows, bfloat16, accelerators. "blas" also takes it on a split
# mesh: shard_mapped over the batch axes where the mesh splits only the batch (XLA cannot partition a custom call: left to it, it gathers the
# operands onto every device), gathered where it splits the model too. On 8 simulated devices the
# shard_mapped product ran the benchmark GPT's loop at 0.93x (data parallel) and 0.95x (FSDP)
# XLA's dots (lm_peers, 3 rounds), so auto does not take it there. Nor for products of fewer than
# FEW_ROWS rows (decoding's): XLA's few-row dots read the weights faster, and greedy decoding of
# the 25M GPT on host BLAS ran 0.91x (batch 1) and 0.86x (batch 8) of it (lm_decode, 2 rounds).
MATMULS = ("auto", "xla", "blas")
FEW_ROWS = 64
PRODUCT = "matmul"   # the checkpoint name of a host BLAS product


def matmul(x, w, impl: str = "auto", contract: int = 1):
  """x (..., *c) contracted with w (*c, *out) over its `contract` dims c, as `jnp.tensordot(x, w,
  contract)`: the transformer's dense layers, projections and unembedding (see MATMULS).

  On CPU without blas, the backward pass of a 2-D w computes the weight gradient dW = X^T dY as a
  plain row-major matmul. Why: XLA writes dW as a dot contracting the token dimension, the leading
  one of both operands. XLA:CPU hands a dot to YNNPACK (its fast matmul library) only when the lhs
  is contracted on its last dimension, so every dW ran on Eigen, and layout assignment turned the
  GELU backward beside it into a transposing copy. Here the smaller of X and dY is transposed
  explicitly, behind an optimization barrier so transpose folding does not fold it back into the
  dot. The benchmark GPT's train step (d512, 4 layers, T=128, batch 32) ran 1.18x faster on one
  CPU device, measured interleaved in one process (benchmarks/experiments_gpt_speed/dc_patched.py).
  Other platforms lower the plain product, whose dot emitters take any layout."""
  rows = math.prod(x.shape[:x.ndim - contract])
  if takes_host_gemm(impl, jnp.result_type(x, w)) and (impl == "blas" or rows >= FEW_ROWS):
    y = _host_product(x, w, contract, split_mesh=impl == "blas")
    if y is not None:
      return y
  if jax.default_backend() != "cpu" or contract != 1 or w.ndim != 2:
    return jnp.tensordot(x, w, contract)
  return _nn_matmul(x, w)


def takes_host_gemm(impl: str, dtype) -> bool:
  """Whether `matmul` multiplies operands of `dtype` by host BLAS for `impl` (on this process's
  backend), on a mesh that lets it (see MATMULS)."""
  if impl == "xla":
    return False
  if impl == "blas":
    if jax.default_backend() != "cpu":
      raise UserError(f"model.matmul=blas runs on the CPU only, and this run is on {jax.default_backend()} "
                      f"(use model.matmul=auto or xla)")
    return True
  return jax.default_backend() == "cpu" and dtype == jnp.float32 and host_kernels.available()


def _host_product(x, w, contract: int, split_mesh: bool):
  """host_gemm.matmul where the product is one device's; on a split mesh only if `split_mesh`
  (else None): on each device's own rows where the mesh splits only the batch, else gathered."""
  local = lambda x, w: checkpoint_name(host_gemm.matmul(x, w, contract), PRODUCT)   # named for remat "dots":
  mesh = jax.sharding.get_abstract_mesh()                                           # a custom call is no dot
  split = {} if mesh.empty else {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
                                 if kind != jax.sharding.AxisType.Manual and size > 1}
  if not split:
    return local(x, w)
  if not split_mesh:
    return None
  batch = tuple(a for a in spec_axes(logical_spec(("batch",))[0]) if a in split)
  if set(batch) != set(split) or x.shape[0] % math.prod(split.values()):
    return local(x, w)
  # w enters whole on every device (FSDP's gather); its gradient is summed over the batch axes.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(batch), P()), out_specs=P(batch), axis_names=set(batch))(x, w)


@jax.custom_vjp
def _nn_matmul(x, w):
  return x @ w


def _nn_matmul_fwd(x, w):
  return x @ w, (x, w)


def weight_grad(x, dy, dtype):
  """dW = X^T dY for x (..., k), dy (..., n) as a row-major matmul (see `matmul`)."""
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if x2.shape[1] <= dy2.shape[1]:   # X^T (k, tokens) @ dY (tokens, n)
    dw = jax.lax.optimization_barrier(x2.T) @ dy2
  else:                             # (dY^T (n, tokens) @ X)^T: the small (n, k) result transposed
    # The second barrier keeps the transpose off the dot: XLA folds (A B)^T into one dot
    # contracting both operands' leading dimension (TT), which XLA:CPU runs on Eigen, beside
    # the input gradient's dot and at about half its speed (the MLP output projection's and
    # the unembedding's dW). The GPT step: 1.044x (dc_variants.py wg, 8 rounds, 1.026-1.070).
    dw = jax.lax.optimization_barrier(jax.lax.optimization_barrier(dy2.T) @ x2).T
  return dw.astype(dtype)


def _nn_matmul_bwd(res, dy):
  x, w = res
  return (dy @ w.T).astype(x.dtype), weight_grad(x, dy, w.dtype)


_nn_matmul.defvjp(_nn_matmul_fwd, _nn_matmul_bwd)


def argmax(x, axis: int = -1):
  """`jnp.argmax(x, axis)` as int32 (the first index of the maximum; of the first NaN if any),
  written as a max and a min over the indices that reach it.

  Why: jnp.argmax lowers to one reduce over (value, index) pairs, which XLA:CPU runs as a scalar
  loop; two plain reduces vectorize. Measured on this host (one device): 16 x 256 logits 35 us ->
  8-12 us (a serving decode step's pick), 8 x 32,000 637 -> 201 us, 4,096 x 256 (a GPT train
  step's accuracy) 2.4 -> 0.76 ms."""
  top = jnp.max(x, axis, keepdims=True)
  hit = (x == top) | jnp.isnan(x)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
  return jnp.min(jnp.where(hit, index, x.shape[axis]), axis)


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
