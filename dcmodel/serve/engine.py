"""Continuous batching for a `gpt` over a fixed pool of KV-cache slots (the vLLM / JetStream
scheduler): a new request is prefilled into a free slot and joins the running decode at the next
step; one jitted decode step advances every busy slot by a token, each at its own position;
a finished sequence leaves its slot at once. Requests wait in a bounded queue while the slots
are full; past that bound `submit` refuses them (the HTTP layer answers 503).

The engine runs in its own thread: JAX calls block, and the HTTP event loop must not. Results
go back through each sequence's `emit` callback (the HTTP layer hands them to its event loop).

Shapes are fixed so nothing compiles while serving: the decode step always covers all slots
(idle ones compute and are ignored), and prompts are right-padded into a few length buckets
(powers of two up to the context), and the prompts admitted together are prefilled in one call
of a few row counts (multiples of the batch axes' size, so the prefill splits over the mesh like
training; up to a quarter and all of the slots): a wave of requests arriving as others finish
shares one pass over the weights instead of one pass each. A right-padded prompt needs no mask of its
own: it is causal, its padding lies after its last token, and decode overwrites it from there.

Sampling is per slot: greedy (temperature 0: the argmax, as `dcmodel generate`) or a draw at a
temperature from the top-k / top-p tokens with a key made of (the request's seed, the token's
index), so a seeded request draws the same tokens whatever else is in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcmodel.mesh import batch_divisor, check_batch, constrain, replicated
from dcmodel.models.layers import argmax
from dcmodel.models.transformer import KVCache
from dcmodel.train.state import Placed


class QueueFull(Exception):
  """The waiting queue cannot take the request now (the HTTP layer answers 503)."""


class EngineStopped(Exception):
  """The engine is draining or stopped and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class Params:
  """What one completion asks for; the HTTP layer has validated it against the context."""
  max_tokens: int = 16
  temperature: float = 0.0      # 0: greedy
  top_k: int = 0                # 0: the whole vocabulary
  top_p: float = 1.0
  seed: int = 0                 # 32 bits
  stop: tuple[str, ...] = ()    # text that ends the completion (not included in it)


