"""Metrics as JSON lines (one object per line: step, split, loss, accuracy, ...), process 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax


class MetricsWriter:
  def __init__(self, path: Path):
    self.path = Path(path)
    self.active = jax.process_index() == 0
    self._file = open(self.path, "a") if self.active else None

  def write(self, record: dict) -> None:
    if self._file:
      self._file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
      self._file.flush()

  def close(self) -> None:
    if self._file:
      self._file.close()
      self._file = None


def read(path: Path) -> list[dict]:
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
