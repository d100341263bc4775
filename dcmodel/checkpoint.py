"""Checkpoints with Orbax (TensorStore / OCDBT underneath): train state + Grain iterator state.

- Restores go straight into the target shardings of the abstract state, so the same checkpoint
  loads onto any mesh.
- Saves are asynchronous: the device-to-host copy happens inside `save`, so the train step may
  donate the state buffers right after.
- Every save records a fingerprint of each array (an order-sensitive integer hash computed on
  device, independent of layout). A restore recomputes it, so a flipped byte that still
  decompresses is caught; unreadable, truncated or uncommitted steps are caught too, and the
  newest good step is used instead.
- Retention is ours, not Orbax's: a step is deleted only once `max_to_keep` newer steps have
  been read back and verified, so the newest good checkpoint never goes while a newer one is
  unverified. Non-finite states are never saved.
- A checkpoint holds the train state (model and optimizer) or the model alone (`save_model`:
  what import-hf writes at step 0, where an optimizer state would be zero moments, twice the
  model's bytes on disk and in memory for nothing). A restore completes a model-only step with
  the caller's `fresh_optimizer`, which is what training from those weights starts from anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import shutil
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from dcmodel.config import CheckpointConfig
from dcmodel.errors import UserError

COMMIT_MARKER = "commit_success.txt"
# The train state is nnx.split((model, optimizer))[1]: key 0 holds the model, key 1 its optimizer.
MODEL = 0
MODEL_ONLY = "model"          # meta "contents" of a checkpoint without optimizer state


def model_part(state):
  """The model's part of a train state (or of its abstract target), as a model-only checkpoint holds it."""
  return nnx.State({MODEL: state[MODEL]})


def _trim_host_heap() -> None:
  """Hand freed heap pages back to the OS after a read-back.

  Each verification allocates a state-sized set of host buffers across TensorStore's worker
  threads; glibc keeps such freed pages in per-thread arenas, which shows up as resident memory
  creeping for the first dozens of saves (benchmarks/soak.py). No-op off glibc.
  """
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


_LIBC = None
with contextlib.suppress(OSError, AttributeError, TypeError):
  _libc = ctypes.CDLL(ctypes.util.find_library("c"))
  if hasattr(_libc, "malloc_trim"):
    _LIBC = _libc


