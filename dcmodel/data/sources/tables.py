"""A user's tables: an .npz of arrays or a UTF-8 CSV with a `label` column (`data.path`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from dcmodel.config import DataConfig
from dcmodel.data.registry import Table, register
from dcmodel.errors import UserError


def split_rows(n: int, labels: np.ndarray | None, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A deterministic (stratified when labelled) train/test split of row indices."""
  return train_test_split(np.arange(n), test_size=test_fraction, random_state=seed, stratify=labels)


def user_file(cfg: DataConfig) -> Path:
  if not cfg.path:
    raise UserError(f"data.source '{cfg.source}' needs data.path=FILE")
  path = Path(cfg.path)
  if not path.is_file():
    raise UserError(f"data file not found: {path}")
  return path


def user_arrays(cfg: DataConfig, x: np.ndarray, y: np.ndarray, where: str) -> Table:
  """Validate user-supplied arrays and split them like any other source."""
  if x.dtype.kind not in "fiub":
    raise UserError(f"{where}: feature array 'x' has dtype {x.dtype}, expected numbers (float or int)")
  if y.dtype.kind not in "iub":
    raise UserError(f"{where}: label array 'y' has dtype {y.dtype}, expected integers")
  if len(x) == 0:
    raise UserError(f"{where}: no examples (x has 0 rows)")
  if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
    raise UserError(f"{where}: expected x of shape (N, ...) and y of shape (N,), got x {x.shape} and y {y.shape}")
  lo, hi = cfg.options.get("valid_range", (-np.inf, np.inf))
  train, test = split_rows(len(x), None, cfg.test_fraction, cfg.split_seed)
  ids = np.arange(len(x), dtype=np.int64)
  cols = lambda rows: {"id": ids[rows], "x": x[rows].astype(np.float32), "y": y[rows].astype(np.int32)}
  return Table(where, {"train": cols(train), "test": cols(test)}, valid_range=(lo, hi))


@register("npz")
def npz(cfg: DataConfig) -> Table:
  """User arrays: an .npz file with 'x' (N, ...) numeric features and 'y' (N,) integer labels."""
  path = user_file(cfg)
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = {"x", "y"} - set(f.files)
      if missing:
        raise UserError(f"{path}: missing array(s) {sorted(missing)}; expected 'x' and 'y'")
      x, y = f["x"], f["y"]
  except (ValueError, OSError) as e:
    raise UserError(f"{path} is not a readable .npz file of plain arrays: {e}")
  return user_arrays(cfg, x, y, str(path))


@register("csv")
def csv(cfg: DataConfig) -> Table:
  """User table: UTF-8 CSV with a header; numeric feature columns and an integer 'label' column."""
  path = user_file(cfg)
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not valid UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save it as UTF-8")
  lines = [l for l in text.splitlines() if l.strip()]
  if len(lines) < 2:
    raise UserError(f"{path}: no data rows (expected a header line and at least one row)")
  header = [h.strip() for h in lines[0].split(",")]
  if "label" not in header:
    raise UserError(f"{path}: no 'label' column in the header {header}")
  try:
    table = np.array([[float(v) for v in l.split(",")] for l in lines[1:]], dtype=np.float64)
  except ValueError as e:
    raise UserError(f"{path}: non-numeric value ({e})")
  if table.ndim != 2 or table.shape[1] != len(header):
    raise UserError(f"{path}: rows do not all have {len(header)} columns")
  j = header.index("label")
  return user_arrays(cfg, np.delete(table, j, axis=1).astype(np.float32), table[:, j].astype(np.int64), str(path))
