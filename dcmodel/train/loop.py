"""The training loop: config in; progress, metrics, checkpoints and a final evaluation out.

Mesh -> input -> state (restored or fresh, already sharded) -> steps -> eval -> checkpoints.
The step is dispatched asynchronously; the host only waits when metrics are due.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from dcmodel import config as config_lib
from dcmodel.checkpoint import Checkpointer, check_disk_space, state_bytes
from dcmodel.config import Config
from dcmodel.data import pipeline, preprocess, sources
from dcmodel.errors import UserError
from dcmodel.mesh import batch_divisor, batch_sharding, build_mesh, check_batch, rules_for
from dcmodel.train import state as state_lib
from dcmodel.train import tasks
from dcmodel.train.metrics import MetricsWriter
from dcmodel.train.step import make_eval_step, make_train_step, on_leaves, stacked, zero_totals

Hook = Callable[[int, dict], None]   # called with (step, host batch) before each train step

# Dispatched calls the host may run ahead of the devices. Unbounded, the queue of small steps
# grows deep between metric reads, and XLA:CPU aborts the process when a collective's
# rendezvous waits 40 s for a device thread busy with later work (seen with
# train.log_every=1000 on digits_mlp over 8 simulated devices). A few calls ahead keeps the
# devices fed; more buys nothing.
MAX_IN_FLIGHT = 4


def bound_in_flight(outputs: list) -> None:
  """Call after appending a dispatched call's output: waits for the one MAX_IN_FLIGHT back."""
  if len(outputs) > MAX_IN_FLIGHT:
    jax.block_until_ready(outputs[-MAX_IN_FLIGHT - 1])


@dataclasses.dataclass
class RunResult:
  final_eval: dict
  steps_run: int
  start_step: int
  wall_s: float
  graphdef: object
  state: object
  mesh: object


def _check_workdir(cfg: Config, workdir: Path) -> None:
  """A workdir belongs to one model: refuse to resume another model's checkpoints."""
  old = config_lib.saved_model(workdir)
  if old is not None and (workdir / "checkpoints").exists() and not config_lib.same_model(cfg, old):
    raise UserError(f"workdir {workdir} holds checkpoints of a different model ({old.get('name')}: {old}); "
                    f"use another --workdir or delete it")


def evaluate(eval_step, state, prepared, feature: str, global_batch_size: int, sharding, task: str,
             split: str = "test") -> dict:
  ds = pipeline.eval_batches(prepared.splits[split], feature, prepared.normalizer, global_batch_size, prepared.transforms)
  outs = []
  for i in range(len(ds)):
    outs.append(eval_step(state, pipeline.step_inputs(ds[i], sharding)))
    bound_in_flight(outs)
  outs = jax.device_get(outs)
  total = {k: float(np.sum([o[k] for o in outs])) for k in outs[0] if k not in tasks.PER_EXAMPLE}
  metrics = tasks.summarize(total, task)
  if "scores" in outs[0]:  # per-example outputs are replicated, so every process sees the whole split
    scores, labels, weights = (np.concatenate([np.ravel(o[k]) for o in outs]) for k in tasks.PER_EXAMPLE)
    metrics["auc"] = tasks.auc(scores[weights > 0], labels[weights > 0])
  return metrics