def _row_major_index(shape) -> jax.Array:
  """Each element's row-major position (mod 2**32), built per axis: flattening a sharded array
  instead would gather it whole onto every device (8 copies of an FSDP-split embedding)."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


@jax.jit
def _fingerprint_one(x):
  if jnp.issubdtype(x.dtype, jnp.floating):
    bits, finite = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32), jnp.all(jnp.isfinite(x))
  else:
    bits, finite = x.astype(jnp.uint32), jnp.bool_(True)
  weights = _row_major_index(bits.shape) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32), finite


def fingerprint(state):
  """Per-array (position-weighted uint32 hash, all-finite flag). Integer sums are exact, so the
  hash is the same for any sharding of the same values. Elementwise, then one reduction: no
  array moves between devices. One array per call: a single program over the whole state kept
  every array's temporaries alive together (the model's size again) and compiled for seconds;
  per array, the compiles are per distinct shape and sharding (a few for a stack of layers).
  Each waits for the last: XLA:CPU deadlocked here with hundreds of all-reducing programs in
  flight on 2 cores (a rendezvous that never filled)."""
  return jax.tree.map(lambda x: jax.block_until_ready(_fingerprint_one(x)), _arrays(state))


def _arrays(state):
  """Only numeric arrays (typed PRNG keys are hashed through their key data)."""
  def data(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return jax.tree.map(data, state)


def _flat_prints(prints) -> tuple[dict[str, int], bool]:
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(prints), is_leaf=lambda x: isinstance(x, tuple))[0]
  hashes = {jax.tree_util.keystr(path): int(h) for path, (h, _) in leaves}
  return hashes, all(bool(f) for _, (_, f) in leaves)


def _sync(name: str) -> None:
  """Every process meets here (nothing to do with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class DamagedCheckpoint(Exception):
  pass


class _Manager(ocp.CheckpointManager):
  """Orbax's manager without its own preemption checks. It asks JAX's preemption sync point with
  the checkpoint step (in save, and later from its finalize thread); the sync manager keeps the
  last number any caller passed as the process's count, so a checkpoint step beside the loop's
  count of calls moved the agreed stop (measured: 11 steps late, on a run resumed at step 11 and
  signalled during its step-20 save). The loop's Preemption hook is the one caller
  (train/preemption.py)."""

  def reached_preemption(self, step: int) -> bool:
    return False


class Checkpointer:
  def __init__(self, directory: Path, cfg: CheckpointConfig, in_flight_bytes: int | None = None):
    """`in_flight_bytes` bounds what Orbax writes or reads at once (it must exceed the largest
    array): unbounded, TensorStore's buffers for a whole state sit beside the state itself."""
    self.cfg = cfg
    self.directory = Path(directory).absolute()
    bound = {} if in_flight_bytes is None else {"save_concurrent_gb": in_flight_bytes / 1e9,
                                                "restore_concurrent_gb": in_flight_bytes / 1e9}
    self.manager = _Manager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=cfg.async_save, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(**bound),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._unverified: list[int] = []
    self._verified: set[int] = set()
    self._target = None

  # ---- saving
  def save(self, step: int, state, data_iterator, contents: str = "train_state") -> None:
    hashes, finite = _flat_prints(fingerprint(state))
    if not finite:
      raise FloatingPointError(f"refusing to checkpoint step {step}: the state holds NaN or Inf")
    self._finish_pending()
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave({"step": step, "fingerprints": hashes, "contents": contents})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    with self._write_errors(step):
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._unverified.append(step)
    self._target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

  def save_model(self, step: int, model_state) -> None:
    """A checkpoint of the model alone (no optimizer or data-iterator state)."""
    self.save(step, nnx.State({MODEL: model_state}), None, MODEL_ONLY)

  def _finish_pending(self) -> None:
    """Wait for in-flight saves, verify them by reading back, then apply retention."""
    if not self._unverified:
      return
    with self._write_errors(self._unverified[-1]):
      self.manager.wait_until_finished()
    # What the write freed goes back to the OS before the read-back allocates a state again:
    # glibc kept it (measured: a 1.4 GB model's import peaked at 2.8 GB over baseline, 2.1 GB after).
    _trim_host_heap()
    # The primary process commits a step after the others return from waiting: meet here so
    # every process reads the committed step, and agree on the outcome, so that retention
    # (which deletes collectively) decides the same everywhere.
    _sync(f"dcmodel-saved-{self._unverified[-1]}")
    for step in self._unverified:
      problem = None
      try:
        self._read(step, self._target, None)
      except DamagedCheckpoint as e:
        problem = str(e)
      if _everywhere(problem is None):
        self._verified.add(step)
      else:
        print(f"dcmodel: warning: checkpoint step {step} failed verification after save: "
              f"{problem or 'on another process'}", flush=True)
    self._unverified = []
    _trim_host_heap()
    self._retain()

  @contextlib.contextmanager
  def _write_errors(self, step: int):
    """A failed write (disk full, permissions) is a clear error; the partial step stays
    uncommitted, so no later run mistakes it for a good one."""
    try:
      yield
    except Exception as e:
      good = sorted(self._verified)
      raise UserError(f"checkpoint step {step} could not be written to {self.directory}: "
                      f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}; "
                      f"last good checkpoint: {good[-1] if good else 'none'}") from e

  def _retain(self) -> None:
    """Delete what is older than the `max_to_keep` newest verified steps (and nothing else)."""
    good = sorted(self._verified)[-self.cfg.max_to_keep:]
    if len(good) < self.cfg.max_to_keep:
      return
    steps = self.all_steps()
    # Every process lists the steps before any is deleted: listing stats each step directory,
    # and a step the primary deletes meanwhile made another process fail (seen in CI).
    _sync(f"dcmodel-retain-{good[0]}")
    for step in steps:
      if step < good[0]:
        self.manager.delete(step)
        self._verified.discard(step)

  def wait(self) -> None:
    self._finish_pending()

  def close(self) -> None:
    self._finish_pending()
    self.manager.close()

  # ---- restoring
  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _committed(self, step: int) -> bool:
    d = self.directory / str(step)
    items = (d, d / "state", d / "meta") + ((d / "data",) if (d / "data").exists() else ())
    return all((p / COMMIT_MARKER).exists() for p in items)

  def _contents(self, step: int) -> str:
    """What a step holds: "train_state" or MODEL_ONLY (read from its small JSON item alone)."""
    if not self._committed(step):
      raise DamagedCheckpoint(f"missing commit marker ({COMMIT_MARKER}): the save never finished")
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      raise DamagedCheckpoint(f"unreadable metadata ({type(e).__name__})") from e
    return meta.get("contents", "train_state")

  def _read_state(self, step: int, target_state, data_iterator, fresh_optimizer):
    """A step as a full train state: a model-only step is completed by `fresh_optimizer`."""
    if self._contents(step) != MODEL_ONLY:
      return self._read(step, target_state, data_iterator)
    if fresh_optimizer is None:
      raise UserError(f"checkpoint step {step} in {self.directory} holds the model alone, without optimizer state")
    return fresh_optimizer(self._read(step, model_part(target_state), None)[MODEL])

  def _read(self, step: int, target_state, data_iterator):
    if not self._committed(step):
      raise DamagedCheckpoint(f"missing commit marker ({COMMIT_MARKER}): the save never finished")
    items = {"state": ocp.args.StandardRestore(target_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DamagedCheckpoint(f"unreadable ({type(e).__name__}: {first[:300]})") from e
    expected = restored.meta["fingerprints"]
    actual, finite = _flat_prints(fingerprint(restored.state))
    if set(expected) != set(actual):
      raise DamagedCheckpoint(f"its arrays do not match the model: saved {sorted(set(expected) - set(actual))[:3]}, "
                              f"model has {sorted(set(actual) - set(expected))[:3]}")
    bad = [k for k in expected if expected[k] != actual[k]]
    if bad:
      raise DamagedCheckpoint(f"checksum mismatch in {len(bad)} array(s), e.g. {bad[0]}")
    if not finite:
      raise DamagedCheckpoint("holds NaN or Inf")
    return restored.state

  def _move_aside(self, step: int) -> Path:
    """Keep a damaged step for inspection, out of the way of the step numbers to come."""
    aside = self.directory.parent / "checkpoints-damaged" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      aside.parent.mkdir(exist_ok=True)
      (self.directory / str(step)).rename(aside)
    _sync(f"dcmodel-move-aside-{step}")
    self.manager.reload()
    return aside

  def restore_step(self, step: int, target_state, fresh_optimizer=None):
    """The state of one named step, verified; a missing or damaged step is a user error."""
    if step not in self.all_steps():
      raise UserError(f"no checkpoint step {step} in {self.directory}; saved steps: {self.all_steps()}")
    try:
      return self._read_state(step, target_state, None, fresh_optimizer)
    except DamagedCheckpoint as e:
      raise UserError(f"checkpoint step {step} in {self.directory} is damaged: {e}") from e

  def restore_model(self, target_state, step: int | None = None):
    """(step, the model's state) of `step` or the newest good step, verified. A model-only step
    reads only the model; a train state is read whole (Orbax's standard restore takes the full tree)."""
    steps = self.all_steps() if step is None else [step]
    if step is not None and step not in self.all_steps():
      raise UserError(f"no checkpoint step {step} in {self.directory}; saved steps: {self.all_steps()}")
    problems = []
    for s in reversed(steps):
      try:
        if self._contents(s) == MODEL_ONLY:
          return s, self._read(s, model_part(target_state), None)[MODEL]
        return s, self._read(s, target_state, None)[MODEL]
      except DamagedCheckpoint as e:
        problems.append(f"step {s}: {e}")
    raise UserError(f"no usable checkpoint in {self.directory}" + (": " + "; ".join(problems) if problems else ""))

  def restore_latest(self, target_state, data_iterator, fresh_optimizer=None):
    """(step, state) of the newest checkpoint that reads back intact, or (0, None) if none exist.

    Damaged steps are reported and skipped; if every step is damaged, that is an error rather
    than a silent restart from scratch. A model-only step gets its optimizer state from
    `fresh_optimizer(model_state)` (and the data iterator starts from the beginning).
    """
    steps = self.all_steps()
    problems = []
    for step in reversed(steps):
      try:
        state = self._read_state(step, target_state, data_iterator, fresh_optimizer)
      except DamagedCheckpoint as e:
        aside = self._move_aside(step)
        message = f"checkpoint step {step} in {self.directory} is damaged: {e}"
        print(f"dcmodel: warning: {message}; moved to {aside}, falling back to an older step", flush=True)
        problems.append(message)
        continue
      self._verified.add(step)
      return step, state
    if problems:
      raise UserError(f"no usable checkpoint in {self.directory}: " + "; ".join(problems))
    return 0, None


def check_disk_space(directory: Path, state_bytes: int, copies: int) -> None:
  """Fail before training when the checkpoints cannot fit (a cheap, honest lower bound)."""
  free = shutil.disk_usage(directory).free
  need = state_bytes * copies
  if free < need:
    raise UserError(f"not enough disk space in {directory}: {free / 2**20:.1f} MiB free, checkpoints need at least "
                    f"{need / 2**20:.1f} MiB ({copies} x {state_bytes / 2**20:.1f} MiB); free space or lower checkpoint.max_to_keep")


def state_bytes(abstract_state) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)))
