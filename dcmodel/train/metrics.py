"""Where a run's records go: one writer, several sinks of the same records (process 0 only).

A record is a flat dict with `step` and `split` (`train`, `eval`, `data` for the cleaning report,
`run` for a run's start). Sinks:
- `JsonlSink`: WORKDIR/metrics.jsonl, one JSON object per line, append-only. A crash can leave
  a torn last line: the writer starts a new line after it, and `read` skips it.
- `TensorBoardSink`: event files in WORKDIR (tensorboardX), every number of a record as the
  scalar `<split>/<key>` at its step; `tensorboard --logdir runs/` shows every run.

A run that resumes at step S (after a crash that lost steps past its last checkpoint) supersedes
what the crashed run logged past S: `read` drops those records, and TensorBoard purges them
(the SessionLog START event tensorboardX's purge_step writes), so both sinks tell the same story.
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
  """Event files through tensorboardX's EventsWriter, one event per record holding its scalars,
  written in this thread: ~0.12 ms a record, where SummaryWriter.add_scalar (a queue to a writer
  thread per scalar) took ~1 ms for 16. Flushed at most every FLUSH_S seconds (TensorBoard polls)
  and at close; a write that fails (a full disk) is said once, and metrics.jsonl goes on."""

  FLUSH_S = 10.0

  def __init__(self, logdir: Path, resumed_at: int | None = None):
    tbx = _import_tensorboardx()
    self._proto = tbx.proto
    self._events = tbx.event_file_writer.EventsWriter(str(Path(logdir) / "events"))
    self._flushed = time.monotonic()
    if resumed_at is not None:   # hides the events past the checkpoint that earlier files hold (what purge_step does)
      pb = self._proto.event_pb2
      self._events.write_event(pb.Event(step=resumed_at + 1, session_log=pb.SessionLog(status=pb.SessionLog.START)))

  def write(self, record: dict) -> None:
    if self._events is None or record.get("split") == "run":
      return
    value = self._proto.summary_pb2.Summary.Value
    values = [value(tag=f"{record['split']}/{key}", simple_value=v) for key, v in record.items()
              if key not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    event = self._proto.event_pb2.Event(wall_time=record.get("time", time.time()), step=record["step"],
                                        summary=self._proto.summary_pb2.Summary(value=values))
    try:
      self._events.write_event(event)
      if time.monotonic() - self._flushed > self.FLUSH_S:
        self._events.flush()
        self._flushed = time.monotonic()
    except OSError as e:
      self._give_up(e)

  def _give_up(self, e: OSError) -> None:
    print(f"dcmodel: warning: TensorBoard events could not be written ({e.strerror}); metrics.jsonl goes on", flush=True)
    with contextlib.suppress(OSError):
      self._events.close()
    self._events = None

  def close(self) -> None:
    if self._events is not None:
      try:
        self._events.close()
      except OSError as e:
        self._give_up(e)
      self._events = None


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
