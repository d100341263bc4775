"""Sources: where examples come from, as in-memory columns split into train and test.

Every source returns columns with an `id` (the row's position in the source) so results can
be joined back to examples, plus the valid value range that cleaning enforces.
"""

from __future__ import annotations

import dataclasses
import difflib

import numpy as np

from dcmodel.config import DataConfig
from dcmodel.errors import UserError

Columns = dict[str, np.ndarray]


@dataclasses.dataclass
class Source:
  name: str
  splits: dict[str, Columns]          # 'train', 'test' -> columns of equal length
  feature: str = "x"                  # the column cleaning and normalization act on
  valid_range: tuple[float, float] = (-np.inf, np.inf)
  num_classes: int | None = None
  normalize: str | None = "per_feature"   # per_feature | global | None


_SOURCES = {}


def register(name):
  def wrap(fn):
    _SOURCES[name] = fn
    return fn
  return wrap


def load(cfg: DataConfig) -> Source:
  if cfg.source not in _SOURCES:
    close = difflib.get_close_matches(cfg.source, sorted(_SOURCES), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown data.source '{cfg.source}'; {hint}known sources: {', '.join(sorted(_SOURCES))}")
  return _SOURCES[cfg.source](cfg)


def split_rows(n: int, labels: np.ndarray | None, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A deterministic (stratified when labelled) train/test split of row indices."""
  from sklearn.model_selection import train_test_split
  return train_test_split(np.arange(n), test_size=test_fraction, random_state=seed, stratify=labels)


@register("digits")
def digits(cfg: DataConfig) -> Source:
  """scikit-learn's handwritten digits: 1,797 real 8x8 images, pixel values 0..16, 10 classes."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = d.images.astype(np.float32)
  y = d.target.astype(np.int32)
  planted = cfg.options.get("corrupt_rows", 0)  # tests plant bad rows to exercise cleaning
  if planted:
    x = x.copy()
    rng = np.random.default_rng(cfg.split_seed)
    bad = rng.choice(len(x), size=planted, replace=False)
    for i, r in enumerate(bad):
      x[r, 0, 0] = (np.nan, np.inf, 99.0)[i % 3]
  train, test = split_rows(len(x), y, cfg.test_fraction, cfg.split_seed)
  ids = np.arange(len(x), dtype=np.int64)
  cols = lambda rows: {"id": ids[rows], "x": x[rows], "y": y[rows]}
  return Source("digits", {"train": cols(train), "test": cols(test)}, valid_range=(0.0, 16.0), num_classes=10,
                normalize="global")
