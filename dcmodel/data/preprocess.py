"""Preprocessing of the design documents: cleaning (drop bad rows) and normalization.

Both run once over the source, vectorized, before the Grain pipeline: cleaning decides
which rows exist, and normalization statistics are fitted on the train split only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dcmodel.data.sources import Columns, Source
from dcmodel.errors import UserError


@dataclasses.dataclass(frozen=True)
class CleanReport:
  kept: int
  dropped_nonfinite: int
  dropped_out_of_range: int


def clean(cols: Columns, feature: str, valid_range: tuple[float, float]) -> tuple[Columns, CleanReport]:
  """Drop rows whose feature holds NaN/Inf or values outside `valid_range`; count each kind.
  Text (byte-string rows) passes through: its source cleans it per document (UTF-8), and the
  pipeline tokenizes it."""
  if cols[feature].dtype.kind == "S":
    return cols, CleanReport(len(cols[feature]), 0, 0)
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


@dataclasses.dataclass
class Prepared:
  splits: dict[str, Columns]
  normalizer: Normalizer | None
  reports: dict[str, CleanReport]
  num_classes: int | None
  transforms: tuple = ()   # the source's Grain maps, run after gather + normalize


def prepare(source: Source, normalize: bool = True) -> Prepared:
  splits, reports = {}, {}
  for name, cols in source.splits.items():
    if not isinstance(cols, dict):   # stored rows (an ingested data set) were cleaned at ingest time
      splits[name], reports[name] = cols, CleanReport(len(cols), 0, 0)
      continue
    splits[name], reports[name] = clean(cols, source.feature, source.valid_range)
    if reports[name].kept == 0:
      raise UserError(f"data source '{source.name}' split '{name}' has no valid rows after cleaning "
                      f"({reports[name].dropped_nonfinite} non-finite, {reports[name].dropped_out_of_range} out of range)")
  if source.normalizer is not None:
    normalizer = source.normalizer
  else:
    normalizer = (Normalizer.fit(splits["train"][source.feature], per_feature=source.normalize == "per_feature")
                  if normalize and source.normalize else None)
  return Prepared(splits, normalizer, reports, source.num_classes, source.transforms)
