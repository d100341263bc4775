"""Where a run's records go: one writer, several sinks of the same records (process 0 only).

A record is a flat dict with `step` and `split` (`train`, `eval`, `data` for the cleaning report,
`run` for a run's start). Sinks:
- `JsonlSink`: WORKDIR/metrics.jsonl, one JSON object per line, append-only. A crash can leave
  a torn last line: the writer starts a new line after it, and `read` skips it.
- `TensorBoardSink`: event files in WORKDIR (tensorboardX), every number of a record as the
  scalar `<split>/<key>` at its step; `tensorboard --logdir runs/` shows every run.

A run that resumes at step S (after a crash that lost steps past its last checkpoint) supersedes
what the crashed run logged past S: `read` drops those records, and TensorBoard purges them
(tensorboardX's purge_step), so both sinks tell the same story.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import jax

NOT_SCALARS = ("step", "split", "time")


def _import_tensorboardx():
  """tensorboardX imports torch when it is installed (only to accept torch tensors, which dcmodel
  never passes): 3.3 s of start-up against 0.35 s without. Keep torch out of that import (a None
  entry in sys.modules makes `import torch` an ImportError), unless the process already has it."""
  if "torch" in sys.modules:
    import tensorboardX
    return tensorboardX
  sys.modules["torch"] = None
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


def _ends_torn(path: Path) -> bool:
  with open(path, "rb") as f:
    if f.seek(0, 2) == 0:
      return False
    f.seek(-1, 2)
    return f.read(1) != b"\n"


class JsonlSink:
  def __init__(self, path: Path):
    self.path = Path(path)
    self._file = open(self.path, "a")
    if _ends_torn(self.path):     # a crash mid-line: the next record starts on a line of its own
      self._file.write("\n")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class TensorBoardSink:
  def __init__(self, logdir: Path, resumed_at: int | None = None):
    tbx = _import_tensorboardx()
    # flush_secs: event files reach the disk within 10 s (TensorBoard polls); close() flushes the rest.
    # purge_step hides the events at or past it that earlier files hold: the steps past the checkpoint.
    self._writer = tbx.SummaryWriter(str(logdir), purge_step=None if resumed_at is None else resumed_at + 1,
                                     flush_secs=10)

  def write(self, record: dict) -> None:
    if record.get("split") == "run":
      return
    for key, value in record.items():
      if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        self._writer.add_scalar(f"{record['split']}/{key}", value, record["step"], walltime=record.get("time"))

  def close(self) -> None:
    try:
      self._writer.close()
    except OSError as e:      # e.g. the disk filled up: metrics.jsonl has the records; say so once
      print(f"dcmodel: warning: TensorBoard events could not be flushed to {self._writer.logdir}: {e.strerror}", flush=True)
      _abandon(getattr(getattr(self._writer, "file_writer", None), "event_writer", None))


def _abandon(events) -> None:
  """Finish what tensorboardX's EventFileWriter.close() left undone when its flush failed (its
  writer thread and queue), and mark it closed, so it does not retry (and fail again) at exit."""
  if events is None:
    return
  for finish in (lambda: events._worker.stop(), lambda: events._ev_writer.close(), lambda: events._event_queue.close()):
    with contextlib.suppress(Exception):
      finish()
  events._closed = True


class MetricsWriter:
  """The records of a run, to every sink, stamped with the time; a no-op off process 0."""

  def __init__(self, sinks: list):
    self.active = jax.process_index() == 0
    self.sinks = sinks if self.active else []

  @classmethod
  def for_workdir(cls, workdir: Path, resumed_at: int | None = None, tensorboard: bool = True) -> "MetricsWriter":
    if jax.process_index() != 0:
      return cls([])
    sinks = [JsonlSink(Path(workdir) / "metrics.jsonl")]
    if tensorboard:
      sinks.append(TensorBoardSink(Path(workdir), resumed_at))
    return cls(sinks)

  def write(self, record: dict) -> None:
    record = {**record, "time": round(time.time(), 3)}
    for sink in self.sinks:
      sink.write(record)

  def close(self) -> None:
    for sink in self.sinks:
      sink.close()
    self.sinks = []


def read(path: Path, superseded: bool = False) -> list[dict]:
  """The records of metrics.jsonl, skipping a torn (unparseable) line. Without `superseded`,
  records a resumed run redid are dropped: a `run` record at step S drops the earlier train and
  eval records past S (logged by a run that died before its next checkpoint)."""
  records = []
  for line in Path(path).read_text(errors="replace").splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if not superseded and record.get("split") == "run":
      records = [r for r in records if r.get("split") not in ("train", "eval") or r["step"] <= record["step"]]
    records.append(record)
  return records
