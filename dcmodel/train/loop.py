"""The training loop: set-up (train/setup.py), then steps, with every policy a hook on its own
schedule (train/hooks.py): metrics, evaluation, checkpoints, the progress bar, and whatever a
caller adds. The step is dispatched asynchronously; the host only waits when a hook asks for
values (the metrics window) or the in-flight bound is reached.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from dcmodel.config import Config
from dcmodel.data import pipeline
from dcmodel.errors import UserError
from dcmodel.train import hooks as hooks_lib
from dcmodel.train import preemption
from dcmodel.train.evaluate import bound_in_flight
from dcmodel.train.setup import Run, setup

BatchHook = Callable[[int, dict], None]   # (step, host batch) before each train step: observe or alter it


@dataclasses.dataclass
class RunResult:
  final_eval: dict
  steps_run: int
  start_step: int
  wall_s: float
  graphdef: object
  state: object
  mesh: object
  stopped: str | None = None      # why the run ended before train.steps, if it did
  stop_signal: int | None = None  # a SIGTERM/SIGINT the run stopped on (or received after its last step)
  saved_step: int | None = None   # the newest checkpoint this run saved


def loop(run: Run, hooks: list, batch_hooks: tuple[BatchHook, ...] = ()) -> None:
  """Step from run.step to train.steps (or until a hook sets run.stopping), calling each hook
  when its schedule says; every hook's close() runs however the loop ends."""
  steps, per_call = run.cfg.train.steps, run.cfg.train.steps_per_dispatch
  pending = []
  try:
    for hook in hooks:
      hook.start(run)
    while run.step < steps and not run.stopping:
      host = next(run.iterator)   # per_call > 1: per_call batches stacked on a leading axis
      for i in range(per_call if batch_hooks else 0):
        batch = host if per_call == 1 else {k: v[i] for k, v in host.items()}
        for hook in batch_hooks:
          hook(run.step + i, batch)
      run.step_once(pipeline.step_inputs(host, run.call_sharding, run.dataset.device_keys))
      pending.append(run.totals)
      bound_in_flight(pending, keep=False)
      run.step += per_call
      for hook in hooks:          # a stop one hook asks for is final for the hooks after it
        if hook.schedule.due(run.step, run.step >= steps or bool(run.stopping)):
          hook(run)
    final_hooks = [h for h in hooks if h.schedule.at_end and h.schedule.due(run.step, True)]
    for hook in final_hooks:     # a stop requested by the last hooks still gets its checkpoint
      hook(run)
  finally:
    for hook in hooks:
      hook.close(run)


def train(cfg: Config, workdir: str | Path, batch_hooks: tuple[BatchHook, ...] = (), hooks: tuple = (),
          devices=None) -> RunResult:
  """Train `cfg` in `workdir`, resuming from its newest good checkpoint. All user-fixable problems
  (config, sizes, mesh, data, workdir) raise UserError before anything in the workdir is written.
  SIGTERM and SIGINT stop the run after the call in flight with a checkpoint at that step
  (train/preemption.py): the result says so (`stop_signal`), and a rerun resumes there."""
  t0 = time.perf_counter()
  with preemption.Signals():
    run = setup(cfg, workdir, devices)
    completed = False
    try:
      all_hooks = [*hooks_lib.standard(run), *(h(run) if isinstance(h, type) else h for h in hooks)]
      with run.placed.context():
        loop(run, all_hooks, batch_hooks)
      completed = True
    finally:
      try:
        if run.checkpointer is not None:
          if completed:
            run.checkpointer.close()
          else:   # stopping on an error: finish the saves already started; the first error is the one to report
            try:
              run.checkpointer.close()
            except UserError:
              pass
        run.writer.close()
      finally:
        if run.lock is not None:
          run.lock.release()
    signum = run.stop_signal or preemption.received()
  return RunResult(run.last_eval or {}, run.step - run.start_step, run.start_step, time.perf_counter() - t0,
                   run.placed.graphdef, run.state(), run.placed.mesh, run.stopping, signum, run.saved_step)
