"""The sources every machine has: scikit-learn's digits, planted click logs and tabular data
(drawn from a known model, so the best achievable AUC is known), and the Python standard
library's own source files (a text corpus, and snippets labelled by package).

Planted clicks: each row has `num_dense` Gaussian features and one categorical id per table
(Zipf-like popularity). The planted click probability is sigmoid(bias + w . dense + sum_t
a_t[c_t] + sum_{s<t} <u_s[c_s], u_t[c_t]>): per-id effects plus pairwise latent interactions, the
structure DLRM is built to learn. `bayes_auc` is the AUC of the true probabilities on the test
split: no model can do better in expectation. With `hash_buckets`, the log holds raw ids (a
distinct random int32 per category, like a real log's user and item ids) and the Grain pipeline
hashes them into that many rows per table.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from dcmodel.config import DataConfig
from dcmodel.data.registry import Corpus, Document, Table, holdout_every, register
from dcmodel.data.sources.tables import split_rows
from dcmodel.data.transforms import HashBuckets, Tokenize
from dcmodel.data.types import CorpusReport
from dcmodel.errors import UserError
from dcmodel.resources import check_host_memory


def option_int(options: dict, key: str, default: int, low: int = 1) -> int:
  """An integer data.options entry, checked: a size must be a whole number >= low."""
  value = options.get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise UserError(f"data.options['{key}'] must be an integer >= {low}, got {value!r}")
  return int(value)


def check_generated(rows: int, bytes_per_row: int, source: str) -> None:
  """A planted source draws all its rows in memory: they must fit before any is drawn."""
  check_host_memory(rows * bytes_per_row, f"data.source={source} with data.options['rows']={rows}",
                    "ask for fewer rows")


@register("digits")
def digits(cfg: DataConfig) -> Table:
  """scikit-learn's handwritten digits: 1,797 real 8x8 images, pixel values 0..16, 10 classes."""
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
  return Table("digits", {"train": cols(train), "test": cols(test)}, valid_range=(0.0, 16.0), num_classes=10,
               normalize="global")

def planted_clicks(rows: int, num_dense: int, table_sizes: tuple[int, ...], latent: int, seed: int):
  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(rows, num_dense)).astype(np.float32)
  cats = np.stack([np.minimum(rng.zipf(1.3, rows) - 1, n - 1) for n in table_sizes], 1).astype(np.int32)
  w = rng.normal(0, 0.5, num_dense)
  a = [rng.normal(0, 0.7, n) for n in table_sizes]
  u = [rng.normal(0, 0.6, (n, latent)) for n in table_sizes]
  logit = -1.0 + dense @ w + sum(a[t][cats[:, t]] for t in range(len(table_sizes)))
  for s in range(len(table_sizes)):
    for t in range(s + 1, len(table_sizes)):
      logit += np.sum(u[s][cats[:, s]] * u[t][cats[:, t]], 1)
  p = 1 / (1 + np.exp(-logit))
  y = (rng.random(rows) < p).astype(np.int32)
  return dense, cats, y, p