def _prepare_workdir(cfg: Config, workdir: Path, need_bytes: int) -> None:
  """Everything that can be known about the workdir before training: creatable, writable,
  not another model's, and room for the checkpoints."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".dcmodel-write-probe-{jax.process_index()}"
    probe.write_bytes(b"x" * 4096)
    probe.unlink()
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable: {e.strerror}; pick another --workdir")
  _check_workdir(cfg, workdir)
  if cfg.checkpoint.enabled:
    check_disk_space(workdir, need_bytes, cfg.checkpoint.max_to_keep + 1)


def train(cfg: Config, workdir: str | Path, hooks: tuple[Hook, ...] = (), devices=None) -> RunResult:
  """Train `cfg` in `workdir`, resuming from its newest good checkpoint.

  All user-fixable problems (config, mesh, data, workdir) raise UserError before anything in
  the workdir is written.
  """
  t0 = time.perf_counter()
  workdir = Path(workdir)
  config_lib.validate(cfg)

  # --- Mesh: every check that needs the devices, before anything compiles.
  mesh = build_mesh(cfg.mesh, devices)
  rules = rules_for(cfg.mesh, mesh)
  check_batch(cfg.data.global_batch_size, mesh)
  check_batch(cfg.data.eval_batch_size, mesh, "data.eval_batch_size")
  if cfg.data.global_batch_size % (cfg.train.grad_accum_steps * batch_divisor(mesh)):
    raise UserError(f"data.global_batch_size={cfg.data.global_batch_size} must be a multiple of train.grad_accum_steps "
                    f"x batch axes = {cfg.train.grad_accum_steps} x {batch_divisor(mesh)}")
  task_fn = tasks.get(cfg.model.task)
  if cfg.train.nonfinite not in ("skip", "stop"):
    raise UserError(f"train.nonfinite must be 'skip' or 'stop', got '{cfg.train.nonfinite}'")

  # --- Input: source -> clean -> normalize (fitted on train) -> Grain -> devices.
  source = sources.load(cfg.data)
  prepared = preprocess.prepare(source)
  sources.check_fits_model(source, prepared, cfg.model)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, target, shardings = state_lib.abstract_state(cfg, mesh)

  # --- Workdir: checked, then written (config, metrics); nothing is written before this.
  _prepare_workdir(cfg, workdir, state_bytes(target))
  if jax.process_index() == 0:
    config_lib.save(cfg, workdir)
  writer = MetricsWriter(workdir / "metrics.jsonl")
  writer.write({"step": 0, "split": "data", **source.info, **{f"{s}_{k}": v for s, r in prepared.reports.items()
                                                              for k, v in dataclasses.asdict(r).items()}})
  data_sharding = batch_sharding(mesh)
  per_call = cfg.train.steps_per_dispatch
  it = pipeline.train_iterator(prepared.splits["train"], source.feature, prepared.normalizer,
                               cfg.data.global_batch_size, cfg.data.shuffle_seed,
                               cfg.data.read_threads, cfg.data.prefetch, prepared.transforms, per_call)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    # --- State: the newest good checkpoint restored into its shardings, or created sharded.
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint) if cfg.checkpoint.enabled else None
    start, state = ckpt.restore_latest(target, it) if ckpt else (0, None)
    if state is None:
      state = state_lib.init_state(cfg, shardings)
    pipeline.seek(it, start, per_call)
    inputs = getattr(cfg.model, "inputs", ("x",))
    device_keys = (*inputs, "y", "mask")
    dropout_seed = cfg.train.seed if getattr(cfg.model, "dropout", 0.0) else None
    train_step = make_train_step(graphdef, task_fn, shardings, data_sharding, inputs, cfg.train.grad_accum_steps, per_call,
                                 dropout_seed, cfg.train.dispatch_unroll)
    call_sharding = stacked(data_sharding) if per_call > 1 else data_sharding
    eval_step = make_eval_step(graphdef, task_fn, shardings, data_sharding, inputs)
    # The loop carries the state as its list of arrays (see on_leaves); the State is rebuilt
    # only to evaluate, save and return.
    treedef, leaves = jax.tree.structure(state), jax.tree.leaves(state)
    leaf_step = on_leaves(train_step, shardings, call_sharding)
    current = lambda: jax.tree.unflatten(treedef, leaves)

    def run_eval(step):
      metrics = evaluate(eval_step, current(), prepared, source.feature, cfg.data.eval_batch_size, data_sharding,
                         cfg.model.task)
      writer.write({"step": step, "split": "eval", **metrics})
      return metrics

    # --- Loop.
    completed = False
    try:
      steps = cfg.train.steps
      bar = tqdm(total=steps, initial=start, disable=not cfg.train.progress or jax.process_index() != 0,
                 desc=cfg.name, unit="step", dynamic_ncols=True)
      pending, totals, zeros, window_start, skipped = [], None, None, time.perf_counter(), 0
      for step in range(start, steps, per_call):
        host = next(it)   # per_call > 1: per_call batches stacked on a leading axis
        for i in range(per_call if hooks else 0):
          batch = host if per_call == 1 else {k: v[i] for k, v in host.items()}
          for hook in hooks:
            hook(step + i, batch)
        inputs = pipeline.step_inputs(host, call_sharding, device_keys)
        if totals is None:   # a new metrics window
          zeros = zeros or zero_totals(train_step, current(), inputs)
          totals = zeros()
        leaves, totals = leaf_step(leaves, totals, inputs)
        pending.append(totals)
        bound_in_flight(pending)
        done = step + per_call
        bar.update(per_call)
        if done % cfg.train.log_every == 0 or done == steps:
          total = {k: float(v) for k, v in jax.device_get(totals).items()}  # the one host sync
          elapsed = time.perf_counter() - window_start
          skipped += int(total.pop("nonfinite"))
          metrics = tasks.summarize(total, cfg.model.task)
          writer.write({"step": done, "split": "train", **metrics, "skipped_nonfinite_steps": skipped,
                        "steps_per_s": len(pending) * per_call / elapsed, "examples_per_s": metrics["examples"] / elapsed})
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('accuracy', float('nan')):.3f}")
          if skipped and cfg.train.nonfinite == "stop":
            bar.close()
            if ckpt:
              ckpt.wait()
            last = ckpt.latest_step() if ckpt else None
            raise UserError(f"non-finite loss or gradients in {skipped} step(s) between steps {done - len(pending) * per_call + 1} "
                            f"and {done}; their updates were not applied and training stopped (train.nonfinite=stop); "
                            f"last checkpoint: {last}")
          pending, totals, window_start = [], None, time.perf_counter()
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != steps:
          run_eval(done)
        if ckpt and (done % cfg.checkpoint.every_steps == 0 or done == steps):
          ckpt.save(done, current(), it)
      bar.close()

      final = run_eval(steps) if cfg.train.final_eval else {}
      completed = True
    finally:
      if ckpt and completed:
        ckpt.close()
      elif ckpt:  # stopping early: finish the saves already started; the first error is the one to report
        try:
          ckpt.close()
        except UserError:
          pass
  writer.close()
  wall = time.perf_counter() - t0
  return RunResult(final, steps - start, start, wall, graphdef, current(), mesh)
