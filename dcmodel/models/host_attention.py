"""Fused softmax self-attention on the CPU as XLA FFI custom calls (host_attention.cc; built and
registered by host_kernels.py), for `attention.attend` (model.attention=cpu, auto's choice on CPU).

Why: XLA:CPU has no fused attention. It runs the scores and the weighted sum as batched dots in a
head-major layout, writes transposing copies into and out of it, and the softmax and its backward
as separate passes over the (batch, heads, length, length) scores in memory: on the benchmark GPT
(T=128) ~200 ms of a ~2 s train step, the llama ~280 ms of 2.3 s. The kernel reads q, k, v where
they lie, computes the scores of 32 query rows at a time against all the keys they may see (a
32 x length scratch per thread, in cache at these lengths; the keys are not tiled, so it grows
with the length), skips the keys a causal mask hides, and keeps only the output and the rows'
log-sum-exp for the backward pass, which recomputes the probabilities from them (as flash
attention does). RoPE is applied inside it too: XLA:CPU ran the rotation's concatenate fusions at
~5 ms per (32, 128, 8, 64) array, ~40 ms of the llama's forward alone. PyTorch's
scaled_dot_product_attention on CPU is a fused kernel of the same kind. Float32, self-attention
(queries and keys of one length); anything else goes to XLA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dcmodel.models import host_kernels

def attention(q, k, v, segment_ids=None, sin=None, cos=None, *, causal: bool):
  """Softmax attention of q (batch, length, heads, head_dim) over k, v (batch, length, kv_heads,
  head_dim), heads a multiple of kv_heads, float32; logits scaled by head_dim^-1/2. A query
  attends only to keys of its own segment (`segment_ids` (batch, length)), and with `causal` to
  those at or before it. With rotary tables `sin`, `cos` (batch, length, head_dim / 2; see
  attention.rope_tables), q and k are first rotated by them (RoPE), inside the kernel. The result
  and its gradients equal jax.nn.dot_product_attention's (after attention.rope) up to float
  rounding."""
  if q.dtype != jnp.float32 or k.dtype != jnp.float32 or v.dtype != jnp.float32:
    raise ValueError(f"host attention takes float32, got {q.dtype}, {k.dtype}, {v.dtype}")
  if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or q.shape[2] % k.shape[2] or k.shape[3] != q.shape[3]:
    raise ValueError(f"host attention takes q (b, t, h, d), k and v (b, t, kv, d) with kv dividing h, "
                     f"got {q.shape}, {k.shape}, {v.shape}")
  host_kernels.register()
  seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  rotary = sin is not None
  if not rotary:   # the kernel reads no table: empty stand-ins
    sin = cos = jnp.zeros((0,), jnp.float32)
  return _attention(*host_kernels.vary_alike(q, k, v, seg, sin, cos), causal, rotary)


def _attrs(q, causal: bool, rotary: bool) -> dict:
  return {"scale": np.float32(q.shape[-1] ** -0.5), "causal": causal, "rotary": rotary}


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, seg, sin, cos, causal: bool, rotary: bool):
  return _forward(q, k, v, seg, sin, cos, causal, rotary)[0]


def _forward(q, k, v, seg, sin, cos, causal, rotary):
  b, t, h, _ = q.shape
  out = (host_kernels.result(q.shape, q), host_kernels.result((b, h, t), q))
  o, lse = jax.ffi.ffi_call(host_kernels.ATTENTION_FORWARD, out, vmap_method="sequential")(
      q, k, v, seg, sin, cos, **_attrs(q, causal, rotary))
  return o, (q, k, v, seg, sin, cos, o, lse)


def _backward(causal, rotary, res, do):
  q, k, v, seg, sin, cos, o, lse = res
  out = tuple(host_kernels.result(x.shape, q) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call(host_kernels.ATTENTION_BACKWARD, out, vmap_method="sequential")(
      q, k, v, seg, sin, cos, o, lse, do, **_attrs(q, causal, rotary))
  return dq, dk, dv, None, None, None


_attention.defvjp(_forward, _backward)
