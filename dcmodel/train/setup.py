"""Everything a training run needs before its first step, built once, in this order: config
checks -> state placed on the mesh -> data -> workdir checks -> (only then) files written ->
state restored or created -> the jitted steps. Every user-fixable problem is an error before
the workdir is touched.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax

from dcmodel import config as config_lib
from dcmodel.checkpoint import Checkpointer, check_disk_space, state_bytes
from dcmodel.config import Config
from dcmodel.data import pipeline
from dcmodel.data.dataset import Dataset
from dcmodel.errors import UserError
from dcmodel.mesh import batch_divisor, check_batch
from dcmodel.train import state as state_lib
from dcmodel.train import tasks
from dcmodel.train.metrics import MetricsWriter
from dcmodel.train.step import make_eval_step, make_train_step, on_leaves, stacked, zero_totals


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
  start_step: int
  leaves: list
  treedef: object
  train_step: object        # (leaves, totals, batch) -> (leaves, totals)
  state_step: object        # the same step on the State: (state, batch) -> (state, sums)
  eval_step: object
  call_sharding: object
  step: int = 0             # steps completed
  stopping: str | None = None   # why the loop stops before train.steps (set by a hook, with stop())
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


def _prepare_workdir(cfg: Config, workdir: Path, need_bytes: int, tokenizer_sha256: str | None) -> None:
  """Everything that can be known about the workdir before training: creatable, writable,
  not another model's, and room for the checkpoints."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".dcmodel-write-probe-{jax.process_index()}"
    probe.write_bytes(b"x" * 4096)
    probe.unlink()
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable: {e.strerror}; pick another --workdir")
  _check_workdir(cfg, workdir, tokenizer_sha256)
  if cfg.checkpoint.enabled:
    check_disk_space(workdir, need_bytes, cfg.checkpoint.max_to_keep + 1)


def check_run(cfg: Config, placed: state_lib.Placed) -> None:
  """Checks that need the mesh, before any data is read."""
  mesh = placed.mesh
  check_batch(cfg.data.global_batch_size, mesh)
  check_batch(cfg.data.eval_batch_size, mesh, "data.eval_batch_size")
  if cfg.data.global_batch_size % (cfg.train.grad_accum_steps * batch_divisor(mesh)):
    raise UserError(f"data.global_batch_size={cfg.data.global_batch_size} must be a multiple of train.grad_accum_steps "
                    f"x batch axes = {cfg.train.grad_accum_steps} x {batch_divisor(mesh)}")
  tasks.get(cfg.model.task)
  if cfg.train.nonfinite not in ("skip", "stop"):
    raise UserError(f"train.nonfinite must be 'skip' or 'stop', got '{cfg.train.nonfinite}'")


def setup(cfg: Config, workdir: str | Path, devices=None) -> Run:
  workdir = Path(workdir)
  config_lib.validate(cfg)
  placed = state_lib.place(cfg, devices)
  check_run(cfg, placed)
  spec = cfg.model.batch_spec()
  dataset = Dataset.load(cfg.data, spec)

  tokenizer_sha256 = dataset.info.get("tokenizer_sha256")
  _prepare_workdir(cfg, workdir, state_bytes(placed.target), tokenizer_sha256)     # nothing is written before this
  if jax.process_index() == 0:
    config_lib.save(cfg, workdir, tokenizer_sha256)
  writer = MetricsWriter(workdir / "metrics.jsonl")
  writer.write({"step": 0, "split": "data", **dataset.report()})
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
                           cfg.train.grad_accum_steps, per_call, dropout_seed, cfg.train.dispatch_unroll)
    call_sharding = stacked(data_sharding) if per_call > 1 else data_sharding
    eval_step = make_eval_step(placed.graphdef, task_fn, placed.shardings, data_sharding, spec.inputs)
    leaf_step = on_leaves(step, placed.shardings, call_sharding)
  return Run(cfg, workdir, placed, dataset, it, ckpt, writer, start, jax.tree.leaves(state), jax.tree.structure(state),
             leaf_step, step, eval_step, call_sharding, step=start, window_start=time.perf_counter())
