"""Everything a training run needs before its first step, built once, in this order: config
checks -> state placed on the mesh (abstract) -> the model's FLOPs and memory (abstract) checked
against the machine -> data -> workdir checks -> the workdir's lock -> (only then) files written
-> state restored or created -> the jitted steps. Every user-fixable problem is an error before
the workdir is touched, and every size is checked before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from dcmodel import config as config_lib
from dcmodel import resources
from dcmodel.checkpoint import Checkpointer, check_disk_space, state_bytes
from dcmodel.config import Config
from dcmodel.data import pipeline
from dcmodel.data.dataset import Dataset
from dcmodel.errors import UserError
from dcmodel.mesh import batch_divisor, check_batch
from dcmodel.perf import accounting
from dcmodel.perf import peak as peak_lib
from dcmodel.train import lock as lock_lib
from dcmodel.train import optimizer
from dcmodel.train import state as state_lib
from dcmodel.train import tasks
from dcmodel.train.evaluate import MAX_IN_FLIGHT
from dcmodel.train.metrics import MetricsWriter
from dcmodel.train.step import NONFINITE, make_eval_step, make_train_step, on_leaves, stacked, zero_totals


@dataclasses.dataclass(frozen=True)
class Throughput:
  """What a metrics window's rates are computed from, fixed at set-up (perf.accounting's model
  FLOPs of one step, by abstract tracing; the devices' peak, perf.peak)."""
  flops_per_step: float
  tokens_per_step: int
  peak_flops: float                # every device of the mesh together
  peak_source: str


@dataclasses.dataclass
class Run:
  """A run in progress: what hooks see. The loop carries the state as its list of arrays
  (`leaves`: jit flattens a list in C++, an nnx.State in Python); `state()` rebuilds the State
  for evaluation and saving."""
  cfg: Config
  workdir: Path
  placed: state_lib.Placed
  dataset: Dataset
  iterator: object
  checkpointer: Checkpointer | None
  writer: MetricsWriter
  throughput: Throughput
  lock: lock_lib.RunLock | None
  start_step: int
  leaves: list
  treedef: object
  train_step: object        # (leaves, totals, batch) -> (leaves, totals)
  state_step: object        # the same step on the State: (state, batch) -> (state, sums)
  eval_step: object
  call_sharding: object
  step: int = 0             # steps completed
  stopping: str | None = None   # why the loop stops before train.steps (set by a hook, with stop())
  stop_signal: int | None = None   # the signal it stops on, if any
  saved_step: int | None = None    # the newest checkpoint this run saved
  evaluate_on_stop: bool = False   # whether the final evaluation still runs after such a stop
  totals: object = None     # device-side metric sums of the current window
  window_start: float = 0.0
  window_calls: int = 0
  last_metrics: dict | None = None
  last_eval: dict | None = None
  _zeros: object = None     # () -> zero metric sums, made at the first step

  def state(self):
    return jax.tree.unflatten(self.treedef, self.leaves)

  def stop(self, reason: str, evaluate: bool = False) -> None:
    """End the loop after this step: the at-end hooks (metrics, checkpoint, and with `evaluate`
    the final evaluation) still run."""
    if self.stopping is None:
      self.stopping, self.evaluate_on_stop = reason, evaluate

  def write(self, record: dict) -> None:
    self.writer.write(record)

  def step_once(self, inputs) -> None:
    """Dispatch one jitted call (its steps' metric sums add into the window's totals)."""
    if self.totals is None:
      self._zeros = self._zeros or zero_totals(self.state_step, self.state(), inputs)
      self.totals = self._zeros()
    self.leaves, self.totals = self.train_step(self.leaves, self.totals, inputs)
    self.window_calls += 1

  def zero_totals(self):
    """Zero metric sums, shaped as the step returns them (after the first step)."""
    return self._zeros()

  def take_window(self):
    """(host sums, seconds, steps) of the metrics window since the last call, or None if no step
    ran in it; this fetch is the loop's one host-device sync. Starts a new window."""
    if self.totals is None:
      return None
    total = {k: float(v) for k, v in jax.device_get(self.totals).items()}
    elapsed, steps = time.perf_counter() - self.window_start, self.window_calls * self.cfg.train.steps_per_dispatch
    self.totals, self.window_calls, self.window_start = None, 0, time.perf_counter()
    return total, elapsed, steps


def _check_workdir(cfg: Config, workdir: Path, tokenizer_sha256: str | None) -> None:
  """A workdir belongs to one model and one tokenizer: refuse to resume another's checkpoints."""
  if not (workdir / "checkpoints").exists():
    return
  old = config_lib.saved_model(workdir)
  if old is not None and not config_lib.same_model(cfg, old):
    raise UserError(f"workdir {workdir} holds checkpoints of a different model ({old.get('name')}: {old}); "
                    f"use another --workdir or delete it")
  old_tok = config_lib.saved_tokenizer(workdir)
  if old_tok and tokenizer_sha256 and old_tok != tokenizer_sha256:
    raise UserError(f"workdir {workdir} was trained with another tokenizer (sha256 {old_tok[:12]}...) than "
                    f"data.tokenizer={cfg.data.tokenizer} (sha256 {tokenizer_sha256[:12]}...); its token ids would mean "
                    f"other text: use the tokenizer it was trained with, or another --workdir")


