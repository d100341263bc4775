"""Tokenization, a Grain stage: rows of text (UTF-8 bytes) -> token ids.

Text sources keep text: each row is a fixed-width byte string (numpy `S<L>`). The pipeline
tokenizes every gathered batch, the way MaxText and Levanter tokenize inside their input
pipelines, so what is stored (in memory or in ArrayRecord shards) stays text and the tokenizer
is a choice of the pipeline, not of the data.

`ByteTokenizer` is the tokenizer that needs no download: the vocabulary is the 256 byte values of
the UTF-8 encoding. Another tokenizer plugs in with the same four members (`vocab_size`,
`encode`, `decode`, `encode_batch`).
"""

from __future__ import annotations

import grain
import numpy as np


class ByteTokenizer:
  vocab_size = 256

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids) -> bytes:
    return bytes(np.asarray(ids).astype(np.uint8))

  def encode_batch(self, rows: np.ndarray) -> np.ndarray:
    """(N,) fixed-width byte strings -> (N, L) int32. Read through the buffer, not element by
    element: numpy drops trailing NUL bytes from an `S` element, the buffer keeps all L."""
    rows = np.ascontiguousarray(rows)
    if rows.dtype.kind != "S":
      raise TypeError(f"expected rows of bytes (numpy dtype S<L>), got {rows.dtype}")
    return np.frombuffer(rows.tobytes(), np.uint8).reshape(len(rows), rows.dtype.itemsize).astype(np.int32)


def as_rows(tokens: np.ndarray) -> np.ndarray:
  """(N, L) byte values -> (N,) byte strings of width L: how text sources store their rows."""
  tokens = np.ascontiguousarray(tokens, np.uint8)
  return tokens.view(f"S{tokens.shape[1]}").reshape(len(tokens))


TOKENIZERS = {"bytes": ByteTokenizer}


class Tokenize(grain.transforms.Map):
  """The text column of a batch -> token ids in 'x'. With `next_token`, rows of L+1 tokens give
  inputs 'x' (the first L) and targets 'y' (the last L), as a language model trains on."""

  def __init__(self, feature: str = "text", tokenizer: str = "bytes", next_token: bool = False):
    if tokenizer not in TOKENIZERS:
      raise ValueError(f"unknown tokenizer {tokenizer!r}; known: {', '.join(TOKENIZERS)}")
    self.args = {"feature": feature, "tokenizer": tokenizer, "next_token": next_token}
    self.feature, self.tokenizer, self.next_token = feature, TOKENIZERS[tokenizer](), next_token

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode_batch(batch[self.feature])
    out = {k: v for k, v in batch.items() if k != self.feature}
    if self.next_token:
      out["x"], out["y"] = ids[:, :-1], ids[:, 1:]
    else:
      out["x"] = ids
    return out
