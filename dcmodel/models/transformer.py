"""Transformers: `gpt` (decoder-only LM) and `bert` (encoder + classification head).

One block serves both (causal or not). Shapes cover GPT-2/3 (LayerNorm, GELU, learned
positions, biases, tied embeddings) and Llama (RMSNorm, SwiGLU, RoPE, GQA, no biases).
Every parameter names logical axes; activations are constrained at block boundaries so XLA
keeps the batch split over the batch axes whatever the rules do with the weights.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from dcmodel.data.types import BatchSpec, Field
from dcmodel.errors import UserError
from dcmodel.mesh import constrain
from dcmodel.models.attention import IMPLS, attend, rope, unfit
from dcmodel.models import host_kernels
from dcmodel.models.layers import DTYPES, MATMULS, PRODUCT, compute_dtype, label_fields, matmul, param_init, takes_host_gemm, zeros
from dcmodel.models.registry import ModelConfig, register

MAX_LAYERS = 512        # built and traced in a Python loop: time grows with the count

# "dots" keeps the dense products, on XLA's dots or on host BLAS (layers.matmul names those).
REMAT = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                                                                 jax.checkpoint_policies.save_only_these_names(PRODUCT))}


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ModelConfig):
  vocab_size: int = 256
  max_len: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0            # 0: same as num_heads (multi-head); fewer: grouped-query attention
  d_ff: int = 1024
  mlp: str = "gelu"                # gelu | swiglu
  norm: str = "layernorm"          # layernorm | rmsnorm
  positions: str = "learned"       # learned | rope
  rope_theta: float = 10000.0      # RoPE base wavelength (Llama 2: 1e4, Llama 3: 5e5)
  norm_eps: float = 1e-6           # epsilon of every LayerNorm / RMSNorm (GPT-2: 1e-5)
  tie_embeddings: bool = True
  use_bias: bool = True
  dropout: float = 0.0             # on embeddings and each residual branch, in training only
  dtype: str = "float32"           # compute dtype; parameters and optimizer state stay float32
  remat: str = "none"              # none | block | dots
  attention: str = "auto"          # auto | xla | cpu | cudnn | splash: the kernel (models/attention.py)
  matmul: str = "auto"             # auto | xla | blas: the dense layers' product (models/layers.py MATMULS)
  name: ClassVar[str]
  COMPUTE_ONLY: ClassVar[tuple[str, ...]] = ("remat", "attention", "matmul")   # a checkpoint resumes under any of these
  # YNNPACK takes the dots only: its default also fuses reductions with their elementwise neighbours
  # (the norms' backward), whose broadcast operands XLA then materializes as (batch, length, width)
  # arrays. The benchmark GPT's step: 1.038x (paired median of 10 interleaved rounds, three runs
  # 1.034-1.038; loss equal to 4e-7; experiments_gpt_speed/dc_variants.py ynn_dot). Not for every
  # family: the documents' CNN ran 0.81x with it (experiments_gpt_speed/small_opts.py). Without
  # the default's copy-insertion region analysis, which cost the benchmark GPT's step 2% on one
  # device and 6% on 8 (dc_variants ynn_dot / dcmodel against cira+ynn_dot, 5 paired rounds each).
  CPU_COMPILER_OPTIONS: ClassVar[dict] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  # On 8 simulated devices in one process the dot-only fusion is slower than no option at all:
  # 0.971x (gpt) with glibc's malloc, 0.877x (gpt) and 0.824x (llama) with huge pages
  # (DCMODEL_HOST_MALLOC=hugetlb), 5 paired rounds each; on one device with huge pages 1.118x, 1.131x.
  CPU_COMPILER_OPTIONS_SHARED_CORES: ClassVar[dict | None] = {}

  def cpu_compiler_options(self, local_devices: int) -> dict:
    # With the dense products on host BLAS, YNNPACK's dot fusion has at most the attention's
    # batched dots left (none under the fused CPU attention), and they ran slower on it: the
    # benchmark GPT's step 1.04x without the option (experiments_gpt_speed/dc_variants.py dcmodel
    # against ynn_dot, before the fused attention).
    if local_devices == 1 and takes_host_gemm(self.matmul, DTYPES[self.dtype]):
      return {}
    return super().cpu_compiler_options(local_devices)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def validate(self):
    for field in ("vocab_size", "max_len", "d_model", "num_layers", "num_heads", "d_ff"):
      if getattr(self, field) <= 0:
        raise UserError(f"model.{field} must be positive, got {getattr(self, field)}")
    if self.num_layers > MAX_LAYERS:
      raise UserError(f"model.num_layers={self.num_layers} is more than {MAX_LAYERS}: the layers are built and traced one "
                      f"by one in Python (96 take ~15 s), so this many would not finish; the largest published "
                      f"models have ~130")
    if self.d_model % self.num_heads:
      raise UserError(f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}")
    if self.num_heads % self.kv_heads:
      raise UserError(f"model.num_kv_heads={self.kv_heads} does not divide model.num_heads={self.num_heads}")
    for field, allowed in (("mlp", ("gelu", "swiglu")), ("norm", ("layernorm", "rmsnorm")),
                           ("positions", ("learned", "rope")), ("remat", tuple(REMAT)), ("attention", IMPLS),
                           ("matmul", MATMULS)):
      if getattr(self, field) not in allowed:
        raise UserError(f"model.{field}='{getattr(self, field)}' is not one of {', '.join(allowed)}")
    compute_dtype(self.dtype)
    if self.attention != "auto" and (why := unfit(self.attention, backend=None, dtype=DTYPES[self.dtype], q_len=self.max_len,
                                                  kv_len=self.max_len, head_dim=self.head_dim, masked=False, cache=False)):
      raise UserError(f"model.attention={self.attention} cannot take this model: {why}")
    if self.attention == "cpu":
      host_kernels.register()   # as for blas below
    if self.matmul == "blas":
      if self.dtype != "float32":
        raise UserError(f"model.matmul=blas multiplies float32 only, and model.dtype={self.dtype} (use model.matmul=auto)")
      host_kernels.register()   # builds the kernels now, so a missing compiler is said before the run starts
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
    if self.positions == "rope" and self.head_dim % 2:
      raise UserError(f"rope needs an even head dimension, got d_model/num_heads={self.head_dim}")
    if self.rope_theta <= 0 or self.norm_eps <= 0:
      raise UserError(f"model.rope_theta and model.norm_eps must be > 0, got {self.rope_theta} and {self.norm_eps}")


@register("gpt")
@dataclasses.dataclass(frozen=True)
class GPTConfig(TransformerConfig):
  task: str = "lm"

  def batch_spec(self) -> BatchSpec:
    """Packed rows of a token stream: inputs, next-token targets, the document each token is in
    and its position there, and per target its weight (0 across a document boundary or on
    padding) and UTF-8 bytes (for bits per byte)."""
    L, ids = (self.max_len,), lambda: Field((self.max_len,), "int32", 0, self.vocab_size)
    return BatchSpec({"x": ids(), "y": ids(), "segment_ids": Field(L, "int32"),
                      "positions": Field(L, "int32", 0, self.max_len), "weights": Field(L, "float32"),
                      "target_bytes": Field(L, "float32"), "mask": Field((), "float32")},
                     ("x", "segment_ids", "positions"), lm=True)

  def make(self, rngs):
    return GPT(self, rngs=rngs)


@register("bert")
@dataclasses.dataclass(frozen=True)
class BERTConfig(TransformerConfig):
  num_outputs: int = 10
  task: str = "classification"

  def batch_spec(self) -> BatchSpec:
    return BatchSpec({"x": Field((self.max_len,), "int32", 0, self.vocab_size), **label_fields(self.task, self.num_outputs)},
                     ("x",))

  def make(self, rngs):
    return BERT(self, rngs=rngs)


def _norm(cfg, rngs):
  scale = nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",))
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, scale_init=scale, rngs=rngs)
  return nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, scale_init=scale, bias_init=zeros(("embed",)),
                       use_bias=cfg.use_bias, rngs=rngs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """One layer's keys and values for decoding, (batch, kv_heads, length, head_dim), and per row
  where its next tokens go (`index`) and where its real tokens start (`start`: left padding).
  Rows move independently: an offline batch (generate) keeps every row at the same index, a
  serving engine's slots are each at their own, joining and leaving between steps. Heads come
  before positions so attention reads the cache as it lies (no transpose of the whole cache
  per step, which dominated a CPU decode step in the other order)."""
  k: jax.Array
  v: jax.Array
  index: jax.Array          # (batch,): position of the first token being written, per row
  start: jax.Array          # (batch,): first real position of each row

  AXES: ClassVar[tuple] = ("batch", "act_kv_heads", None, None)

  @classmethod
  def zeros(cls, cfg: TransformerConfig, batch: int, length: int, start, dtype):
    shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    kv = constrain(jnp.zeros(shape, dtype), cls.AXES)
    return cls(kv, kv, jnp.zeros((batch,), jnp.int32), jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,)))

  @property
  def length(self) -> int:
    return self.k.shape[2]

  def write(self, k, v) -> "KVCache":
    """Each row's new keys and values, (batch, new, kv_heads, head_dim), at its own index (the
    caller keeps index + new <= length)."""
    put = jax.vmap(lambda cache, new, i: jax.lax.dynamic_update_slice(cache, new.transpose(1, 0, 2), (0, i, 0)))
    k = constrain(put(self.k, k.astype(self.k.dtype), self.index), self.AXES)
    v = constrain(put(self.v, v.astype(self.v.dtype), self.index), self.AXES)
    return dataclasses.replace(self, k=k, v=v)

  def positions(self, length: int):
    """(batch, length) cache positions of `length` new tokens."""
    return self.index[:, None] + jnp.arange(length)

  def mask(self, length: int):
    """(batch, length, cache length): causal over positions, and never a row's left padding."""
    query = self.positions(length)
    key = jnp.arange(self.length)
    return (key[None, None, :] <= query[:, :, None]) & (key[None, None, :] >= self.start[:, None, None])

  def attend(self, q):
    """Attention of queries (batch, new, heads, head_dim) over the cache (GQA: each KV head
    serves heads / kv_heads queries), as jax.nn.dot_product_attention computes it."""
    b, n, h, d = q.shape
    kv = self.k.shape[1]
    q = q.reshape(b, n, kv, h // kv, d)
    logits = jnp.einsum("bnkgd,bksd->bkgns", q, self.k, preferred_element_type=jnp.float32) * (d ** -0.5)
    logits = jnp.where(self.mask(n)[:, None, None], logits, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.v.dtype)
    return jnp.einsum("bkgns,bksd->bnkgd", probs, self.v).reshape(b, n, h, d).astype(q.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: TransformerConfig, *, rngs):
    d, h, k, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    fan_in_d = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    self.wq = nnx.Param(param_init(("embed", "heads", "head_dim"), fan_in_d)(rngs.params(), (d, h, hd)))
    self.wk = nnx.Param(param_init(("embed", "kv_heads", "head_dim"), fan_in_d)(rngs.params(), (d, k, hd)))
    self.wv = nnx.Param(param_init(("embed", "kv_heads", "head_dim"), fan_in_d)(rngs.params(), (d, k, hd)))
    self.wo = nnx.Param(param_init(("heads", "head_dim", "embed"),
                                   nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2))(rngs.params(), (h, hd, d)))
    self.bo = nnx.Param(zeros(("embed",))(rngs.params(), (d,))) if cfg.use_bias else None
    # Q/K/V biases (GPT-2's c_attn bias). Zeros need no random key: drawing none leaves every
    # other parameter's initial values as they were before these existed.
    bias = lambda axes, n: nnx.Param(zeros(axes)(jax.random.key(0), (n, hd))) if cfg.use_bias else None
    self.bq, self.bk, self.bv = bias(("heads", "head_dim"), h), bias(("kv_heads", "head_dim"), k), bias(("kv_heads", "head_dim"), k)
    self.cfg = cfg

  def __call__(self, x, causal: bool, positions, dtype, cache: KVCache | None = None, segment_ids=None):
    cfg = self.cfg
    q, k, v = (matmul(x, w[...].astype(dtype), cfg.matmul) for w in (self.wq, self.wk, self.wv))   # (b, l, heads, head_dim)
    if self.bq is not None:
      q, k, v = (t + b[...].astype(dtype) for t, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
    rotary = (positions, cfg.rope_theta) if cfg.positions == "rope" else None
    q = constrain(q, ("batch", "act_length", "act_heads", None))
    if cache is None:
      # Packed rows: a token attends only within its own document (same segment id).
      out = attend(q, k, v, causal=causal, segment_ids=segment_ids, impl=cfg.attention, rotary=rotary)   # GQA: k/v heads are shared
    else:
      if rotary is not None:
        q, k = rope(q, *rotary), rope(k, *rotary)
      cache = cache.write(k, v)
      out = cache.attend(q)     # decoding: the cache's own layout and mask, plain XLA on every platform
    out = constrain(out, ("batch", "act_length", "act_heads", None))
    y = matmul(out, self.wo[...].astype(dtype), cfg.matmul, contract=2)
    y = y + self.bo[...].astype(dtype) if self.bo is not None else y
    return y if cache is None else (y, cache)


class MLP(nnx.Module):
  def __init__(self, cfg: TransformerConfig, *, rngs):
    d, f = cfg.d_model, cfg.d_ff
    self.wi = nnx.Param(param_init(("embed", "mlp"))(rngs.params(), (d, f)))
    self.wg = nnx.Param(param_init(("embed", "mlp"))(rngs.params(), (d, f))) if cfg.mlp == "swiglu" else None
    self.wo = nnx.Param(param_init(("mlp", "embed"))(rngs.params(), (f, d)))
    self.bi = nnx.Param(zeros(("mlp",))(rngs.params(), (f,))) if cfg.use_bias else None
    self.bo = nnx.Param(zeros(("embed",))(rngs.params(), (d,))) if cfg.use_bias else None
    self.impl = cfg.matmul

  def __call__(self, x, dtype):
    h = matmul(x, self.wi[...].astype(dtype), self.impl)
    if self.bi is not None:
      h = h + self.bi[...].astype(dtype)
    h = jax.nn.silu(matmul(x, self.wg[...].astype(dtype), self.impl)) * h if self.wg is not None else jax.nn.gelu(h)
    h = constrain(h, ("batch", "act_length", "act_mlp"))
    y = matmul(h, self.wo[...].astype(dtype), self.impl)
    return y + self.bo[...].astype(dtype) if self.bo is not None else y


def _drop(dropout: nnx.Dropout, x, key, site: int):
  """Dropout keyed by (step key, site): no RNG state in the model, so steps are pure and a
  resumed run draws the same masks. No key (eval, decoding, accounting): identity."""
  return x if key is None else dropout(x, rngs=jax.random.fold_in(key, site))


class Block(nnx.Module):
  def __init__(self, cfg: TransformerConfig, *, rngs):
    self.norm1, self.attn = _norm(cfg, rngs), Attention(cfg, rngs=rngs)
    self.norm2, self.mlp = _norm(cfg, rngs), MLP(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x, causal, positions, dtype, cache: KVCache | None = None, key=None, segment_ids=None):
    a = self.attn(self.norm1(x).astype(dtype), causal, positions, dtype, cache, segment_ids)
    if cache is not None:
      a, cache = a
    x = x + _drop(self.dropout, a, key, 0)
    x = x + _drop(self.dropout, self.mlp(self.norm2(x).astype(dtype), dtype), key, 1)
    x = constrain(x, ("batch", "act_length", "act_embed"))
    return x if cache is None else (x, cache)


class Trunk(nnx.Module):
  """Embeddings, positions and the stack of blocks."""

  def __init__(self, cfg: TransformerConfig, *, rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                           embedding_init=param_init(("vocab", "embed"), nnx.initializers.normal(0.02)))
    self.pos = (nnx.Param(param_init((None, "embed"), nnx.initializers.normal(0.02))(rngs.params(), (cfg.max_len, cfg.d_model)))
                if cfg.positions == "learned" else None)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = _norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, tokens, causal: bool, dropout_key=None, segment_ids=None, positions=None):
    """`segment_ids` and `positions` (batch, length): packed rows, where attention stays inside
    each document and positions count from each document's start. Without them, one sequence
    per row at positions 0, 1, ..."""
    cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
    positions = jnp.arange(tokens.shape[1]) if positions is None else positions
    keys = [None] * (cfg.num_layers + 1) if dropout_key is None else list(jax.random.split(dropout_key, cfg.num_layers + 1))
    x = _drop(self.dropout, self._embed(tokens, positions, dtype), keys[-1], 0)
    policy = REMAT[cfg.remat]
    for block, key in zip(self.blocks, keys):
      if cfg.remat != "none":
        x = nnx.remat(lambda b, y, k: b(y, causal, positions, dtype, key=k, segment_ids=segment_ids), policy=policy)(block, x, key)
      else:
        x = block(x, causal, positions, dtype, key=key, segment_ids=segment_ids)
    return self.final_norm(x)

  def _embed(self, tokens, positions, dtype):
    x = self.embed(tokens)
    if self.pos is not None:
      x = x + jnp.take(self.pos[...], positions, axis=0)
    return constrain(x.astype(dtype), ("batch", "act_length", "act_embed"))

  def decode(self, tokens, caches: list[KVCache]):
    """Causal pass over new tokens against the caches (prefill: the whole prompt; decode: one
    token). Positions count from each row's first real token, so left padding changes nothing."""
    dtype = DTYPES[self.cfg.dtype]
    positions = jnp.maximum(caches[0].positions(tokens.shape[1]) - caches[0].start[:, None], 0)
    x = self._embed(tokens, positions, dtype)
    new = []
    for block, cache in zip(self.blocks, caches):
      x, cache = block(x, True, positions, dtype, cache)
      new.append(dataclasses.replace(cache, index=cache.index + tokens.shape[1]))
    return self.final_norm(x), new


