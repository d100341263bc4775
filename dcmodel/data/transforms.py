"""Grain stages: tokenize, pack, hash. Each is a `grain.transforms.Map` that the pipeline runs on
a gathered batch (or, for documents, on a chunk of documents), so what is stored stays raw and
these are choices of the pipeline. An ingested data set's manifest names its stages
(`spec`/`from_spec`) so the records read back give the same batches.
"""

from __future__ import annotations

import grain
import numpy as np
from sklearn.utils import murmurhash3_32

from dcmodel.data import tokenizers
from dcmodel.data.types import Columns


class Tokenize(grain.transforms.Map):
  """The text column of a batch (fixed-width byte strings) -> token ids in 'x', `length` per row
  (truncated, or padded with id 0). The byte tokenizer reads the rows' buffer as they are."""

  def __init__(self, feature: str = "text", tokenizer: str = "bytes", length: int | None = None):
    self.args = {"feature": feature, "tokenizer": tokenizer, "length": length}
    self.feature, self.spec, self.length = feature, tokenizer, length
    self._tok = None

  @property
  def tokenizer(self):
    if self._tok is None:   # loaded where the stage runs (a worker process unpickles the spec only)
      self._tok = tokenizers.load(self.spec)
    return self._tok

  def __getstate__(self):
    return {**self.__dict__, "_tok": None}

  def map(self, batch: Columns) -> Columns:
    rows = batch[self.feature]
    out = {k: v for k, v in batch.items() if k != self.feature}
    if isinstance(self.tokenizer, tokenizers.ByteTokenizer) and (self.length in (None, rows.dtype.itemsize)):
      out["x"] = self.tokenizer.encode_rows(rows)
      return out
    length = self.length or rows.dtype.itemsize
    ids = np.zeros((len(rows), length), np.int32)
    for i, t in enumerate(self.tokenizer.encode_batch([bytes(r) for r in rows])):
      ids[i, :min(len(t), length)] = t[:length]
    out["x"] = ids
    return out


class TokenizeDocuments(grain.transforms.Map):
  """A chunk of documents (UTF-8 bytes) -> their token ids, one int32 array each."""

  def __init__(self, tokenizer: str):
    self.spec, self._tok = tokenizer, None

  def __getstate__(self):
    return {"spec": self.spec, "_tok": None}

  def map(self, docs: list[bytes]) -> list[np.ndarray]:
    if self._tok is None:
      self._tok = tokenizers.load(self.spec)
    return self._tok.encode_batch(list(docs))


class HashBuckets(grain.transforms.Map):
  """Feature hashing: raw categorical ids (any int32 values: user ids, item ids) -> a bucket in
  each table, murmurhash3 (scikit-learn's) seeded per column, so a table of n rows serves ids
  from an unbounded space; different ids may share a bucket (collisions)."""

  def __init__(self, feature: str, buckets: tuple[int, ...], seed: int = 0):
    self.args = {"feature": feature, "buckets": list(buckets), "seed": seed}
    self.feature, self.buckets, self.seed = feature, tuple(buckets), seed

  def map(self, batch: Columns) -> Columns:
    raw = np.ascontiguousarray(batch[self.feature], np.int32)
    cols = [murmurhash3_32(np.ascontiguousarray(raw[:, t]), seed=self.seed + t, positive=True) % n
            for t, n in enumerate(self.buckets)]
    return {**batch, self.feature: np.stack(cols, 1).astype(np.int32)}


STORED = {t.__name__: t for t in (HashBuckets, Tokenize)}   # stages an ingested manifest can name


def spec(t) -> dict:
  """A stage as JSON (for an ingested data set's manifest): its class and arguments."""
  return {"type": type(t).__name__, "args": t.args}


def from_spec(s: dict):
  return STORED[s["type"]](**s["args"])


class TokenStream:
  """A corpus split as one stream of token ids with the offsets where documents start
  (`doc_starts`, ending with the stream's length). In memory here; ArrayRecord shards of
  one record per document in sources/stored.py."""

  def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray):
    self.tokens, self.doc_starts = tokens, np.asarray(doc_starts, np.int64)

  def __len__(self) -> int:
    return int(self.doc_starts[-1])

  def gather(self, positions: np.ndarray) -> np.ndarray:
    """Token ids at the given (in-range) stream positions."""
    return self.tokens[positions].astype(np.int32)

  @classmethod
  def concat(cls, docs: list[np.ndarray]) -> "TokenStream":
    lengths = np.array([len(d) for d in docs], np.int64)
    tokens = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
    return cls(tokens, np.concatenate([[0], np.cumsum(lengths)]))


class PackedWindows:
  """Packing, concatenate-and-split: the documents' tokens are one stream, row i is tokens
  [i L, i L + L] (L + 1 tokens: L inputs and L next-token targets), and each row carries
  `segment_ids` (1, 2, ... per document piece in the row; 0 pads), `positions` (counting from
  each piece's start, so positions restart at every document) and `weights` (1 where the target
  is in the input's document: the model never learns to predict across a boundary).

  Why concatenate-and-split rather than first-fit: no token is padding, and row i is a pure
  function of i, so rows are random access: shuffling, each process reading only its own rows
  and exact resume stay as they are for tables; a document longer than L simply spans rows.
  With `pad_last`, the last partial row is padded (weights 0), so an evaluation covers every token.
  """

  def __init__(self, stream, seq_len: int, token_bytes: np.ndarray, pad_last: bool = False):
    self.stream, self.seq_len, self.token_bytes = stream, seq_len, np.asarray(token_bytes, np.float32)
    n = len(stream)
    self.rows = max(-(-(n - 1) // seq_len) if pad_last else (n - 1) // seq_len, 0)

  def __len__(self) -> int:
    return self.rows

  def take(self, idx: np.ndarray) -> Columns:
    idx = np.asarray(idx, np.int64)
    L, n, starts = self.seq_len, len(self.stream), np.asarray(idx, np.int64) * self.seq_len
    pos = starts[:, None] + np.arange(L + 1)                                  # (B, L+1) stream positions
    valid = pos < n
    toks = np.where(valid, self.stream.gather(np.minimum(pos, n - 1)), 0).astype(np.int32)
    doc = np.searchsorted(self.stream.doc_starts, np.minimum(pos, n - 1), side="right") - 1
    seg = np.where(valid, doc - doc[:, :1] + 1, 0).astype(np.int32)
    positions = np.where(valid, pos - np.maximum(self.stream.doc_starts[doc], starts[:, None]), 0).astype(np.int32)
    weights = ((seg[:, 1:] == seg[:, :-1]) & valid[:, 1:]).astype(np.float32)
    y = toks[:, 1:]
    return {"id": idx, "x": toks[:, :-1], "y": y, "segment_ids": seg[:, :-1], "positions": positions[:, :-1],
            "weights": weights, "target_bytes": self.token_bytes[y] * weights}
