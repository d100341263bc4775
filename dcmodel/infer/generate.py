"""Autoregressive decoding for `gpt` with a KV cache: prefill the prompts in one pass, then one
token per step inside a jitted `lax.scan`.

Prompts of different lengths are left-padded into one batch; each row's positions count from
its first real byte and its padding is masked out, so a row decodes exactly as it would alone.
The cache is laid out like the activations (batch over the batch axes, KV heads over `model`),
so decoding runs under the same mesh and rules as training.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcmodel import resources
from dcmodel.data.tokenizers import ByteTokenizer
from dcmodel.errors import UserError
from dcmodel.mesh import batch_divisor, replicated
from dcmodel.models.layers import DTYPES, argmax
from dcmodel.perf.accounting import kv_cache_bytes
from dcmodel.train.state import Placed


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int = 64
  temperature: float = 0.0      # 0: greedy
  top_k: int = 0                # 0: the whole vocabulary
  seed: int = 0

  def check(self):
    if self.max_new_tokens < 1:
      raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise UserError(f"--temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"--top-k must be >= 0, got {self.top_k}")


def pick(logits, key, sampling: Sampling):
  """Next tokens from (batch, vocab) logits: argmax, or a draw at a temperature from the top k."""
  if sampling.temperature == 0:
    return argmax(logits)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray            # (prompts, max_new_tokens) int32
  texts: list[bytes]
  prefill_s: float              # time to first token (prefill + first pick), blocked on
  decode_s: float               # the remaining max_new_tokens - 1 tokens, blocked on
  prompt_tokens: int

  @property
  def decode_tokens_per_s(self) -> float:
    return self.tokens.shape[0] * (self.tokens.shape[1] - 1) / self.decode_s if self.tokens.shape[1] > 1 else float("nan")


class Generator:
  """Jitted prefill and decode for one trained model, reused across calls of the same shapes."""

  def __init__(self, placed: Placed, state, tokenizer=None):
    self.placed, self.state = placed, state
    self.graphdef, self.mesh = placed.graphdef, placed.mesh
    self.tokenizer = tokenizer or ByteTokenizer()   # the experiment's (the one its training data was tokenized with)
    self.cfg = placed.cfg.model
    self._compiled = {}

  def _fns(self, sampling: Sampling):
    key = (sampling.temperature, sampling.top_k, sampling.max_new_tokens)
    if key in self._compiled:
      return self._compiled[key]
    graphdef, rep = self.graphdef, replicated(self.mesh)

    def prefill(state, tokens, start, rng):
      model = nnx.merge(graphdef, state)[0]
      caches = model.init_caches(tokens.shape[0], tokens.shape[1] + sampling.max_new_tokens, start)
      logits, caches = model.decode(tokens, caches)
      return pick(logits[:, -1], rng, sampling), caches

    def decode(state, caches, first, rng):
      model = nnx.merge(graphdef, state)[0]

      def body(carry, step_rng):
        tok, caches = carry
        logits, caches = model.decode(tok[:, None], caches)
        nxt = pick(logits[:, 0], step_rng, sampling)
        return (nxt, caches), nxt

      rngs = jax.random.split(rng, sampling.max_new_tokens - 1)
      _, rest = jax.lax.scan(body, (first, caches), rngs)
      return jnp.concatenate([first[:, None], rest.T], axis=1)

    fns = (jax.jit(prefill, out_shardings=(rep, None)), jax.jit(decode, out_shardings=rep))
    self._compiled[key] = fns
    return fns

  def __call__(self, prompts: list[bytes], sampling: Sampling) -> Generation:
    sampling.check()
    if not prompts or any(len(p) == 0 for p in prompts):
      raise UserError("every prompt must hold at least one byte")
    n = len(prompts)
    ids = [self.tokenizer.encode(p) for p in prompts]
    if any(len(t) == 0 for t in ids):
      raise UserError("a prompt encodes to no tokens")
    length = max(len(t) for t in ids)
    slots = length + sampling.max_new_tokens
    if sampling.top_k > self.cfg.vocab_size:
      raise UserError(f"--top-k {sampling.top_k} is more than the {self.cfg.vocab_size} tokens of the vocabulary")
    rows = -(-n // batch_divisor(self.mesh)) * batch_divisor(self.mesh)
    kv = kv_cache_bytes(self.cfg, rows, slots, jnp.dtype(DTYPES[self.cfg.dtype]).itemsize)
    resources.check_device_memory(
        self.placed.bytes_per_device() + kv / self.mesh.size, rows * slots * 4 * 2, self.placed.local_devices(),
        f"generating {slots} positions for {rows} sequences (KV cache {resources.gib(kv)})", "ask for fewer --max-new-tokens")
    if self.cfg.positions == "learned" and slots > self.cfg.max_len:
      raise UserError(f"prompt ({length} tokens) + --max-new-tokens ({sampling.max_new_tokens}) = {slots} exceeds "
                      f"the model's learned positions (model.max_len={self.cfg.max_len})")
    # The batch splits over the batch axes like training: round it up with copies of prompt 0.
    padded = ids + [ids[0]] * (rows - n)
    tokens = np.zeros((rows, length), np.int32)
    start = np.zeros((rows,), np.int32)
    for i, t in enumerate(padded):
      tokens[i, length - len(t):] = t
      start[i] = length - len(t)
    prefill, decode = self._fns(sampling)
    rng_prefill, rng_decode = jax.random.split(jax.random.key(sampling.seed))
    with self.placed.context():
      sharding = self.placed.data_sharding
      tokens_d = jax.device_put(tokens, sharding)
      start_d = jax.device_put(start, sharding)
      t0 = time.perf_counter()
      first, caches = prefill(self.state, tokens_d, start_d, rng_prefill)
      first.block_until_ready()
      t1 = time.perf_counter()
      out = decode(self.state, caches, first, rng_decode) if sampling.max_new_tokens > 1 else first[:, None]
      out = np.asarray(jax.device_get(out))[:n]
      t2 = time.perf_counter()
    return Generation(out, [self.tokenizer.decode(r) for r in out], t1 - t0, t2 - t1, int(sum(map(len, ids))))


def greedy_by_recompute(graphdef, state, prompt: bytes, max_new_tokens: int, tokenizer=None) -> np.ndarray:
  """Reference decoding without a cache: each step, the full forward pass over the whole
  sequence so far (right-padded to the final length, which a causal model never looks at)."""
  ids = (tokenizer or ByteTokenizer()).encode(prompt)
  n = len(ids)
  seq = np.zeros((1, n + max_new_tokens), np.int32)
  seq[0, :n] = ids
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)[0](t))
  for i in range(max_new_tokens):
    seq[0, n + i] = int(jnp.argmax(forward(state, seq)[0, n + i - 1]))   # the reference: jnp's own argmax
  return seq[0, n:]
