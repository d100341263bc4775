"""Baselines the zoo must beat, fitted on exactly the training data the models see."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from dcmodel.config import Config
from dcmodel.data import documents, sources
from dcmodel.data.dataset import Dataset
from dcmodel.data.registry import Corpus
from dcmodel.errors import UserError


def byte_histograms(x: np.ndarray) -> np.ndarray:
  """(N, L) bytes -> (N, 256) normalized byte counts."""
  counts = np.zeros((len(x), 256), np.float32)
  np.add.at(counts, (np.repeat(np.arange(len(x)), x.shape[1]), x.reshape(-1).astype(np.int64)), 1.0)
  return counts / x.shape[1]


def logistic_regression_accuracy(train_x, train_y, test_x, test_y) -> float:
  """scikit-learn logistic regression on byte histograms (the snippet-classification baseline)."""
  scaler = StandardScaler().fit(byte_histograms(train_x))
  clf = LogisticRegression(max_iter=2000).fit(scaler.transform(byte_histograms(train_x)), train_y)
  return float(clf.score(scaler.transform(byte_histograms(test_x)), test_y))


def ngram_bits_per_byte(train: bytes, test: bytes, order: int = 2, k: float = 0.01) -> float:
  """Held-out bits per byte of an order-`order` byte n-gram model (context of `order` bytes)
  with add-k smoothing: p(b | c) = (count(c, b) + k) / (count(c) + 256 k)."""
  a = np.frombuffer(train, np.uint8).astype(np.int64)
  t = np.frombuffer(test, np.uint8).astype(np.int64)

  def codes(arr):
    idx = np.zeros(len(arr) - order, np.int64)
    for j in range(order + 1):
      idx = idx * 256 + arr[j: len(arr) - order + j]
    return idx

  joint = np.bincount(codes(a), minlength=256 ** (order + 1)).astype(np.float64)
  context = joint.reshape(-1, 256).sum(1)
  test_codes = codes(t)
  p = (joint[test_codes] + k) / (context[test_codes // 256] + 256 * k)
  return float(-np.mean(np.log2(p)))


def corpus_bytes(cfg: Config) -> tuple[bytes, bytes]:
  """(train, held-out) documents of a corpus after cleaning, concatenated: what the n-gram fits
  and is scored on (the language model trains and is evaluated on the same documents)."""
  src = sources.load(cfg.data)
  if not isinstance(src, Corpus):
    raise UserError(f"data.source '{cfg.data.source}' is not a document corpus")
  parts = {"train": [], "test": []}
  for split, doc, kept in documents.classified(src, documents.document_filter(cfg.data), documents.new_reports()):
    if kept:
      parts[split].append(doc.text)
  return b"".join(parts["train"]), b"".join(parts["test"])


def for_experiment(cfg: Config) -> dict:
  """The baseline an experiment's model must beat, fitted on exactly its training data:
  language models -> the order-2 byte n-gram's held-out bits per byte; text classifiers ->
  logistic regression on byte histograms of the tokenized rows, test accuracy; a planted
  source -> the planted model's AUC (the best any model can reach)."""
  spec = cfg.model.batch_spec()
  if spec.lm:
    train, test = corpus_bytes(cfg)
    return {"metric": "bits_per_byte", "baseline": ngram_bits_per_byte(train, test), "by": "add-k order-2 byte n-gram",
            "better": "lower"}
  ds = Dataset.load(cfg.data, spec)
  if "bayes_auc" in ds.info:
    return {"metric": "auc", "baseline": float(ds.info["bayes_auc"]), "by": "the planted model (best achievable)",
            "better": "higher"}
  if ds.feature == "text" and ds.num_classes:
    train, test = ds.rows("train"), ds.rows("test")
    return {"metric": "accuracy", "baseline": logistic_regression_accuracy(train["x"], train["y"], test["x"], test["y"]),
            "by": "logistic regression on byte histograms", "better": "higher"}
  raise UserError(f"no baseline is defined for data.source '{cfg.data.source}' (defined for corpora, stdlib_snippets "
                  f"and planted sources)")
