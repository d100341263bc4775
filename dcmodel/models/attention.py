"""Attention by platform: `attend`, the one function the transformer calls, and the choice of kernel.

`model.attention` names it:
  xla     jax.nn.dot_product_attention(implementation="xla"): every platform, every mask.
  cpu     dcmodel's fused CPU kernel (models/host_attention.py, an XLA FFI custom call): float32
          self-attention, causal or full, segment ids, grouped-query heads, shard_mapped over the
          batch and head axes. XLA:CPU has none of its own.
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused attention on an NVIDIA
          GPU, bfloat16. Segment ids go in as a boolean mask, which jax
          hands to cuDNN as an additive bias; cuDNN's packed (THD) layout would skip the masked
          blocks, but jax reaches it only through a private module and only on Hopper and later.
  splash  the Pallas TPU splash-attention kernel (jax.experimental.pallas.ops.tpu.splash_attention):
          causal or full, segment ids, grouped-query heads, shard_mapped over the batch and head
          axes. Off TPU it runs in Pallas interpret mode: correct and slow, for tests.
  auto    cpu on CPU, cudnn on GPU, splash on TPU, and xla wherever the kernel cannot take the
          call (`unfit` says where) or, for cpu, could not be built here.

An explicit kernel that cannot take a whole-row call (training, evaluation) is a UserError naming
why. Decoding does not come here: the KV cache attends in its own layout (transformer.KVCache.attend,
plain XLA on every platform), so every trained model can generate whatever the setting. A `mask`
given here (any per-row mask) goes to XLA under `auto`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_mask as splash_mask,
)
from jax.sharding import PartitionSpec as P

from dcmodel.errors import UserError
from dcmodel.mesh import logical_spec, spec_axes
from dcmodel.models import host_attention, host_kernels

IMPLS = ("auto", "xla", "cpu", "cudnn", "splash")
AUTO = {"cpu": "cpu", "gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}    # by jax backend; any other: xla
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
SPLASH_BLOCK = 128          # the kernel's tiles are multiples of the TPU's 128 lanes
SPLASH_BLOCKS = (512, 256, 128)   # the largest that divides the length (MaxText's default is 512)
CAUSAL_HALVES_MIN = 128     # xla's causal self-attention from this length on skips the upper quarter
_HALVES = contextvars.ContextVar("dcmodel_causal_halves", default=True)


@contextlib.contextmanager
def full_causal():
  """Inside, xla's causal attention computes the full T x T scores (no halves): what the FLOP
  accounting counts by convention (perf.accounting), whatever a kernel skips."""
  token = _HALVES.set(False)
  try:
    yield
  finally:
    _HALVES.reset(token)


def unfit(impl: str, *, backend: str | None, dtype, q_len: int, kv_len: int, head_dim: int,
          masked: bool, cache: bool) -> str | None:
  """Why kernel `impl` cannot take this call, or None. `backend` None: not checked (config time);
  `masked`: segment ids or a cache mask; `cache`: a per-row mask over KV-cache slots."""
  if impl == "cpu":
    if backend is not None and backend != "cpu":
      return f"dcmodel's fused attention runs on the CPU, not {backend}"
    if jnp.dtype(dtype) != jnp.float32:
      return f"dcmodel's fused CPU attention computes float32 only, not {jnp.dtype(dtype).name}"
    if cache:
      return "decoding's KV cache attends in its own layout"
    if q_len != kv_len:
      return f"it takes self-attention, not {q_len} queries against {kv_len} keys"
  if impl == "splash":
    if cache:
      return "the kernel's mask is static and shared by the batch, the KV cache's is per row"
    if q_len != kv_len:
      return f"it takes self-attention, not {q_len} queries against {kv_len} keys"
    if q_len % SPLASH_BLOCK:
      return f"the sequence length {q_len} is not a multiple of the kernel's {SPLASH_BLOCK}-token block"
  if impl == "cudnn":
    if backend is not None and backend not in ("gpu", "cuda"):
      return f"cuDNN runs on an NVIDIA GPU, not {backend}"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
      return f"cuDNN's fused attention has no {jnp.dtype(dtype).name} kernel; set model.dtype=bfloat16"
    limit = 256 if backend is None or _hopper() else 128
    if head_dim % 8 or head_dim > limit:
      return f"the head dimension {head_dim} is not a multiple of 8 up to {limit}"
    if masked and (q_len % 2 or kv_len % 2):
      # jax's check for cuDNN's bias (the mask's form) in training: odd lengths are refused.
      return f"with a mask cuDNN needs even lengths, got {q_len} x {kv_len}"
  return None


def choose(impl: str, *, backend: str, dtype, q_len: int, kv_len: int, head_dim: int,
           masked: bool, cache: bool) -> str:
  """The implementation that runs: `impl`, or for auto the platform's kernel when it fits, else xla."""
  if impl not in IMPLS:
    raise UserError(f"model.attention='{impl}' is not one of {', '.join(IMPLS)}")
  if impl == "xla":
    return "xla"
  want = AUTO.get(backend, "xla") if impl == "auto" else impl
  if want == "xla":
    return "xla"
  why = unfit(want, backend=backend, dtype=dtype, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
              masked=masked, cache=cache)
  if why is None:
    # auto builds the CPU kernels only for a call they fit, and runs XLA's where they cannot be built
    return "xla" if impl == "auto" and want == "cpu" and not host_kernels.available() else want
  if impl == "auto" or cache:
    return "xla"
  raise UserError(f"model.attention={impl} cannot run here: {why}; use model.attention=auto or xla")


