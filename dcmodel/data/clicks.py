"""A synthetic click log drawn from a planted model, so the best achievable AUC is known.

Each row has `num_dense` Gaussian features and one categorical id per table (Zipf-like
popularity). The planted click probability is sigmoid(bias + w . dense + sum_t a_t[c_t] +
sum_{s<t} <u_s[c_s], u_t[c_t]>): per-id effects plus pairwise latent interactions, the
structure DLRM is built to learn. `bayes_auc` is the AUC of the true probabilities on the test
split: no model can do better in expectation. With `hash_buckets`, the log holds raw ids (a
distinct random int32 per category, like a real log's user and item ids) and the Grain pipeline
hashes them into that many rows per table.
"""

from __future__ import annotations

import numpy as np

from dcmodel.config import DataConfig
from dcmodel.data.sources import Source, register, split_rows
from dcmodel.errors import UserError


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
def clicks(cfg: DataConfig) -> Source:
  o = cfg.options
  sizes = tuple(o.get("table_sizes", (1000, 500, 200, 100)))
  dense, cats, y, p = planted_clicks(int(o.get("rows", 200_000)), int(o.get("num_dense", 13)), sizes,
                                     int(o.get("latent", 4)), int(o.get("seed", cfg.split_seed)))
  train, test = split_rows(len(y), None, cfg.test_fraction, cfg.split_seed)
  ids = np.arange(len(y), dtype=np.int64)
  transforms = ()
  if o.get("hash_buckets"):
    from dcmodel.data.pipeline import HashBuckets
    rng = np.random.default_rng([int(o.get("seed", cfg.split_seed)), 1])
    raw = [rng.choice(2**31 - 1, n, replace=False).astype(np.int32) for n in sizes]   # category -> raw id
    cats = np.stack([raw[t][cats[:, t]] for t in range(len(sizes))], 1)
    buckets = tuple(int(b) for b in o["hash_buckets"])
    if len(buckets) != len(sizes) or min(buckets) <= 0:
      raise UserError(f"data.options['hash_buckets']={buckets} must give a positive bucket count for each of the {len(sizes)} tables")
    transforms = (HashBuckets("cat", buckets),)
  cols = lambda r: {"id": ids[r], "x": dense[r], "cat": cats[r], "y": y[r]}
  from sklearn.metrics import roc_auc_score
  return Source("clicks", {"train": cols(train), "test": cols(test)}, num_classes=2, transforms=transforms,
                info={"bayes_auc": float(roc_auc_score(y[test], p[test]))})


@register("planted_tabular")
def planted_tabular(cfg: DataConfig) -> Source:
  """The documents' recommender / binary-classifier inputs: `num_features` Gaussian features,
  label from a planted two-layer network, so the best AUC is known (`bayes_auc`)."""
  o = cfg.options
  rows, d = int(o.get("rows", 20_000)), int(o.get("num_features", 100))
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
  from sklearn.metrics import roc_auc_score
  return Source("planted_tabular", {"train": cols(train), "test": cols(test)}, num_classes=2,
                info={"bayes_auc": float(roc_auc_score(y[test], p[test]))})
