"""Policies the loop runs on their own schedules: every N steps, every T seconds, at the end.

A hook is an object with a `schedule` and `__call__(run)` (and optionally `close(run)`); the
loop asks each hook's schedule after every jitted call and calls the hook when it is due, at
most once per step. A new policy is a new hook: the loop does not change.
"""

from __future__ import annotations

import dataclasses
import time

import jax
from tqdm import tqdm

from dcmodel.errors import UserError
from dcmodel.train import tasks
from dcmodel.train.evaluate import evaluate


@dataclasses.dataclass
class Schedule:
  every_steps: int = 0          # 0: not by steps
  every_seconds: float = 0.0    # 0: not by time
  at_end: bool = False          # also after the last step (or when the run stops early)
  _last_step: int = -1
  _last_time: float = dataclasses.field(default_factory=time.monotonic)

  def due(self, step: int, final: bool) -> bool:
    if step == self._last_step:
      return False
    now = time.monotonic()
    hit = ((final and self.at_end) or (self.every_steps and step % self.every_steps == 0)
           or (self.every_seconds and now - self._last_time >= self.every_seconds))
    if hit:
      self._last_step, self._last_time = step, now
    return bool(hit)


class Hook:
  schedule = Schedule()

  def __call__(self, run) -> None:
    raise NotImplementedError

  def close(self, run) -> None:
    """Called once when the loop ends, however it ends."""


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
  written (metrics.jsonl and any other sinks of the run). Also enforces train.nonfinite=stop."""

  def __init__(self, every_steps: int):
    self.schedule = Schedule(every_steps=every_steps, at_end=True)
    self.skipped = 0

  def __call__(self, run) -> None:
    window = run.take_window()
    if window is None:
      return
    total, elapsed, steps = window
    self.skipped += int(total.pop("nonfinite"))
    metrics = tasks.summarize(total, run.cfg.model.task)
    record = {"step": run.step, "split": "train", **metrics, "skipped_nonfinite_steps": self.skipped,
              "steps_per_s": steps / elapsed, "examples_per_s": metrics["examples"] / elapsed}
    if "tokens" in metrics:
      record["tokens_per_s"] = metrics["tokens"] / elapsed
    run.write(record)
    run.last_metrics = metrics
    if self.skipped and run.cfg.train.nonfinite == "stop":
      last = None
      if run.checkpointer:
        run.checkpointer.wait()
        last = run.checkpointer.latest_step()
      raise UserError(f"non-finite loss or gradients in {self.skipped} step(s) between steps {run.step - steps + 1} "
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
  """A checkpoint (state + data iterator) every checkpoint.every_steps and at the end."""

  def __init__(self, every_steps: int):
    self.schedule = Schedule(every_steps=every_steps, at_end=True)

  def __call__(self, run) -> None:
    if run.step > run.start_step:     # a run resumed at its last step has nothing new to save
      run.checkpointer.save(run.step, run.state(), run.iterator)


class TimeBudget(Hook):
  """train.max_seconds: stop once the budget is spent, as if the run had ended there (checkpoint
  and final evaluation), so runs are compared at equal wall-clock time."""

  def __init__(self, seconds: float):
    self.schedule = Schedule(every_steps=1)
    self.seconds, self.start = seconds, time.monotonic()

  def __call__(self, run) -> None:
    if time.monotonic() - self.start >= self.seconds:
      run.stop(f"time budget of {self.seconds:.0f} s spent", evaluate=True)


def standard(run) -> list[Hook]:
  """The hooks every run has, in the order they act on a step: metrics, evaluation, checkpoint,
  then the progress bar (which shows the metrics just taken)."""
  cfg = run.cfg
  hooks = [TimeBudget(cfg.train.max_seconds)] if cfg.train.max_seconds else []
  hooks += [Metrics(cfg.train.log_every), Eval(cfg.train.eval_every, cfg.train.final_eval)]
  if run.checkpointer is not None:
    hooks.append(Checkpoint(cfg.checkpoint.every_steps))
  hooks.append(Progress(run, cfg.train.progress))
  return hooks
