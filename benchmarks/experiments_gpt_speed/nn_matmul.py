"""The prototype fix for XLA:CPU's weight-gradient matmuls: `x @ w` whose backward pass hands
every matmul to YNNPACK (XLA:CPU's fast dot library) as a plain row-major product.

Why: the weight gradient dW = X^T dY contracts the token dimension, the leading one of both
operands. XLA writes it as a dot with the lhs contracted on its first dimension; YNNPACK (in
jaxlib 0.10's XLA:CPU) takes only a row-major lhs contracted on its last dimension
(xla/backends/cpu/ynn_support.cc: IsDotSupportedByYnn rejects !lhs_canonical), so XLA runs that
dot on Eigen instead, and its layout assignment may choose operand layouts that turn a
neighbouring elementwise fusion into a transposing copy. In the benchmark GPT's step that fusion
was the GELU backward, written transposed: ~0.5 s of a ~3 s step, and the Eigen dots sharing
the cores with YNNPACK's. Here the smaller of X and dY is transposed explicitly behind an
optimization barrier (XLA's transpose folding would otherwise fold it back into the dot), so
the dW dot is NN, which YNNPACK runs.

`matmul(x, w)`: x (..., k) @ w (k, n). `dot_general`: the same as a drop-in for
jax.lax.dot_general (the hook nnx.Linear, nnx.Einsum and nnx.Conv take), used where the
contraction is that plain case and lax.dot_general elsewhere.
"""

from __future__ import annotations

import jax


@jax.custom_vjp
def matmul(x, w):
  return x @ w


def _fwd(x, w):
  return x @ w, (x, w)


def _bwd(res, dy):
  x, w = res
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if x2.shape[1] <= dy2.shape[1]:   # transpose the smaller operand: X^T (k, tokens) @ dY
    dw = jax.lax.optimization_barrier(x2.T) @ dy2
  else:                             # dW^T = dY^T (n, tokens) @ X, and the small (n, k) result transposed
    dw = (jax.lax.optimization_barrier(dy2.T) @ x2).T
  return (dy @ w.T).astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_fwd, _bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """jax.lax.dot_general, with the (..., k) x (k, n) case through `matmul`."""
  (lc, rc), (lb, rb) = dimension_numbers
  plain = (tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and rhs.ndim == 2 and not lb and not rb
           and precision is None and preferred_element_type in (None, lhs.dtype) and not kwargs)
  if plain:
    return matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type,
                             **kwargs)
