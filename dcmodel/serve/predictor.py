"""Classifiers and recommenders behind POST /v1/predict: rows of raw features in, the same
`pred` / `score` / `probs` as `dcmodel predict` out.

A row goes the way a row of the data set goes at evaluation: the cleaning check (finite, inside
the source's valid range), the normalizer fitted on train, the source's Grain stages (tokenize,
hash), the model's declared batch check, then `predict`'s own jitted step. Requests are batched
dynamically: a thread takes whatever rows are waiting (up to `max_batch`), pads them to one of
a few batch sizes (so nothing compiles while serving) and answers each request with its rows.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from typing import Callable

import jax
import numpy as np

from dcmodel.data import pipeline
from dcmodel.data.clean import clean_rows
from dcmodel.data.dataset import Dataset
from dcmodel.data.types import InMemory
from dcmodel.errors import UserError
from dcmodel.infer.predict import make_predict_step
from dcmodel.mesh import batch_divisor
from dcmodel.serve.engine import EngineStopped, QueueFull
from dcmodel.train import tasks
from dcmodel.train.state import Placed

OUTPUTS = ("pred", "score", "probs")


class Job:
  """One request's rows, prepared as the model's batch; `outputs` when done (or `error`)."""

  def __init__(self, batch: dict[str, np.ndarray], rows: int, emit: Callable):
    self.batch, self.rows, self.emit = batch, rows, emit
    self.outputs: dict[str, np.ndarray] | None = None
    self.error: str | None = None
    self.t_submit = time.perf_counter()
    self.submitted_unix = time.time()
    self.t_done: float | None = None

  @property
  def latency_s(self) -> float:
    return (self.t_done or time.perf_counter()) - self.t_submit


def batch_sizes(divisor: int, largest: int) -> list[int]:
  out, b = [], divisor
  while b < largest:
    out.append(b)
    b *= 2
  return out + [-(-largest // divisor) * divisor]


class Predictor:
  def __init__(self, placed: Placed, state, dataset: Dataset, queue_rows: int = 4096, max_batch: int = 256, metrics=None):
    cfg = placed.cfg
    if cfg.model.task not in tasks.ROWS:
      raise UserError(f"{cfg.model.name} is a '{cfg.model.task}' model; /v1/predict serves classifiers and recommenders")
    self.placed, self.state, self.dataset, self.metrics = placed, state, dataset, metrics
    self.spec = dataset.spec
    example = dataset.splits["test"].take(np.array([0]))
    # what a request's row holds: the source's raw columns, as the data set stores them
    self.schema = {k: (v.dtype, v.shape[1:]) for k, v in example.items() if k not in ("id", "y")}
    self.label = dataset.spec.fields["y"]
    self.queue_rows, self.max_batch = queue_rows, max_batch
    self.sizes = batch_sizes(batch_divisor(placed.mesh), max_batch)
    with placed.context():
      self._step = make_predict_step(placed.graphdef, cfg.model.task, placed.shardings, placed.data_sharding,
                                     self.spec.inputs)
    self._cv = threading.Condition()
    self._waiting: collections.deque[Job] = collections.deque()
    self._queued_rows = 0
    self._stopping = False
    self._thread: threading.Thread | None = None
    self.busy = 0

  # ---- rows -> the model's batch (the request's thread; errors are the user's)
  def prepare(self, rows: list) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """JSON rows -> (the batch the model takes, as evaluation builds it; the raw columns).
    ValueError names the first thing wrong."""
    if not isinstance(rows, list) or not rows:
      raise ValueError("'rows' must be a non-empty list of objects")
    if len(rows) > self.max_batch:
      raise ValueError(f"at most {self.max_batch} rows per request, got {len(rows)}")
    cols = {name: np.zeros((len(rows), *shape), dtype) for name, (dtype, shape) in self.schema.items()}
    for i, row in enumerate(rows):
      if not isinstance(row, dict):
        raise ValueError(f"rows[{i}] must be an object with {self._fields()}")
      extra = sorted(set(row) - set(self.schema))
      missing = sorted(set(self.schema) - set(row))
      if missing or extra:
        raise ValueError(f"rows[{i}] must hold exactly {self._fields()}" +
                         (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
      for name, (dtype, shape) in self.schema.items():
        cols[name][i] = _value(row[name], dtype, shape, f"rows[{i}].{name}")
    raw = dict(cols)
    cols["id"] = np.arange(len(rows))
    cols["y"] = np.zeros(len(rows), self.label.dtype)
    feature = self.dataset.feature
    if feature is not None:
      _, report = clean_rows(cols, feature, self.dataset.valid_range)
      if report.kept < len(rows):
        bad = [i for i in range(len(rows)) if clean_rows({k: v[i:i + 1] for k, v in cols.items()}, feature,
                                                         self.dataset.valid_range)[1].kept == 0]
        lo, hi = self.dataset.valid_range
        raise ValueError(f"rows {bad[:5]}: '{feature}' holds NaN/Inf or values outside [{lo:g}, {hi:g}], "
                         f"which the model was never trained on")
    batch = pipeline.Gather(InMemory(cols), feature, self.dataset.normalizer).map(np.arange(len(rows)))
    for t in self.dataset.transforms:
      batch = t.map(batch)
    try:
      self.spec.check(batch, "request")
    except UserError as e:
      raise ValueError(str(e)) from None
    return {k: batch[k] for k in self.spec.fields}, raw

  def output_columns(self) -> dict[str, tuple[str, tuple]]:
    """The outputs' dtypes and shapes per row (for the results store), without running."""
    example, _ = self.prepare([{k: _example(d, s) for k, (d, s) in self.schema.items()}])
    size = self.sizes[0]
    with self.placed.context():
      shapes = jax.eval_shape(self._step, self.placed.target, {
          k: jax.ShapeDtypeStruct((size, *v.shape[1:]), v.dtype, sharding=self.placed.data_sharding) for k, v in example.items()})
    return {k: (v.dtype.name, tuple(v.shape[1:])) for k, v in shapes.items() if k in OUTPUTS}

  def _fields(self) -> str:
    return ", ".join(f"'{k}' ({_describe(d, s)})" for k, (d, s) in self.schema.items())

  # ---- the queue (any thread)
  def start(self, before: Callable | None = None) -> None:
    def run():
      if before is not None:
        before()
      self._loop()
    self._thread = threading.Thread(target=run, name="dcmodel-predictor", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> None:
    with self._cv:
      if self._stopping:
        raise EngineStopped("the server is shutting down")
      if self._queued_rows + job.rows > self.queue_rows:
        raise QueueFull(f"the queue is full ({self._queued_rows} rows waiting, {self.queue_rows} at most)")
      self._waiting.append(job)
      self._queued_rows += job.rows
      self._cv.notify()

  def stop(self, timeout: float | None = None) -> None:
    with self._cv:
      self._stopping = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  @property
  def queue_depth(self) -> int:
    return len(self._waiting)

  def warmup(self) -> float:
    t = time.perf_counter()
    example, _ = self.prepare([{k: _example(d, s) for k, (d, s) in self.schema.items()}])
    for size in self.sizes:
      self._run({k: np.repeat(v, size, 0) for k, v in example.items()})
    return time.perf_counter() - t

  # ---- the batching thread
  def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with self.placed.context():
      out = self._step(self.state, pipeline.to_device(batch, self.placed.data_sharding, tuple(self.spec.fields)))
      return {k: np.asarray(v) for k, v in jax.device_get(out).items() if k in OUTPUTS}

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not self._waiting and not self._stopping:
          self._cv.wait()
        if self._stopping and not self._waiting:
          return
        jobs, rows = [], 0
        while self._waiting and rows + self._waiting[0].rows <= self.max_batch:
          job = self._waiting.popleft()
          jobs.append(job)
          rows += job.rows
        self._queued_rows -= rows
        self.busy = rows
      t = time.perf_counter()
      try:
        size = next(s for s in self.sizes if s >= rows)
        batch = {k: np.concatenate([j.batch[k] for j in jobs] + [np.repeat(jobs[0].batch[k][:1], size - rows, 0)])
                 for k in self.spec.fields}
        out = self._run(batch)
        at = 0
        for job in jobs:
          job.outputs = {k: v[at:at + job.rows] for k, v in out.items()}
          at += job.rows
      except Exception as e:
        traceback.print_exc()
        for job in jobs:
          job.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
      if self.metrics:
        self.metrics.step("predict", time.perf_counter() - t, rows, 0)
        self.metrics.rows.inc(rows)
      self.busy = 0
      for job in jobs:
        job.t_done = time.perf_counter()
        job.emit(job)


def _describe(dtype: np.dtype, shape: tuple) -> str:
  kind = "text" if dtype.kind == "S" else "integers" if dtype.kind in "iu" else "numbers"
  return kind + (f" of shape {list(shape)}" if shape else "")


def _example(dtype: np.dtype, shape: tuple):
  return "" if dtype.kind == "S" else np.zeros(shape, dtype).tolist()


def _value(value, dtype: np.dtype, shape: tuple, where: str):
  """One field of one JSON row as the data set stores it; ValueError says what was expected."""
  if dtype.kind == "S":
    if not isinstance(value, str):
      raise ValueError(f"{where} must be text, got {type(value).__name__}")
    return value.encode("utf-8")[: dtype.itemsize]
  try:
    arr = np.asarray(value)
  except ValueError:
    arr = None
  ok_kind = arr is not None and (arr.dtype.kind in "iu" if dtype.kind in "iu" else arr.dtype.kind in "iuf")
  if not ok_kind or arr.shape != tuple(shape):
    raise ValueError(f"{where} must be {_describe(dtype, shape)}, got {_json_kind(value)}")
  if dtype.kind in "iu":
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
      raise ValueError(f"{where} holds integers outside {dtype.name}")
  return arr.astype(dtype)


def _json_kind(value) -> str:
  if isinstance(value, list):
    try:
      return f"a list of shape {list(np.asarray(value).shape)}"
    except ValueError:
      return "a ragged list"
  return type(value).__name__
