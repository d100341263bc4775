"""A CPU matmul as an XLA FFI custom call into OpenBLAS (host_gemm.cc), for `layers.matmul`.

Why: XLA:CPU's matmul libraries (YNNPACK, Eigen, oneDNN) take a dot's operands row-major only, so
XLA writes a transposing copy before every dot whose operand it wants the other way round: the
weight gradients X^T dY, the input gradients dY W^T, and the norms' and attention's outputs feeding
them. On the benchmark GPT those copies were ~200 ms of a ~2 s step, against PyTorch's 13-26 ms.
BLAS takes either operand transposed as a flag, so here no copy is written. Built and registered
by host_kernels.py."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dcmodel.models import host_kernels

def gemm(a, b, trans_a: bool = False, trans_b: bool = False):
  """op(a) @ op(b) for 2-D float32 a, b, where op transposes when asked: no copy either way."""
  if a.dtype != jnp.float32 or b.dtype != jnp.float32 or a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"host_gemm multiplies 2-D float32 arrays, got {a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}")
  host_kernels.register()
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  return jax.ffi.ffi_call(host_kernels.GEMM, host_kernels.result((m, n), a), vmap_method="sequential")(
      a, b, trans_a=trans_a, trans_b=trans_b)


def matmul(x, w, contract: int):
  """x (..., *c) contracted with w (*c, *out) over the `contract` dims c, by `gemm`; the same
  product as `jnp.tensordot(x, w, contract)`. Inside a shard_map both operands first vary alike
  (host_kernels.vary_alike)."""
  return _matmul(*host_kernels.vary_alike(x, w), contract)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, contract: int):
  return _matmul_fwd(x, w, contract)[0]


def _split(x, w, contract: int):
  """x and w as 2-D row-major views (free), and the leading and trailing shapes of the product."""
  k = math.prod(w.shape[:contract])
  return x.reshape(-1, k), w.reshape(k, -1), x.shape[:x.ndim - contract], w.shape[contract:]


def _matmul_fwd(x, w, contract):
  x2, w2, lead, out = _split(x, w, contract)
  return gemm(x2, w2).reshape(*lead, *out), (x, w)


def _matmul_bwd(contract, res, dy):
  x, w = res
  x2, w2, _, _ = _split(x, w, contract)
  dy2 = dy.reshape(x2.shape[0], w2.shape[1])
  return gemm(dy2, w2, trans_b=True).reshape(x.shape), gemm(x2, dy2, trans_a=True).reshape(w.shape)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