# What a run writes in its workdir; a directory holding anything else is not a run's.
RUN_FILES = ("config.json", "config.json.tmp", "metrics.jsonl", "checkpoints", "checkpoints-damaged", "profile",
             lock_lib.NAME)


def check_own_workdir(workdir: Path) -> None:
  """Never write into a user's file or a directory of other things: a workdir is new, empty, or a run's."""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir} is a file, not a directory; training writes a directory of its own "
                    f"(nothing is overwritten): pick another --workdir")
  if not workdir.is_dir():
    return
  if (workdir / "config.json").is_file():
    saved = config_lib.saved(workdir)      # not JSON: the one-line error naming it
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
      raise UserError(f"--workdir {workdir} holds a config.json that is not a dcmodel run's; pick another --workdir")
    return
  foreign = sorted(p.name for p in workdir.iterdir()
                   if p.name not in RUN_FILES and not p.name.startswith(("events.out.tfevents", ".")))   # dotfiles: .DS_Store, .nfs*
  if foreign:
    raise UserError(f"--workdir {workdir} holds files that are not a dcmodel run's ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}); training writes config.json, metrics.jsonl and "
                    f"checkpoints/ there: use a new or empty directory")


def _prepare_workdir(cfg: Config, workdir: Path, need_bytes: int, tokenizer_sha256: str | None) -> None:
  """Everything that can be known about the workdir before training: ours to write, creatable,
  writable, not another model's, and room for the checkpoints."""
  check_own_workdir(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".dcmodel-write-probe-{os.getpid()}-{jax.process_index()}"
    probe.write_bytes(b"x" * 4096)
    probe.unlink()
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable: {e.strerror}; pick another --workdir")
  _check_workdir(cfg, workdir, tokenizer_sha256)
  if cfg.checkpoint.enabled:
    check_disk_space(workdir, need_bytes, cfg.checkpoint.max_to_keep + 1)


def _lock(workdir: Path) -> lock_lib.RunLock | None:
  """Process 0 holds the workdir's lock for the run; every process takes the same outcome."""
  lock, refused = None, None
  if jax.process_index() == 0:
    lock = lock_lib.RunLock(workdir)
    try:
      lock.acquire()
    except UserError as e:
      refused = e
  if jax.process_count() > 1:
    if bool(multihost_utils.broadcast_one_to_all(np.int32(refused is not None))) and refused is None:
      refused = lock_lib.refusal(workdir, lock_lib.holder(workdir / lock_lib.NAME))
  if refused is not None:
    raise refused
  return lock


def check_run(cfg: Config, placed: state_lib.Placed) -> None:
  """Checks that need the mesh, before any data is read."""
  mesh = placed.mesh
  check_batch(cfg.data.global_batch_size, mesh)
  check_batch(cfg.data.eval_batch_size, mesh, "data.eval_batch_size")
  if cfg.data.global_batch_size % (cfg.train.grad_accum_steps * batch_divisor(mesh)):
    raise UserError(f"data.global_batch_size={cfg.data.global_batch_size} must be a multiple of train.grad_accum_steps "
                    f"x batch axes = {cfg.train.grad_accum_steps} x {batch_divisor(mesh)}")
  tasks.get(cfg.model.task)
  if cfg.train.nonfinite not in NONFINITE:
    raise UserError(f"train.nonfinite must be {', '.join(repr(p) for p in NONFINITE[:-1])} or {NONFINITE[-1]!r}, "
                    f"got '{cfg.train.nonfinite}'")
  if not cfg.train.grad_norm and cfg.train.nonfinite != "apply":
    raise UserError(f"train.grad_norm=false needs train.nonfinite=apply: '{cfg.train.nonfinite}' tests each step's "
                    f"gradient norm for NaN/Inf before applying it")


def batch_bytes(cfg: Config, batch_size: int) -> int:
  """Bytes of `batch_size` examples of the model's declared batch."""
  return int(sum(batch_size * math.prod(f.shape) * np.dtype(f.dtype).itemsize for f in cfg.model.batch_spec().fields.values()))


def check_memory(cfg: Config, placed: state_lib.Placed, acct: accounting.Accounting) -> None:
  """Before anything is allocated: this process's share of the state, its gradients, the saved
  activations (one microbatch, as if split over every device) and the batches in flight
  (Grain's prefetch, the calls in flight, one eval batch) must fit in the memory there is."""
  mesh = placed.mesh
  state, grads = placed.bytes_per_device(), placed.bytes_per_device(params_only=True)
  activations = acct.activation_bytes / cfg.train.grad_accum_steps / mesh.size
  per_call = cfg.train.steps_per_dispatch
  host = (batch_bytes(cfg, cfg.data.global_batch_size) * per_call * (cfg.data.prefetch + MAX_IN_FLIGHT + 1)
          + batch_bytes(cfg, cfg.data.eval_batch_size)) / jax.process_count()
  gib = resources.gib
  resources.check_device_memory(
      state + grads + activations, host, placed.local_devices(),
      f"training {cfg.name} (per device: state {gib(state)}, gradients {gib(grads)}, activations {gib(activations)}; "
      f"batches in flight {gib(host)})",
      "use smaller batches (data.global_batch_size, data.eval_batch_size, data.prefetch, train.steps_per_dispatch), "
      "a smaller model, more gradient accumulation, or shard the state (mesh.fsdp, mesh.model)")


def check_data(cfg: Config, dataset: Dataset) -> None:
  """A global batch draws distinct rows: it cannot be larger than the training split."""
  rows = len(dataset.splits["train"])
  if cfg.data.global_batch_size > rows:
    what = f"rows of model.max_len + 1 = {cfg.model.max_len + 1} tokens" if dataset.spec.lm else "examples"
    raise UserError(f"data.global_batch_size={cfg.data.global_batch_size} is more than the {rows} training {what} of "
                    f"{dataset.name}; use a batch of at most {rows}")


def throughput(cfg: Config, placed: state_lib.Placed, acct: accounting.Accounting) -> Throughput:
  peak = peak_lib.for_devices(placed.local_devices())
  return Throughput(acct.flops_per_step, acct.tokens_per_step, peak.flops_per_device * placed.mesh.size,
                    peak.describe(placed.mesh.size))


def setup(cfg: Config, workdir: str | Path, devices=None) -> Run:
  workdir = Path(workdir)
  config_lib.validate(cfg)
  placed = state_lib.place(cfg, devices)
  check_run(cfg, placed)
  acct = accounting.account(cfg)           # abstract: the model's FLOPs per step and its activations
  check_memory(cfg, placed, acct)
  spec = cfg.model.batch_spec()
  dataset = Dataset.load(cfg.data, spec)
  check_data(cfg, dataset)

  tokenizer_sha256 = dataset.info.get("tokenizer_sha256")
  _prepare_workdir(cfg, workdir, state_bytes(placed.target), tokenizer_sha256)     # nothing is written before this
  lock = _lock(workdir)
  writer = None
  try:
    rates = throughput(cfg, placed, acct)
    if jax.process_index() == 0:
      config_lib.save(cfg, workdir, tokenizer_sha256)
    per_call = cfg.train.steps_per_dispatch
    it = dataset.train_iterator(cfg.data.global_batch_size, cfg.data.shuffle_seed, cfg.data.read_threads,
                                cfg.data.prefetch, per_call)
    with placed.context():
      ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint) if cfg.checkpoint.enabled else None
      start, state = ckpt.restore_latest(placed.target, it, placed.fresh_optimizer) if ckpt else (0, None)
      if state is None:
        state = placed.init()
      pipeline.seek(it, start, per_call)
      data_sharding = placed.data_sharding
      dropout_seed = cfg.train.seed if getattr(cfg.model, "dropout", 0.0) else None
      task_fn = tasks.get(cfg.model.task)
      step = make_train_step(placed.graphdef, task_fn, placed.shardings, data_sharding, spec.inputs,
                             cfg.train.grad_accum_steps, per_call, dropout_seed, cfg.train.dispatch_unroll,
                             optimizer.schedule(cfg.optimizer, cfg.train.steps), guard=cfg.train.nonfinite != "apply",
                             grad_norm=cfg.train.grad_norm)
      call_sharding = stacked(data_sharding) if per_call > 1 else data_sharding
      eval_step = make_eval_step(placed.graphdef, task_fn, placed.shardings, data_sharding, spec.inputs)
      leaf_step = on_leaves(step, placed.shardings, call_sharding,
                            cfg.model.cpu_compiler_options(len(call_sharding.addressable_devices)))
    # A resumed run supersedes what a crashed run logged past its checkpoint (metrics.read, TensorBoard's purge).
    writer = MetricsWriter.for_workdir(workdir, resumed_at=start or None)
    writer.write({"step": 0, "split": "data", **dataset.report()})
    writer.write({"step": start, "split": "run", "event": "resume" if start else "start", "pid": os.getpid(),
                  "host": socket.gethostname(), "processes": jax.process_count(), "devices": placed.mesh.size,
                  "flops_per_step": rates.flops_per_step, "peak_flops": rates.peak_flops, "peak": rates.peak_source})
    if jax.process_index() == 0:
      print(f"[dcmodel] MFU: {rates.flops_per_step:.3g} model FLOPs per step (perf.accounting) against "
            f"{rates.peak_source}", flush=True)
  except BaseException:
    if writer is not None:
      writer.close()
    if lock is not None:
      lock.release()
    raise
  return Run(cfg, workdir, placed, dataset, it, ckpt, writer, rates, lock, start, jax.tree.leaves(state),
             jax.tree.structure(state), leaf_step, step, eval_step, call_sharding, step=start,
             window_start=time.perf_counter())
