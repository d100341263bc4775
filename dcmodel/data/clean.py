"""Preprocessing of the design documents: cleaning (which rows and documents exist) and
normalization (fitted on the train split only).

Tables: rows whose feature holds NaN/Inf or values outside the valid range are dropped and
counted. Documents: exact duplicates (by SHA-256 of the text) and documents outside the length
bounds are dropped and counted; unreadable records are the reader's business (see sources/files).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from dcmodel.data.types import Columns, CleanReport, CorpusReport
from dcmodel.errors import UserError


def clean_rows(cols: Columns, feature: str, valid_range: tuple[float, float]) -> tuple[Columns, CleanReport]:
  """Drop rows whose feature holds NaN/Inf or values outside `valid_range`; count each kind.
  Text rows (byte strings) pass through: their source cleaned them per document."""
  if cols[feature].dtype.kind == "S":
    return cols, CleanReport(len(cols[feature]))
  x = cols[feature].reshape(len(cols[feature]), -1)
  if not np.issubdtype(x.dtype, np.number):
    raise UserError(f"column '{feature}' has dtype {x.dtype}, expected a numeric dtype")
  finite = np.isfinite(x).all(axis=1) if np.issubdtype(x.dtype, np.floating) else np.ones(len(x), bool)
  lo, hi = valid_range
  with np.errstate(invalid="ignore"):
    in_range = ((x >= lo) & (x <= hi)).all(axis=1)
  keep = finite & in_range
  report = CleanReport(int(keep.sum()), int((~finite).sum()), int((finite & ~in_range).sum()))
  return {k: v[keep] for k, v in cols.items()}, report


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """Standardization fitted on train: per feature (tabular), or one scalar (images, where
  per-pixel statistics would erase position-dependent strokes). Constant features map to 0."""
  mean: np.ndarray
  scale: np.ndarray

  @classmethod
  def fit(cls, x: np.ndarray, per_feature: bool = True) -> "Normalizer":
    x = x.astype(np.float64)
    axis = 0 if per_feature else None
    std = np.asarray(x.std(axis=axis))
    return cls(np.asarray(x.mean(axis=axis), np.float32), np.where(std > 0, 1.0 / np.maximum(std, 1e-12), 0.0).astype(np.float32))

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return ((x - self.mean) * self.scale).astype(np.float32)

  def as_json(self) -> dict:
    return {"mean": np.asarray(self.mean).tolist(), "scale": np.asarray(self.scale).tolist()}

  @classmethod
  def from_json(cls, d: dict | None) -> "Normalizer | None":
    return None if d is None else cls(np.asarray(d["mean"], np.float32), np.asarray(d["scale"], np.float32))


def doc_hash(text: bytes) -> bytes:
  """A document's identity: its SHA-256 (16 bytes kept: exact duplicates only)."""
  return hashlib.sha256(text).digest()[:16]


class DocumentFilter:
  """Exact-duplicate removal and length bounds over a stream of documents (UTF-8 bytes), with the
  counts. The set of hashes seen is what it remembers, so a resumed ingest seeds it (`seen`)."""

  def __init__(self, dedup: bool = True, min_bytes: int = 1, max_bytes: int = 0):
    self.dedup, self.min_bytes, self.max_bytes = dedup, min_bytes, max_bytes
    self.seen: set[bytes] = set()

  def keep(self, text: bytes, report: CorpusReport) -> bool:
    """Count the document in `report`; True if it stays."""
    report.read += 1
    if len(text) < self.min_bytes:
      report.too_short += 1
      return False
    if self.max_bytes and len(text) > self.max_bytes:
      report.too_long += 1
      return False
    if self.dedup:
      h = doc_hash(text)
      if h in self.seen:
        report.duplicates += 1
        return False
      self.seen.add(h)
    report.kept += 1
    report.bytes_kept += len(text)
    return True