def complete_utf8(data: bytes) -> int:
  """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
  for back in range(1, min(4, len(data)) + 1):
    b = data[-back]
    if b & 0xC0 != 0x80:          # a lead byte (or ASCII): how long is its character?
      need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
      return len(data) - back if need > back else len(data)
  return len(data)


class Sequence:
  """One prompt's completion: its tokens and text so far, why it stopped, and its timings.

  `emit(seq, delta, done)` is called from the engine thread when it finishes and, if streamed,
  at every token with the new text (held back while it could still be the start of a stop
  string, or ends inside a UTF-8 character, so the pieces add up to the final text exactly)."""

  def __init__(self, prompt_ids: np.ndarray, params: Params, tokenizer, emit: Callable, stream: bool = False,
               request_id: str = "", index: int = 0):
    self.prompt_ids = np.asarray(prompt_ids, np.int32)
    self.params, self.tokenizer, self.emit, self.stream = params, tokenizer, emit, stream
    self.request_id, self.index = request_id, index
    self.tokens: list[int] = []
    self.text = ""                    # final text (set when done)
    self.finish_reason: str | None = None
    self.error: str | None = None
    self.cancelled = False
    self.slot: int | None = None
    self.submitted_unix = time.time()
    self.t_submit = time.perf_counter()
    self.t_first: float | None = None
    self.t_done: float | None = None
    self._sent = 0                    # characters of text already emitted

  @property
  def done(self) -> bool:
    return self.finish_reason is not None

  @property
  def ttft_s(self) -> float:
    return (self.t_first or self.t_done or self.t_submit) - self.t_submit

  @property
  def latency_s(self) -> float:
    return (self.t_done or time.perf_counter()) - self.t_submit

  def _text(self, final: bool) -> tuple[str, int | None]:
    """(text so far, where a stop string starts in it or None)."""
    data = self.tokenizer.decode(self.tokens)
    text = (data if final else data[:complete_utf8(data)]).decode("utf-8", errors="replace")
    hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
    return text, (min(hits) if hits else None)

  def add(self, token: int, eos_id: int | None) -> bool:
    """Take the next token; True if the sequence is finished."""
    if self.t_first is None:
      self.t_first = time.perf_counter()
    if eos_id is not None and token == eos_id:
      return self._finish("stop")
    self.tokens.append(int(token))
    if self.params.stop or self.stream:
      text, stop_at = self._text(final=False)
      if stop_at is not None:
        return self._finish("stop", text[:stop_at])
      if len(self.tokens) >= self.params.max_tokens:
        return self._finish("length")
      if self.stream:   # every token is an event, its text possibly empty (held back)
        hold = max((k for s in self.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = max(len(text) - hold, self._sent)
        delta, self._sent = text[self._sent:safe], safe
        self.emit(self, delta, False)
      return False
    if len(self.tokens) >= self.params.max_tokens:
      return self._finish("length")
    return False

  def _finish(self, reason: str, text: str | None = None) -> bool:
    if text is None:
      text, stop_at = self._text(final=True)
      if stop_at is not None:
        text, reason = text[:stop_at], "stop"
    self.text, self.finish_reason, self.t_done = text, reason, time.perf_counter()
    delta, self._sent = text[self._sent:], len(text)
    self.emit(self, delta, True)
    return True

  def fail(self, reason: str, error: str | None = None) -> None:
    """End without a normal finish: 'abort' (the client left) or 'error'."""
    self.text, self.finish_reason, self.error, self.t_done = "", reason, error, time.perf_counter()
    self.emit(self, "", True)


def length_buckets(context: int, smallest: int = 16) -> list[int]:
  """Prompt lengths the prefill compiles for: powers of two from `smallest`, then the context."""
  out, b = [], min(smallest, context)
  while b < context:
    out.append(b)
    b *= 2
  return out + [context]


def prefill_row_buckets(slots: int, divisor: int) -> list[int]:
  """Row counts the prefill compiles for: the batch axes' size, then a quarter and all of the
  slots where those are larger multiples of it."""
  out = [divisor]
  for rows in (slots // 4, slots):
    if rows > out[-1] and rows % divisor == 0:
      out.append(rows)
  return out


def sample(logits, temperature, top_k, top_p, seeds, counts):
  """Next token per row from (rows, vocab) logits, with each row's own sampling: the argmax
  where temperature is 0; else a draw at the temperature from the top-k tokens, cut further to
  the smallest set holding top-p of the probability, keyed by (seed, token index)."""
  greedy = argmax(logits)

  def draw(_):
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ranked = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_k = jnp.arange(vocab)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), -1)
    before = jnp.cumsum(probs, -1) - probs                  # probability of the better-ranked tokens
    keep = in_k & (before < top_p[:, None])                 # the best token is always kept
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), -1)
    masked = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)

  drawn = jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
  return jnp.where(temperature > 0, drawn, greedy)


class Engine:
  """The scheduler and its jitted steps for one model on its mesh."""

  def __init__(self, placed: Placed, state, tokenizer, slots: int = 16, queue_size: int = 256, metrics=None,
               prefill_rows: tuple[int, ...] | None = None):
    self.placed, self.state, self.tokenizer = placed, state, tokenizer
    self.cfg = placed.cfg.model
    self.mesh = placed.mesh
    check_batch(slots, self.mesh, "--slots")
    self.slots, self.queue_size, self.metrics = slots, queue_size, metrics
    self.context = self.cfg.max_len
    self.prefill_rows = tuple(prefill_rows or prefill_row_buckets(slots, batch_divisor(self.mesh)))
    for rows in self.prefill_rows:
      check_batch(rows, self.mesh, "prefill rows")
    self.buckets = length_buckets(self.context)
    self.eos_id = tokenizer.eos_id          # None: the tokenizer has no end of text

    self._cv = threading.Condition()
    self._waiting: collections.deque[Sequence] = collections.deque()
    self._running: list[Sequence | None] = [None] * slots
    self._stopping = False
    self._thread: threading.Thread | None = None
    # per slot, on the host: a just-prefilled prompt's first token (fed to the next step in
    # place of the device's own), how many tokens its sequence has been stepped to, its sampling
    self._next = np.zeros(slots, np.int32)
    self._fresh_token = np.zeros(slots, bool)
    self._count = np.zeros(slots, np.int32)
    self._last_done = 0.0
    self._temp = np.zeros(slots, np.float32)
    self._top_k = np.zeros(slots, np.int32)
    self._top_p = np.ones(slots, np.float32)
    self._seed = np.zeros(slots, np.uint32)
    self.steps = 0
    self._build()

  # ---- the jitted steps
  def _build(self):
    # The steps take the model's parameters as a flat list of arrays: jit flattens a list in
    # C++, an NNX state's Variables in Python (~0.4 ms of a ~2 ms decode step here).
    graphdef, params = nnx.split(self.placed.model(self.state))
    self.params, treedef = jax.tree.flatten(params)
    merge = lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    rep = replicated(self.mesh)
    slots, context = self.slots, self.context
    fresh = jax.jit(lambda leaves: merge(leaves).init_caches(slots, context))
    with self.placed.context():
      self.caches = fresh(self.params)
    cache_shardings = jax.tree.map(lambda x: x.sharding, self.caches)
    self._fresh = fresh
    # the tokens a step starts from live on the device, placed as a step leaves them (one compile)
    self._tokens = jax.device_put(np.zeros(slots, np.int32), rep)

    def prefill(leaves, caches, tokens, lengths, slot_ids, temperature, top_k, top_p, seeds):
      model = merge(leaves)
      rows, length = tokens.shape
      new = model.init_caches(rows, length)
      logits, new = model.decode(tokens, new, at=lengths - 1)
      first = sample(logits[:, 0], temperature, top_k, top_p, seeds, jnp.zeros_like(lengths))
      out = []
      for big, small in zip(caches, new):   # into the slots; padding rows (slot id = slots) are dropped
        put = lambda a, b: constrain(a.at[slot_ids, :, :length].set(b.astype(a.dtype), mode="drop"), KVCache.AXES)
        out.append(dataclasses.replace(big, k=put(big.k, small.k), v=put(big.v, small.v),
                                       index=big.index.at[slot_ids].set(lengths, mode="drop")))
      return first, out

    def decode(leaves, caches, before, first, fresh, active, temperature, top_k, top_p, seeds, counts):
      # each slot's input: the token the last step drew, or a just-prefilled prompt's first one
      tokens = jnp.where(fresh, first, before)
      model = merge(leaves)
      logits, new = model.decode(tokens[:, None], caches)
      new = [dataclasses.replace(n, index=jnp.where(active, n.index, c.index)) for n, c in zip(new, caches)]
      return sample(logits[:, 0], temperature, top_k, top_p, seeds, counts), new

    self._prefill = jax.jit(prefill, donate_argnums=1, out_shardings=(rep, cache_shardings))
    self._decode = jax.jit(decode, donate_argnums=1, out_shardings=(rep, cache_shardings))

  def warmup(self) -> float:
    """Compile every prefill bucket and the decode step (all into no slot), so nothing
    compiles while serving; returns the seconds it took."""
    t = time.perf_counter()
    with self.placed.context():
      for rows, length in itertools.product(self.prefill_rows, self.buckets):
        first, self.caches = self._prefill(self.params, self.caches, np.zeros((rows, length), np.int32), np.ones(rows, np.int32),
                                           np.full(rows, self.slots, np.int32), np.zeros(rows, np.float32),
                                           np.zeros(rows, np.int32), np.ones(rows, np.float32), np.zeros(rows, np.uint32))
      nxt, self.caches = self._decode(self.params, self.caches, self._tokens, self._next, self._fresh_token,
                                      np.zeros(self.slots, bool), self._temp, self._top_k, self._top_p, self._seed,
                                      np.zeros(self.slots, np.int32))
      jax.block_until_ready((first, nxt))
    return time.perf_counter() - t

  # ---- the public side (any thread)
  def start(self, before: Callable | None = None) -> None:
    """Run the scheduler in its own thread, after `before` (e.g. the warm-up) in that thread."""
    def run():
      if before is not None:
        before()
      self._loop()
    self._thread = threading.Thread(target=run, name="dcmodel-engine", daemon=True)
    self._thread.start()

  def submit(self, seqs: list[Sequence]) -> None:
    """Queue the sequences (all or none): QueueFull past the bound, EngineStopped when draining."""
    with self._cv:
      if self._stopping:
        raise EngineStopped("the server is shutting down")
      # Free slots take requests the scheduler has not admitted yet; the bound is on what waits
      # beyond them (otherwise a burst arriving before the scheduler wakes is refused early).
      if len(self._waiting) + len(seqs) > self.queue_size + (self.slots - self.busy_slots):
        raise QueueFull(f"the queue is full ({len(self._waiting)} waiting, {self.queue_size} at most; "
                        f"{self.busy_slots} of {self.slots} slots busy)")
      self._waiting.extend(seqs)
      self._cv.notify()

  def cancel(self, seq: Sequence) -> None:
    """The client left: the sequence leaves its slot (or the queue) at the next step."""
    with self._cv:
      seq.cancelled = True
      self._cv.notify()

  def stop(self, timeout: float | None = None) -> None:
    """Finish what is queued and running, then end the thread."""
    with self._cv:
      self._stopping = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  @property
  def busy_slots(self) -> int:
    return sum(s is not None for s in self._running)

  @property
  def queue_depth(self) -> int:
    return len(self._waiting)

  # ---- the scheduler (engine thread)
  def _loop(self) -> None:
    """Admit, prefill, dispatch the next decode step, then take the previous step's tokens:
    the host's work on step k's tokens (text, stop strings, answers) overlaps the device's
    work on step k+1, whose input tokens never leave the device. A slot whose sequence ends
    at step k has already been stepped once more; that token is dropped."""
    inflight = None
    while True:
      with self._cv:
        while not self._waiting and not any(self._running) and inflight is None and not self._stopping:
          self._cv.wait()
        if self._stopping and not self._waiting and not any(self._running) and inflight is None:
          return
        for seq in [s for s in self._waiting if s.cancelled]:
          self._waiting.remove(seq)
          seq.fail("abort")
        admit = []
        free = [i for i, s in enumerate(self._running) if s is None]
        while self._waiting and len(admit) < len(free):
          admit.append(self._waiting.popleft())
        for seq, slot in zip(admit, free):
          seq.slot = slot
          self._running[slot] = seq
      try:
        most = self.prefill_rows[-1]
        for i in range(0, len(admit), most):
          self._prefill_group(admit[i:i + most])
        self._leave_cancelled()
        step = self._dispatch(inflight)
        if inflight is not None:
          self._collect(inflight)
        inflight = step
      except Exception as e:   # a failed step fails what it held; the engine starts over with fresh caches
        message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        traceback.print_exc()
        inflight = None
        for slot, seq in enumerate(self._running):
          if seq is not None:
            seq.fail("error", message)
            self._free(slot)
        with self.placed.context():
          self.caches = self._fresh(self.params)

  def _prefill_group(self, group: list[Sequence]) -> None:
    t = time.perf_counter()
    rows = next(r for r in self.prefill_rows if r >= len(group))
    longest = max(len(s.prompt_ids) for s in group)
    length = next(b for b in self.buckets if b >= longest)
    tokens = np.zeros((rows, length), np.int32)
    lengths = np.ones(rows, np.int32)
    slot_ids = np.full(rows, self.slots, np.int32)     # padding rows go to no slot
    temp, top_k, top_p, seed = np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32), np.zeros(rows, np.uint32)
    for j, seq in enumerate(group):
      n, p, slot = len(seq.prompt_ids), seq.params, seq.slot
      tokens[j, :n], lengths[j], slot_ids[j] = seq.prompt_ids, n, slot
      temp[j], top_k[j], top_p[j], seed[j] = p.temperature, p.top_k, p.top_p, p.seed
      self._temp[slot], self._top_k[slot], self._top_p[slot], self._seed[slot] = temp[j], top_k[j], top_p[j], seed[j]
    with self.placed.context():
      first, self.caches = self._prefill(self.params, self.caches, tokens, lengths, slot_ids, temp, top_k, top_p, seed)
      first = np.asarray(first)
    if self.metrics:
      self.metrics.step("prefill", time.perf_counter() - t, len(group), int(sum(len(s.prompt_ids) for s in group)))
    for j, seq in enumerate(group):
      slot = seq.slot
      self._next[slot], self._fresh_token[slot], self._count[slot] = first[j], True, 1
      if seq.add(int(first[j]), self.eos_id):
        self._free(slot)

  def _dispatch(self, previous):
    """Start one decode step for every slot still owed tokens; returns it (not waited on)."""
    active = np.array([s is not None and self._count[i] < s.params.max_tokens for i, s in enumerate(self._running)])
    if not active.any():
      return None
    before = previous[0] if previous is not None else self._tokens
    # copies: on CPU a jitted call may read a NumPy argument in place, after it returns
    host = [a.copy() for a in (self._next, self._fresh_token, active, self._temp, self._top_k, self._top_p, self._seed,
                               self._count)]
    with self.placed.context():
      nxt, self.caches = self._decode(self.params, self.caches, before, *host)
    self._fresh_token[:] = False
    self._count[active] += 1
    return nxt, [s if a else None for s, a in zip(self._running, active)], time.perf_counter()

  def _collect(self, step) -> None:
    nxt, holders, t = step
    nxt = np.asarray(nxt)
    done = time.perf_counter()
    self.steps += 1
    if self.metrics:   # the step's share of the pipeline: from when the device could start it
      busy = sum(h is not None for h in holders)
      self.metrics.step("decode", done - max(t, self._last_done), busy, busy)
    self._last_done = done
    for slot, seq in enumerate(holders):
      if seq is None or seq.done or self._running[slot] is not seq:
        continue
      if seq.add(int(nxt[slot]), self.eos_id):
        self._free(slot)

  def _leave_cancelled(self) -> None:
    for slot, seq in enumerate(self._running):
      if seq is not None and seq.cancelled:
        seq.fail("abort")
        self._free(slot)

  def _free(self, slot: int) -> None:
    self._running[slot] = None