def attend(q, k, v, *, causal: bool, segment_ids=None, mask=None, impl: str = "auto",
           backend: str | None = None, rotary=None):
  """Softmax attention. q (batch, length, heads, head_dim); k, v (batch, kv_length, kv_heads,
  head_dim), heads a multiple of kv_heads. `segment_ids` (batch, length): a token attends only
  within its own segment (packed documents). `mask` (batch, 1, length, kv_length), True where a
  query may attend: the KV cache's. `rotary`: (positions (length,) or (batch, length), base):
  q and k are first rotated by `rope` (by the cpu kernel as it reads them). `backend`: the
  platform the program is built for (cpu, cuda, rocm, tpu; default this process's; pass another
  to lower ahead of time for it)."""
  backend = backend or _platform()
  use = choose(impl, backend=backend, dtype=q.dtype, q_len=q.shape[1], kv_len=k.shape[1], head_dim=q.shape[-1],
               masked=segment_ids is not None or mask is not None, cache=mask is not None)
  if use in ("cpu", "splash") and (why := _uneven(q)):
    if impl != "auto":
      raise UserError(f"model.attention={impl} cannot run here: {why}; use model.attention=auto or xla")
    use = "xla"
  if use == "cpu":
    tables = (None, None) if rotary is None else rope_tables(rotary[0], q.shape[-1] // 2, rotary[1], q.shape[0])
    return per_device(functools.partial(host_attention.attention, causal=causal), q, k, v, segment_ids, *tables)
  if rotary is not None:
    q, k = rope(q, *rotary), rope(k, *rotary)
  if use == "splash":
    return per_device(functools.partial(_splash_local, causal=causal, interpret=backend != "tpu"), q, k, v, segment_ids)
  if (use == "xla" and causal and mask is None and q.shape[1] == k.shape[1] and q.shape[1] >= CAUSAL_HALVES_MIN
      and q.shape[1] % 2 == 0 and _HALVES.get()):
    return causal_halves(q, k, v, segment_ids)
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = same if mask is None else mask & same
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=use)