@register("clicks")
def clicks(cfg: DataConfig) -> Table:
  o = cfg.options
  sizes = tuple(o.get("table_sizes", (1000, 500, 200, 100)))
  rows, num_dense, latent = option_int(o, "rows", 200_000, 2), option_int(o, "num_dense", 13), option_int(o, "latent", 4)
  if not sizes or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in sizes):
    raise UserError(f"data.options['table_sizes'] must be positive integers, got {sizes}")
  # features, ids, labels and probabilities per row; per category its effect, latent vector and raw id
  check_generated(rows, 8 * (num_dense + 2 * len(sizes) + 4) + 8 * (latent + 2) * sum(sizes) // rows + 1, "clicks")
  dense, cats, y, p = planted_clicks(rows, num_dense, sizes, latent, int(o.get("seed", cfg.split_seed)))
  train, test = split_rows(len(y), None, cfg.test_fraction, cfg.split_seed)
  ids = np.arange(len(y), dtype=np.int64)
  transforms = ()
  if o.get("hash_buckets"):
    rng = np.random.default_rng([int(o.get("seed", cfg.split_seed)), 1])
    raw = [rng.choice(2**31 - 1, n, replace=False).astype(np.int32) for n in sizes]   # category -> raw id
    cats = np.stack([raw[t][cats[:, t]] for t in range(len(sizes))], 1)
    buckets = tuple(int(b) for b in o["hash_buckets"])
    if len(buckets) != len(sizes) or min(buckets) <= 0:
      raise UserError(f"data.options['hash_buckets']={buckets} must give a positive bucket count for each of the {len(sizes)} tables")
    transforms = (HashBuckets("cat", buckets),)
  cols = lambda r: {"id": ids[r], "x": dense[r], "cat": cats[r], "y": y[r]}
  return Table("clicks", {"train": cols(train), "test": cols(test)}, num_classes=2, transforms=transforms,
                info={"bayes_auc": float(roc_auc_score(y[test], p[test]))})


@register("planted_tabular")
def planted_tabular(cfg: DataConfig) -> Table:
  """The documents' recommender / binary-classifier inputs: `num_features` Gaussian features,
  label from a planted two-layer network, so the best AUC is known (`bayes_auc`)."""
  o = cfg.options
  rows, d = option_int(o, "rows", 20_000, 2), option_int(o, "num_features", 100)
  check_generated(rows, 4 * d + 8 * 16 + 32, "planted_tabular")     # features, the planted layer, labels
  rng = np.random.default_rng(int(o.get("seed", cfg.split_seed)))
  x = rng.normal(size=(rows, d)).astype(np.float32)
  w1 = rng.normal(0, 1 / np.sqrt(d), (d, 16))
  w2 = rng.normal(0, 1.0, 16)
  logit = np.tanh(x @ w1) @ w2 * 1.5
  p = 1 / (1 + np.exp(-logit))
  y = (rng.random(rows) < p).astype(np.int32)
  train, test = split_rows(rows, None, cfg.test_fraction, cfg.split_seed)
  ids = np.arange(rows, dtype=np.int64)
  cols = lambda r: {"id": ids[r], "x": x[r], "y": y[r]}
  return Table("planted_tabular", {"train": cols(train), "test": cols(test)}, num_classes=2,
                info={"bayes_auc": float(roc_auc_score(y[test], p[test]))})


# ---------------------------------------------------------------------------- the standard library

def stdlib_files(root: str | None = None) -> list[Path]:
  base = Path(root or sysconfig.get_paths()["stdlib"])
  return sorted(p for p in base.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def utf8_files(files: list[Path]) -> tuple[list[tuple[Path, bytes]], int]:
  """Keep files that are valid UTF-8 (a few stdlib test files are deliberately not); returns
  the kept (path, bytes) and how many were dropped."""
  kept, dropped = [], 0
  for p in files:
    data = p.read_bytes()
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:
      dropped += 1
      continue
    kept.append((p, data))
  return kept, dropped


@register("stdlib_text")
def stdlib_text(cfg: DataConfig) -> Corpus:
  """The .py files of the standard library as a corpus, one document per file in sorted order;
  every k-th held out (k from data.test_fraction: 0.02 -> every 50th). Files that are not UTF-8
  are not documents (counted in `info`)."""
  files, dropped = utf8_files(stdlib_files(cfg.options.get("root")))
  if not files:
    raise UserError("no UTF-8 .py files found under the standard library path")

  def documents(report: CorpusReport):
    for i, (path, data) in enumerate(files):
      yield Document(i, data, {"file": str(path)}, str(path))

  return Corpus("stdlib_text", documents, holdout_every(cfg.test_fraction), info={"files_not_utf8": dropped})


@register("stdlib_snippets")
def stdlib_snippets(cfg: DataConfig) -> Table:
  """256-byte snippets of text labelled by the top-level stdlib package they come from (the 10
  largest), split by file so no file is in both splits; tokenized by the pipeline."""
  length = option_int(cfg.options, "snippet_len", 256)
  per_class = option_int(cfg.options, "max_per_class", 3000)
  classes = option_int(cfg.options, "num_classes", 10)
  check_host_memory(length * per_class * classes, f"data.source=stdlib_snippets with snippet_len={length} x "
                    f"max_per_class={per_class} x num_classes={classes}", "ask for fewer or shorter snippets")
  base = Path(cfg.options.get("root") or sysconfig.get_paths()["stdlib"])
  files, _ = utf8_files(stdlib_files(str(base)))
  by_pkg: dict[str, list[bytes]] = {}
  for p, data in files:
    rel = p.relative_to(base).parts
    if len(rel) > 1:
      by_pkg.setdefault(rel[0], []).append(data)
  sizes = {k: sum(len(d) for d in v) for k, v in by_pkg.items()}
  top = sorted(sizes, key=lambda k: (-sizes[k], k))[:classes]
  rng = np.random.default_rng(cfg.split_seed)
  parts = {"train": [], "test": []}
  for label, pkg in enumerate(sorted(top)):
    chunks = {"train": [], "test": []}
    for i, raw in enumerate(by_pkg[pkg]):
      data = np.frombuffer(raw, np.uint8)
      n = len(data) // length
      split = "test" if i % 5 == 0 else "train"
      chunks[split].extend(data[j * length:(j + 1) * length] for j in range(n))
    for split, cap in (("train", per_class), ("test", max(per_class // 4, 1))):
      rows = chunks[split]
      keep = rng.permutation(len(rows))[:cap]
      parts[split].extend((rows[k], label) for k in keep)
  ids = iter(range(10**9))
  as_text = lambda rows: np.ascontiguousarray(np.stack(rows), np.uint8).view(f"S{length}").reshape(len(rows))
  cols = lambda rows: {"id": np.array([next(ids) for _ in rows], np.int64), "text": as_text([r for r, _ in rows]),
                       "y": np.array([l for _, l in rows], np.int32)}
  return Table("stdlib_snippets", {s: cols(r) for s, r in parts.items()}, feature="text", num_classes=len(top),
               normalize=None, info={"classes": sorted(top)}, transforms=(Tokenize("text", cfg.tokenizer, length),))
