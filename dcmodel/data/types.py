"""The data layer's types: columns of rows, the batch a model declares it takes, and the reports
cleaning writes. Everything else in `dcmodel.data` builds on these; nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from dcmodel.errors import UserError

Columns = dict[str, np.ndarray]   # name -> array with one leading row axis, all of equal length


class Rows(Protocol):
  """A split held anywhere (in memory, in ArrayRecord shards, as windows over a token stream):
  its length and its rows by index."""

  def __len__(self) -> int: ...

  def take(self, idx: np.ndarray) -> Columns: ...


class InMemory:
  """Rows held as in-memory columns."""

  def __init__(self, cols: Columns):
    self.cols = cols

  def __len__(self) -> int:
    return len(self.cols["id"])

  def take(self, idx: np.ndarray) -> Columns:
    return {k: v[idx] for k, v in self.cols.items()}


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of an example: its shape (without the batch axis), dtype and, for ids and labels,
  the valid range [low, high) that an embedding table or a classifier can take."""
  shape: tuple[int, ...]
  dtype: str
  low: int | None = None
  high: int | tuple[int, ...] | None = None   # a tuple: one bound per column of the last axis (embedding tables)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """The batch a model trains on, declared by the model (its config's `batch_spec()`), checked by
  the data layer, which never reads model fields. `inputs` are the fields the model's __call__
  takes, by keyword; the others feed the loss and metrics."""
  fields: dict[str, Field]
  inputs: tuple[str, ...]
  lm: bool = False     # next-token targets over packed token windows (data from a document corpus)

  @property
  def seq_len(self) -> int:
    return self.fields["x"].shape[0]

  def check(self, batch: Columns, where: str) -> None:
    """One-line errors naming the field, what the data has and what the model expects."""
    for name, f in self.fields.items():
      if name not in batch:
        raise UserError(f"data '{where}' has no field {name!r}, which the model reads (its batches hold {sorted(batch)})")
      v = np.asarray(batch[name])
      have = tuple(v.shape[1:])
      if int(np.prod(have)) != int(np.prod(f.shape)):
        raise UserError(f"data '{where}' has examples of shape {have} in {name!r}, but the model expects {f.shape}")
      if np.dtype(f.dtype).kind != v.dtype.kind:
        raise UserError(f"data '{where}' field {name!r} has dtype {v.dtype}, but the model expects {f.dtype}")
      check_range(v, f, name, where)


  def random(self, batch: int, seed: int = 0) -> Columns:
    """A batch that satisfies the spec, for timing and shape checks: ids drawn in their range,
    model inputs of floats normal, everything else (masks, weights, segment ids) ones."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, f in self.fields.items():
      shape = (batch, *f.shape)
      if np.dtype(f.dtype).kind in "iu" and f.high is not None:
        out[name] = rng.integers(f.low or 0, np.asarray(f.high), shape).astype(f.dtype)
      elif np.dtype(f.dtype).kind == "f" and name in self.inputs:
        out[name] = rng.normal(size=shape).astype(f.dtype)
      else:
        out[name] = np.ones(shape, f.dtype)
    return out


def check_range(v: np.ndarray, f: Field, name: str, where: str) -> None:
  if not v.size or (f.low is None and f.high is None):
    return
  if isinstance(f.high, tuple):
    top = v.reshape(-1, v.shape[-1]).max(0)
    if (v.min() < (f.low or 0)) or (top >= np.asarray(f.high)).any():
      raise UserError(f"data '{where}' has {v.shape[-1]} columns in {name!r} with ids up to {tuple(int(t) for t in top)}, "
                      f"but the model's tables hold {f.high} rows; each table needs more rows than its largest id")
    return
  lo, hi = int(v.min()), int(v.max())
  if (f.low is not None and lo < f.low) or (f.high is not None and hi >= f.high):
    what = {"x": "ids", "y": "labels"}.get(name, f"values of {name!r}")
    raise UserError(f"data '{where}' has {what} {lo}..{hi} in {name!r}, but the model takes {f.low}..{f.high - 1}")


@dataclasses.dataclass(frozen=True)
class CleanReport:
  """Rows of a table split kept and dropped by cleaning."""
  kept: int
  dropped_nonfinite: int = 0
  dropped_out_of_range: int = 0


@dataclasses.dataclass
class CorpusReport:
  """Documents of a corpus split: read, kept, and dropped by each rule."""
  read: int = 0
  kept: int = 0
  bad_records: int = 0        # unreadable (not UTF-8, malformed JSON, missing field), skipped by request
  duplicates: int = 0         # exact duplicates of an earlier document (by SHA-256)
  too_short: int = 0
  too_long: int = 0
  bytes_kept: int = 0
  tokens: int = 0

  def add(self, other: "CorpusReport") -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