def causal_halves(q, k, v, segment_ids=None):
  """Causal self-attention in XLA as two query halves, the first against the first half of the
  keys only: the quarter of the logits above the diagonal is never computed (a flash kernel's
  block skipping, at the coarsest grain). Same layout and result as
  jax.nn.dot_product_attention(is_causal=True) up to float rounding; GQA as there. The benchmark
  GPT's step (T=128) on XLA:CPU: attention dots 217 -> ~110 ms, the step 1.095x faster with the
  dot-only YNNPACK option (train/step.py), 1.03x without it (dc_variants.py tblock2)."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  half = t // 2
  outs = []
  for i in range(2):
    qi, ki, vi = q[:, i * half:(i + 1) * half], k[:, :(i + 1) * half], v[:, :(i + 1) * half]
    s = jnp.einsum("bqkgd,bskd->bkgqs", qi, ki, preferred_element_type=jnp.float32) * (d ** -0.5)
    allowed = jnp.arange((i + 1) * half)[None, :] <= jnp.arange(i * half, (i + 1) * half)[:, None]
    if segment_ids is not None:
      allowed = allowed & (segment_ids[:, None, None, i * half:(i + 1) * half, None]
                           == segment_ids[:, None, None, None, :(i + 1) * half])
    s = jnp.where(allowed, s, -0.7 * jnp.finfo(jnp.float32).max)
    outs.append(jnp.einsum("bkgqs,bskd->bqkgd", jax.nn.softmax(s, axis=-1).astype(v.dtype), vi))
  return jnp.concatenate(outs, axis=1).reshape(b, t, h, d)


def per_device(local, q, k, v, *by_row):
  """local(q, k, v, *by_row) on each device's part of (batch, length, heads, head_dim) arrays and
  of `by_row` arrays (batch, ...) or None (segment ids, rotary tables): under a mesh,
  shard_mapped, for a kernel that is a custom call (Pallas, FFI) and so opaque to XLA's
  partitioner, which would otherwise gather it onto every device. Batch and heads stay split as
  the rules say; the length is whole on each device (the kernels' masks are over the full
  sequence)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return local(q, k, v, *by_row)
  batch, heads = logical_spec(("batch", "act_heads"))
  if k.shape[2] % math.prod(mesh.shape[a] for a in spec_axes(heads)):
    # kv heads that do not split over the head shards (e.g. one, multi-query): give each query
    # head its own copy, so each device holds the keys and values of its query heads.
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  # k and v split over the heads as q is, whatever their own rule: the kernel pairs local query
  # head h with local kv head h // group, true when both split into the same number of pieces.
  spec = P(batch, None, heads, None)
  rows = tuple(None if x is None else P(batch) for x in by_row)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, *rows), out_specs=spec,
                       check_vma=False)(q, k, v, *by_row)


def _uneven(q) -> str | None:
  """Why `per_device` cannot split q's batch and heads evenly over the mesh, or None: a
  shard_map takes even pieces only (XLA's partitioner pads the rest, e.g. an evaluation's last
  batch)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  batch, heads = logical_spec(("batch", "act_heads"))
  for what, size, axes in (("batch", q.shape[0], spec_axes(batch)), ("heads", q.shape[2], spec_axes(heads))):
    shards = math.prod(mesh.shape[a] for a in axes)
    if size % shards:
      return f"the {what} ({size}) does not split evenly over its {shards} mesh shards"
  return None


def rope_tables(positions, half: int, base: float = 10000.0, batch: int | None = None):
  """(sin, cos) of RoPE's angles, (..., length, half): position p turns dimension pair i by
  p * base^(-i / half). With `batch`, broadcast to (batch, length, half)."""
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None].astype(jnp.float32) * freq
  if batch is not None:
    angle = jnp.broadcast_to(angle, (batch, *angle.shape[-2:]))
  return jnp.sin(angle), jnp.cos(angle)


def rope(x, positions, base: float = 10000.0):
  """Rotary embedding on (..., length, heads, head_dim); positions (length,) or (batch, length).
  The rotate-half layout: dimension i pairs with i + head_dim/2 (as Hugging Face's Llama)."""
  half = x.shape[-1] // 2
  sin, cos = (t[..., None, :] for t in rope_tables(positions, half, base))
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _splash_local(q, k, v, segment_ids, *, causal: bool, interpret: bool):
  """One device's batch: the kernel vmapped over rows, in its (heads, length, head_dim) layout."""
  _, length, heads, head_dim = q.shape
  block = next(b for b in SPLASH_BLOCKS if length % b == 0)
  blocks = splash_kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                    block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                    block_q_dq=block, block_kv_dq=block)
  one = splash_mask.CausalMask((length, length)) if causal else splash_mask.FullMask((length, length))
  kernel = splash_kernel.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                                         block_sizes=blocks, interpret=interpret)
  # The kernel does not scale the logits: scale q as jax.nn.dot_product_attention does.
  q = (q * jnp.asarray(1.0 / np.sqrt(head_dim), q.dtype)).swapaxes(1, 2)
  k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
  if segment_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    ids = segment_ids.astype(jnp.int32)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(s, s)))(q, k, v, ids)
  return out.swapaxes(1, 2)


@functools.cache
def _platform() -> str:
  """jax's default backend, a GPU named by its maker: cuDNN is NVIDIA's ("cuda"); ROCm has none."""
  backend = jax.default_backend()
  if backend == "gpu":
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
  return backend


@functools.cache
def _hopper() -> bool:
  """cuDNN takes head dimensions up to 256 from Hopper (compute capability 9.0) on, 128 before."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    return False
  return bool(gpus) and float(getattr(gpus[0], "compute_capability", "0")) >= 9.0
