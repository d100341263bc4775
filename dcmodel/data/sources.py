"""Sources: where examples come from, as in-memory columns split into train and test.

Every source returns columns with an `id` (the row's position in the source) so results can
be joined back to examples, plus the valid value range that cleaning enforces.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

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
  info: dict = dataclasses.field(default_factory=dict)   # e.g. bayes_auc of a planted source
  normalizer: object = None                               # pre-fitted (an ingested data set's manifest)
  transforms: tuple = ()              # Grain maps run on every gathered batch (e.g. feature hashing)


def num_rows(split) -> int:
  """Rows of a split: in-memory columns, or any object with __len__ and take(idx) (storage.RecordRows)."""
  return len(split["id"]) if isinstance(split, dict) else len(split)


def take(split, idx: np.ndarray) -> Columns:
  return {k: v[idx] for k, v in split.items()} if isinstance(split, dict) else split.take(idx)


def model_rows(split, transforms, limit: int | None = None) -> Columns:
  """The first `limit` rows (all by default) after the source's transforms (tokenization,
  hashing): the columns a model reads, for checks and baselines outside the Grain pipeline."""
  n = num_rows(split) if limit is None else min(num_rows(split), limit)
  rows = take(split, np.arange(n))
  for t in transforms:
    rows = t.map(rows)
  return rows


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


def _user_arrays(cfg: DataConfig, x: np.ndarray, y: np.ndarray, where: str) -> Source:
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
  return Source(where, {"train": cols(train), "test": cols(test)}, valid_range=(lo, hi))


def _path_option(cfg: DataConfig) -> Path:
  if "path" not in cfg.options:
    raise UserError(f"data.source '{cfg.source}' needs data.options={{'path': ...}}")
  path = Path(cfg.options["path"])
  if not path.is_file():
    raise UserError(f"data file not found: {path}")
  return path


@register("npz")
def npz(cfg: DataConfig) -> Source:
  """User arrays: an .npz file with 'x' (N, ...) numeric features and 'y' (N,) integer labels."""
  path = _path_option(cfg)
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = {"x", "y"} - set(f.files)
      if missing:
        raise UserError(f"{path}: missing array(s) {sorted(missing)}; expected 'x' and 'y'")
      x, y = f["x"], f["y"]
  except (ValueError, OSError) as e:
    raise UserError(f"{path} is not a readable .npz file of plain arrays: {e}")
  return _user_arrays(cfg, x, y, str(path))


@register("csv")
def csv(cfg: DataConfig) -> Source:
  """User table: UTF-8 CSV with a header; numeric feature columns and an integer 'label' column."""
  path = _path_option(cfg)
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
  return _user_arrays(cfg, np.delete(table, j, axis=1).astype(np.float32), table[:, j].astype(np.int64), str(path))


def check_fits_model(source: Source, prepared, model_cfg) -> None:
  """The data must have the shape the model reads, ids the model's tables hold (an embedding
  lookup clamps an out-of-range id silently) and labels the model can predict. Checked on a
  sample after the source's transforms (tokenization, hashing), as the model will see it."""
  sample = model_rows(prepared.splits["train"], source.transforms, 4096)
  inputs = getattr(model_cfg, "inputs", ("x",))
  missing = [k for k in inputs if k not in sample]
  if missing:
    raise UserError(f"data '{source.name}' has no column {missing[0]!r}, which model '{model_cfg.name}' reads "
                    f"(its batches hold {sorted(sample)})")
  x = sample[inputs[0]]
  expected = getattr(model_cfg, "input_shape", None)
  if expected is not None:
    want = tuple(expected())
    have = tuple(x.shape[1:])
    if int(np.prod(have)) != int(np.prod(want)):
      raise UserError(f"data '{source.name}' has examples of shape {have}, but model '{model_cfg.name}' expects {want}")
  vocab = getattr(model_cfg, "vocab_size", None)
  if vocab is not None and len(x) and (x.min() < 0 or x.max() >= vocab):
    raise UserError(f"data '{source.name}' has token ids {int(x.min())}..{int(x.max())}, but model.vocab_size={vocab}; "
                    f"the vocabulary must hold every id the tokenizer gives")
  tables = getattr(model_cfg, "table_sizes", None)
  if tables is not None:
    cat = sample["cat"]
    if cat.shape[1] != len(tables) or (cat < 0).any() or (cat.max(0) >= np.asarray(tables)).any():
      raise UserError(f"data '{source.name}' has {cat.shape[1]} categorical columns with ids up to "
                      f"{tuple(int(v) for v in cat.max(0))}, but model.table_sizes={tuple(tables)}; "
                      f"each table needs more rows than its largest id")
  if "y" in take(prepared.splits["train"], np.arange(1)) and getattr(model_cfg, "task", None) in ("classification", "binary"):
    n = model_cfg.num_outputs if model_cfg.task == "classification" else 2
    for split, cols in prepared.splits.items():
      y = take(cols, np.arange(min(num_rows(cols), 100_000)))["y"]
      if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= n)):
        raise UserError(f"data '{source.name}' split '{split}' has labels outside 0..{n - 1} (dtype {y.dtype}, "
                        f"range {y.min()}..{y.max()}) for model '{model_cfg.name}' with {n} classes")


from dcmodel.data import clicks, storage, text  # noqa: E402,F401  (register their sources)
