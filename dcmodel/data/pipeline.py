"""The Grain pipeline: shuffle -> this process's share -> batch -> gather + normalize ->
the source's transforms (tokenization, feature hashing) -> [k batches stacked, for k steps per
jitted call] -> devices. Rows come from any `types.Rows` (in-memory columns, ArrayRecord shards,
packed windows over a token stream), so tables and corpora go through the same graph.

Every global batch holds the same examples whatever the process count: the shuffled stream
is global (same seed everywhere) and process p takes every P-th row of each global batch, so
the P local batches of step s together are exactly global batch s. Each process reads only its
own rows. The iterator is Grain's, so its state (a step index) checkpoints with Orbax and a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from dcmodel.data.clean import Normalizer
from dcmodel.data.types import Rows
from dcmodel.errors import UserError


class Gather(grain.transforms.Map):
  """Read a batch of rows by index and normalize the feature; index -1 is padding (mask 0)."""

  def __init__(self, rows: Rows, feature: str | None, normalizer: Normalizer | None):
    self.rows, self.feature, self.normalizer = rows, feature, normalizer

  def map(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    idx = np.asarray(idx)
    valid = idx >= 0
    batch = self.rows.take(np.where(valid, idx, 0))
    if self.normalizer is not None:
      batch[self.feature] = self.normalizer(batch[self.feature])
    batch["mask"] = valid.astype(np.float32)
    return batch


class GlobalBatchRows(grain.transforms.Map):
  """Element d -> this process's row indices of global batches d*k .. d*k+k-1, flat (k steps
  per element; see Steps).

  The global stream is the concatenation of per-epoch permutations of the rows (epoch e
  permuted by a generator seeded with (seed, e)); global batch s is positions [s*B, (s+1)*B)
  of it, and process p takes every P-th of those. One vectorized gather per element instead of
  a shuffle per row, so the host keeps up with small steps.
  """

  def __init__(self, rows: int, global_batch_size: int, seed: int, process: int, processes: int, steps: int = 1):
    self.rows, self.batch, self.seed, self.process, self.processes = rows, global_batch_size, seed, process, processes
    self.steps = steps
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
    return self._perms[epoch]

  def map(self, element) -> np.ndarray:
    steps = int(element) * self.steps + np.arange(self.steps)
    pos = (steps[:, None] * self.batch + np.arange(self.process, self.batch, self.processes)).ravel()
    epoch, offset = np.divmod(pos, self.rows)
    if epoch[0] == epoch[-1]:   # most elements lie inside one epoch
      return self._perm(int(epoch[0]))[offset]
    out = np.empty(len(pos), np.int64)
    for e in np.unique(epoch):
      sel = epoch == e
      out[sel] = self._perm(int(e))[offset[sel]]
    return out


class Steps(grain.transforms.Map):
  """The rows of k steps, gathered and transformed as one flat batch, split on a new leading
  step axis: (k, rows per step, ...), what a jitted call of k scanned steps takes. Grain's
  per-element work is then paid once per k steps, not once per step."""

  def __init__(self, steps: int):
    self.steps = steps

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.reshape(self.steps, -1, *v.shape[1:]) for k, v in batch.items()}


ENDLESS = 2 ** 50   # steps; a random-access dataset needs a length


def _then(ds, transforms):
  for t in transforms:
    ds = ds.map(t)
  return ds


def train_iterator(rows: Rows, feature: str | None, normalizer, global_batch_size: int, seed: int,
                   read_threads: int = 1, prefetch: int = 4, transforms=(), steps_per_element: int = 1) -> grain.DatasetIterator:
  """An endless, per-epoch reshuffled iterator of this process's part of each global batch;
  with steps_per_element=k > 1, each element holds k consecutive batches stacked (see Steps)."""
  p, count = jax.process_index(), jax.process_count()
  order = GlobalBatchRows(len(rows), global_batch_size, seed, p, count, steps_per_element)
  ds = _then(grain.MapDataset.range(ENDLESS).map(order).map(Gather(rows, feature, normalizer)), transforms)
  if steps_per_element > 1:
    ds = ds.map(Steps(steps_per_element))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)))


def seek(it: grain.DatasetIterator, step: int, steps_per_element: int) -> None:
  """Put a train iterator at `step`. A restored iterator's position counts elements of as many
  steps as the run that saved it grouped; the stream is a function of the step alone, so a
  run that groups differently can re-position it exactly."""
  if step % steps_per_element:
    raise UserError(f"the checkpoint is at step {step}, not a multiple of train.steps_per_dispatch={steps_per_element}; "
                    f"resume with a train.steps_per_dispatch that divides {step}")
  state = it.get_state()
  if "next_index" not in state:
    raise RuntimeError(f"unexpected Grain iterator state {state}: dcmodel expects {{'next_index': ...}}")
  if state["next_index"] != step // steps_per_element:
    it.set_state({**state, "next_index": step // steps_per_element})


def eval_batches(rows: Rows, feature: str | None, normalizer, global_batch_size: int, transforms=()):
  """One pass over a split in order, the last global batch padded (mask 0) to full size."""
  p, count = jax.process_index(), jax.process_count()
  n = len(rows)
  padded = -(-n // global_batch_size) * global_batch_size
  idx = np.concatenate([np.arange(n), -np.ones(padded - n, np.int64)])
  ds = grain.MapDataset.source(idx)[p::count].batch(global_batch_size // count).map(Gather(rows, feature, normalizer))
  return _then(ds, transforms)


def step_inputs(batch: dict[str, np.ndarray], sharding, keys=None) -> dict:
  """What a jitted step with `in_shardings` is called with. On one process: the host arrays
  themselves; the step's in_shardings place them on dispatch, in jit's C++ path (~60 us for a
  small batch here, against ~250 us for jax.device_put, per step). Across processes: the
  global arrays from every process's rows (to_device)."""
  if jax.process_count() == 1:
    return {k: batch[k] for k in keys} if keys is not None else batch
  return to_device(batch, sharding, keys)


def to_device(batch: dict[str, np.ndarray], sharding, keys=None) -> dict[str, jax.Array]:
  """Assemble the global jax.Array from every process's local rows, split over the batch axes
  (only `keys`, if given: ids stay on the host). One transfer call when there is one process."""
  batch = {k: batch[k] for k in keys} if keys is not None else batch
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
