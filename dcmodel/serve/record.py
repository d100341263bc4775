"""Every served request and its answer, appended to a results store (`--results DIR`) that
`dcmodel query` reads: ids, timestamps, the prompt and completion (or the input row and its
outputs), sampling, token counts, latency.

Rows are buffered and appended by a background thread every `flush_s` seconds (or a chunk's
worth sooner), so writing never holds up a request; each append commits its rows with the
store's progress record, as `predict` does: after a crash the committed rows read back whole
and a restarted server appends after them. Rows still in the buffer at a crash are lost (at
most `flush_s` seconds' worth); a graceful stop flushes them.
"""

from __future__ import annotations

import threading
import traceback

import numpy as np

from dcmodel.infer.results import ResultsAppender

CHUNK_ROWS = 1024


def completion_columns(text_bytes: int) -> dict[str, tuple[str, tuple]]:
  text = f"S{text_bytes}"
  return {"id": ("int64", ()), "request_id": ("S40", ()), "choice": ("int32", ()),
          "received_unix_s": ("float64", ()), "finished_unix_s": ("float64", ()),
          "ttft_s": ("float32", ()), "latency_s": ("float32", ()),
          "prompt": (text, ()), "completion": (text, ()),
          "prompt_tokens": ("int32", ()), "completion_tokens": ("int32", ()), "finish_reason": ("S8", ()),
          "max_tokens": ("int32", ()), "temperature": ("float32", ()), "top_k": ("int32", ()), "top_p": ("float32", ()),
          "seed": ("int64", ())}


def predict_columns(schema: dict, outputs: dict[str, tuple[str, tuple]]) -> dict[str, tuple[str, tuple]]:
  inputs = {name: (dtype.str.lstrip("|<>=") if dtype.kind == "S" else dtype.name, tuple(shape)) for name, (dtype, shape) in schema.items()}
  return {"id": ("int64", ()), "request_id": ("S40", ()), "row": ("int32", ()),
          "received_unix_s": ("float64", ()), "finished_unix_s": ("float64", ()), "latency_s": ("float32", ()),
          **inputs, **outputs}


class Recorder:
  def __init__(self, path: str, columns: dict[str, tuple[str, tuple]], meta: dict, flush_s: float = 0.5):
    self.columns = columns
    self.store = ResultsAppender(path, CHUNK_ROWS, columns, meta)
    self.flush_s = flush_s
    self._rows: list[dict] = []
    self._cv = threading.Condition()
    self._closing = False
    self.errors = 0
    self._thread = threading.Thread(target=self._loop, name="dcmodel-recorder", daemon=True)
    self._thread.start()

  @property
  def rows_done(self) -> int:
    return self.store.done

  def add(self, row: dict) -> None:
    """Queue one row (every column given; `id` is assigned when written)."""
    with self._cv:
      self._rows.append(row)
      if len(self._rows) >= CHUNK_ROWS:
        self._cv.notify()

  def close(self) -> None:
    """Write what is buffered, then stop."""
    with self._cv:
      self._closing = True
      self._cv.notify()
    self._thread.join()

  def _loop(self) -> None:
    while True:
      with self._cv:
        if not self._closing:
          self._cv.wait(self.flush_s)
        rows, self._rows = self._rows, []
        closing = self._closing
      if rows:
        self._write(rows)
      if closing:
        with self._cv:
          rest, self._rows = self._rows, []
        if rest:
          self._write(rest)
        return

  def _write(self, rows: list[dict]) -> None:
    try:
      first = self.store.done
      cols = {name: np.asarray([r[name] for r in rows], dtype) if name != "id" else np.arange(first, first + len(rows))
              for name, (dtype, _) in self.columns.items()}
      self.store.append(cols)
    except Exception:   # a full disk must not take the server down; the rows are counted as lost
      self.errors += len(rows)
      traceback.print_exc()