class GPT(nnx.Module):
  def __init__(self, cfg: GPTConfig, *, rngs):
    self.trunk = Trunk(cfg, rngs=rngs)
    self.unembed = (None if cfg.tie_embeddings else
                    nnx.Param(param_init(("embed", "vocab"))(rngs.params(), (cfg.d_model, cfg.vocab_size))))

  def __call__(self, x, segment_ids=None, positions=None, dropout_key=None):
    return self._logits(self.trunk(x, causal=True, dropout_key=dropout_key, segment_ids=segment_ids, positions=positions))

  def decode(self, tokens, caches: list[KVCache], at=None):
    """(logits of the new tokens, updated caches): the KV-cache path of generation. With `at`
    (batch,), only the logits at those positions of the new tokens, (batch, 1, vocab): a
    prefill needs one row's last, not a prompt's worth of vocabulary-wide rows."""
    x, caches = self.trunk.decode(tokens, caches)
    if at is not None:
      x = jnp.take_along_axis(x, at[:, None, None], axis=1)
    return self._logits(x), caches

  def init_caches(self, batch: int, length: int, start=0) -> list[KVCache]:
    cfg = self.trunk.cfg
    return [KVCache.zeros(cfg, batch, length, start, DTYPES[cfg.dtype]) for _ in range(cfg.num_layers)]

  def _logits(self, x):
    w = self.trunk.embed.embedding[...].T if self.unembed is None else self.unembed[...]
    dtype = DTYPES[self.trunk.cfg.dtype]
    return constrain(matmul(x.astype(dtype), w.astype(dtype), self.trunk.cfg.matmul).astype(jnp.float32),
                     ("batch", "act_length", "act_vocab"))


class BERT(nnx.Module):
  """Encoder with mean pooling over the sequence and a linear classification head."""

  def __init__(self, cfg: BERTConfig, *, rngs):
    self.trunk = Trunk(cfg, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.num_outputs, rngs=rngs, dtype=DTYPES[cfg.dtype],
                           kernel_init=param_init(("embed", "classes")), bias_init=zeros(("classes",)))

  def __call__(self, x, dropout_key=None):
    x = self.trunk(x, causal=False, dropout_key=dropout_key)
    return self.head(x.mean(axis=1, dtype=jnp.float32)).astype(jnp.float32)
