"""Policies the loop runs on their own schedules: every N steps, every T seconds, at the end.

A hook is an object with a `schedule`, `__call__(run)`, and optionally `start(run)` (once,
before the first step) and `close(run)` (once, however the loop ends); the loop asks each
hook's schedule after every jitted call and calls the hook when it is due, at most once per
step. A new policy is a new hook: the loop does not change.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dcmodel.config import profile_steps
from dcmodel.errors import UserError
from dcmodel.perf import trace as trace_lib
from dcmodel.train import preemption, tasks
from dcmodel.train import state as state_lib
from dcmodel.train.evaluate import evaluate


@dataclasses.dataclass
class Schedule:
  every_steps: int = 0          # 0: not by steps
  every_seconds: float = 0.0    # 0: not by time
  at_end: bool = False          # also after the last step (or when the run stops early)
  # Several processes must act at the same step, but their clocks differ: process 0's clock
  # decides, read and broadcast (a collective) only at steps that are multiples of this.
  agree_every: int = 1
  _last_step: int = -1
  _last_time: float = dataclasses.field(default_factory=time.monotonic)

  def due(self, step: int, final: bool) -> bool:
    if step == self._last_step:
      return False
    now = time.monotonic()
    hit = (final and self.at_end) or (self.every_steps and step % self.every_steps == 0)
    if not hit and self.every_seconds:
      hit = self._time_is_up(step, now)
    if hit:
      self._last_step, self._last_time = step, now
    return bool(hit)

  def _time_is_up(self, step: int, now: float) -> bool:
    up = now - self._last_time >= self.every_seconds
    if jax.process_count() == 1:
      return up
    if step % self.agree_every:
      return False
    return bool(multihost_utils.broadcast_one_to_all(np.int32(up)))


class Hook:
  schedule = Schedule()

  def start(self, run) -> None:
    """Called once before the first step."""

  def __call__(self, run) -> None:
    raise NotImplementedError

  def close(self, run) -> None:
    """Called once when the loop ends, however it ends."""


class Preemption(Hook):
  """Stop on SIGTERM or SIGINT after the call in flight (train/preemption.py): the loop then
  runs the end-of-run hooks (metrics window, checkpoint at this step); several processes stop
  at the same step."""

  def __init__(self):
    self.schedule = Schedule(every_steps=1)
    self.watch = preemption.Watch()
    self.calls = 0

  def start(self, run) -> None:
    self._check(run)

  def __call__(self, run) -> None:
    self.calls += 1
    self._check(run)

  def _check(self, run) -> None:
    signum = self.watch.stop_signal(self.calls)
    if signum is not None:
      run.stop(preemption.name(signum))
      run.stop_signal = signum


class Progress(Hook):
  """The progress bar (process 0), with the latest loss and accuracy."""

  def __init__(self, run, enabled: bool):
    self.schedule = Schedule(every_steps=1)
    self.bar = tqdm(total=run.cfg.train.steps, initial=run.start_step, desc=run.cfg.name, unit="step",
                    dynamic_ncols=True, disable=not enabled or jax.process_index() != 0)
    self._shown = run.start_step

  def __call__(self, run) -> None:
    self.bar.update(run.step - self._shown)
    self._shown = run.step
    if run.last_metrics is not None:
      m, run.last_metrics = run.last_metrics, None
      self.bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m.get('accuracy', float('nan')):.3f}")

  def close(self, run) -> None:
    self.bar.close()


class Metrics(Hook):
  """The one host sync of a metrics window: the step's device-side sums fetched, summarized and
  written to the run's sinks (metrics.jsonl, TensorBoard): the task's metrics, the gradient norm
  (unless train.grad_norm=false) and learning rate (means over the window's applied steps), step
  time, examples/s, tokens/s and MFU (the model's FLOPs per step from perf.accounting against the
  devices' peak), and the count of non-finite steps: skipped ones (`skipped_nonfinite_steps`), or
  with train.nonfinite=apply applied ones (`nonfinite_steps`, the window's sums then hold their
  NaN/Inf). Also enforces train.nonfinite=stop."""

  def __init__(self, every_steps: int):
    self.schedule = Schedule(every_steps=every_steps, at_end=True)
    self.nonfinite = 0    # steps with a NaN/Inf loss or gradient so far (skipped, or applied)

  def __call__(self, run) -> None:
    window = run.take_window()
    if window is None:
      return
    total, elapsed, steps = window
    nonfinite = int(total.pop("nonfinite"))
    self.nonfinite += nonfinite
    apply = run.cfg.train.nonfinite == "apply"
    applied = steps if apply else max(steps - nonfinite, 1)
    means = {k: total.pop(k) / applied for k in ("grad_norm", "learning_rate") if k in total}
    metrics = tasks.summarize(total, run.cfg.model.task)
    tokens = metrics["tokens"] if "tokens" in metrics else run.throughput.tokens_per_step * steps
    counted = "nonfinite_steps" if apply else "skipped_nonfinite_steps"
    record = {"step": run.step, "split": "train", **metrics, **means, counted: self.nonfinite,
              "step_time_s": elapsed / steps, "steps_per_s": steps / elapsed, "examples_per_s": metrics["examples"] / elapsed,
              "tokens_per_s": tokens / elapsed, "mfu": run.throughput.flops_per_step * steps / elapsed / run.throughput.peak_flops}
    run.write(record)
    run.last_metrics = metrics
    if self.nonfinite and run.cfg.train.nonfinite == "stop":
      last = None
      if run.checkpointer:
        run.checkpointer.wait()
        last = run.checkpointer.latest_step()
      raise UserError(f"non-finite loss or gradients in {self.nonfinite} step(s) between steps {run.step - steps + 1} "
                      f"and {run.step}; their updates were not applied and training stopped (train.nonfinite=stop); "
                      f"last checkpoint: {last}")


class Eval(Hook):
  """Evaluation on the test split every `eval_every` steps and (train.final_eval) at the end."""

  def __init__(self, every_steps: int, at_end: bool):
    self.schedule = Schedule(every_steps=every_steps, at_end=at_end)

  def __call__(self, run) -> None:
    if run.step >= run.cfg.train.steps and not self.schedule.at_end:
      return                       # the last step: only the final evaluation, if asked for
    if run.stopping and run.step < run.cfg.train.steps and not run.evaluate_on_stop:
      return                       # stopped early (preempted): no evaluation of a partial run
    metrics = evaluate(run.eval_step, run.state(), run.dataset, "test", run.cfg.data.eval_batch_size,
                       run.placed.data_sharding, run.cfg.model.task)
    run.write({"step": run.step, "split": "eval", **metrics})
    run.last_eval = metrics


class Checkpoint(Hook):
  """A checkpoint (state + data iterator) every checkpoint.every_steps and/or every_seconds, and
  at the end (a stop on a signal included). Several processes agree on the time-based saves at
  metrics windows (train.log_every)."""

  def __init__(self, every_steps: int, every_seconds: float = 0.0, agree_every: int = 1):
    self.schedule = Schedule(every_steps=every_steps, every_seconds=every_seconds, at_end=True, agree_every=agree_every)

  def __call__(self, run) -> None:
    if run.step > run.start_step:     # a run resumed at its last step has nothing new to save
      try:
        run.checkpointer.save(run.step, run.state(), run.iterator)
      except FloatingPointError as e:   # reachable with train.nonfinite=apply: a NaN/Inf update was applied
        run.checkpointer.wait()
        raise UserError(f"{e} (train.nonfinite={run.cfg.train.nonfinite}); training stopped; "
                        f"last checkpoint: {run.checkpointer.latest_step()}") from e
      run.saved_step = run.step


class Profile(Hook):
  """A jax.profiler trace of the steps after step `first` up to step `last` into WORKDIR/profile/
  (train.profile_steps="A:B"; every process traces its own devices), viewable with xprof or
  TensorBoard's profile plugin. The device work before and inside the span is waited for at its
  edges, so the trace holds exactly those steps. Beside the trace goes the compiled step's HLO
  text (train_step.hlo.txt), which names the ops the trace times (`dcmodel bench --trace`)."""

  def __init__(self, run, first: int, last: int):
    self.schedule = Schedule(every_steps=1, at_end=True)
    self.first, self.last = first, last
    self.directory = Path(run.workdir) / "profile"
    self.active = False
    self.traced: tuple[int, int] | None = None

  def start(self, run) -> None:
    self(run)

  def __call__(self, run) -> None:
    if not self.active and self.traced is None and self.first <= run.step < self.last and not run.stopping:
      jax.block_until_ready(run.leaves)
      jax.profiler.start_trace(str(self.directory))
      self.active, self.began = True, run.step
    elif self.active and (run.step >= self.last or run.stopping or run.step >= run.cfg.train.steps):
      self._finish(run)

  def close(self, run) -> None:
    if self.active:
      self._finish(run)

  def _finish(self, run) -> None:
    jax.block_until_ready(run.leaves)
    jax.profiler.stop_trace()
    self.active, self.traced = False, (self.began, run.step)
    newest = max(self.directory.glob("plugins/profile/*"), key=lambda p: p.stat().st_mtime)
    if run.step > self.began:     # the compiled step, again (same program, same op names), for its HLO text
      inputs = state_lib.abstract_batch(run.cfg, run.call_sharding, run.cfg.train.steps_per_dispatch)
      abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
      compiled = run.train_step.lower(abstract(run.leaves), abstract(run.zero_totals()), inputs).compile()
      (newest / trace_lib.HLO_FILE).write_text(compiled.as_text())
    (newest / trace_lib.INFO_FILE).write_text(json.dumps({"first": self.began, "last": run.step, "steps": run.step - self.began,
                                                          "devices": len(run.placed.local_devices()),
                                                          "process": jax.process_index()}) + "\n")
    if jax.process_index() == 0:
      print(f"[dcmodel] profiled steps {self.began + 1}-{run.step} into {newest} (open with xprof or "
            f"`tensorboard --logdir {self.directory}`; top ops: dcmodel bench --trace {run.workdir})", flush=True)


class TimeBudget(Hook):
  """train.max_seconds: stop once the budget is spent, as if the run had ended there (checkpoint
  and final evaluation), so runs are compared at equal wall-clock time."""

  def __init__(self, seconds: float):
    self.schedule = Schedule(every_steps=1)
    self.seconds, self.started = seconds, time.monotonic()

  def start(self, run) -> None:
    self.started = time.monotonic()     # the budget is the loop's (set-up and restore are not in it)

  def __call__(self, run) -> None:
    if time.monotonic() - self.started >= self.seconds:
      run.stop(f"time budget of {self.seconds:.0f} s spent", evaluate=True)


def standard(run) -> list[Hook]:
  """The hooks every run has, in the order they act on a step: metrics, the preemption check
  (after the metrics' wait for the step, in which a signal most likely lands: several processes
  then agree on a stop at most one call later; and before the hooks a stop changes), evaluation,
  checkpoint, the profiler, then the progress bar (which shows the metrics just taken)."""
  cfg = run.cfg
  hooks = [Metrics(cfg.train.log_every), Preemption()]
  hooks += [TimeBudget(cfg.train.max_seconds)] if cfg.train.max_seconds else []
  hooks += [Eval(cfg.train.eval_every, cfg.train.final_eval)]
  if run.checkpointer is not None:
    hooks.append(Checkpoint(cfg.checkpoint.every_steps, cfg.checkpoint.every_seconds, cfg.train.log_every))
  span = profile_steps(cfg.train)
  if span:
    hooks.append(Profile(run, *span))
  hooks.append(Progress(run, cfg.train.progress))
  return hooks
