"""Tokenizers: UTF-8 text <-> token ids, by the libraries that do it well.

- `bytes`: the 256 byte values of UTF-8, no file, nothing to train.
- a Hugging Face `tokenizer.json` (the `tokenizers` library): what `dcmodel tokenizer train` writes
  (byte-level BPE), and what a Hugging Face model directory carries;
- a SentencePiece `.model` file (the `sentencepiece` library).

Every tokenizer also knows how many UTF-8 bytes each id stands for (`token_bytes`), so held-out
bits per byte (nats / ln 2 / bytes predicted) compare runs with different tokenizers, and a
`sha256` that identifies it: an ingested corpus and a workdir record it and refuse another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece
import tokenizers as hf_tokenizers

from dcmodel.errors import UserError


class ByteTokenizer:
  name = "bytes"
  sha256 = "bytes"
  vocab_size = 256
  eos_id = None

  def __init__(self):
    self.token_bytes = np.ones(256, np.int32)

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> bytes:
    return bytes(np.asarray(ids).astype(np.uint8))

  def encode_rows(self, rows: np.ndarray) -> np.ndarray:
    """(N,) fixed-width byte strings -> (N, L) int32. Read through the buffer, not element by
    element: numpy drops trailing NUL bytes from an `S` element, the buffer keeps all L."""
    rows = np.ascontiguousarray(rows)
    if rows.dtype.kind != "S":
      raise TypeError(f"expected rows of bytes (numpy dtype S<L>), got {rows.dtype}")
    return np.frombuffer(rows.tobytes(), np.uint8).reshape(len(rows), rows.dtype.itemsize).astype(np.int32)


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level BPE writes byte b as a printable character; this maps it back."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  chars, n = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(keep, chars)}


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _piece_bytes(piece: str) -> bytes:
  """A SentencePiece-style piece ('▁the', '<0x0A>') as the bytes it decodes to."""
  m = _BYTE_PIECE.match(piece)
  return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")


class HFTokenizer:
  """A Hugging Face `tokenizer.json`, through the `tokenizers` library."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    raw = self.path.read_bytes()
    try:
      self.tok = hf_tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
      spec = json.loads(raw)
    except Exception as e:   # the Rust library raises plain Exceptions for bad files
      raise UserError(f"tokenizer {path} is not a valid Hugging Face tokenizer.json: {str(e).splitlines()[0][:200]}") from None
    self.name, self.sha256 = self.path.name, hashlib.sha256(raw).hexdigest()
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    alphabet = _byte_level_alphabet()
    self._pieces: list[bytes] = []
    for i in range(self.vocab_size):
      piece = self.tok.id_to_token(i)
      if piece is None or i in special:
        self._pieces.append(b"")
      elif byte_level:
        self._pieces.append(bytes(alphabet.get(c, 0) for c in piece) if all(c in alphabet for c in piece) else piece.encode())
      else:
        self._pieces.append(_piece_bytes(piece))
    self.byte_level = byte_level
    self.token_bytes = np.array([len(p) for p in self._pieces], np.int32)
    eos = [t["id"] for t in spec.get("added_tokens", []) if t.get("special") and t["content"] in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>")]
    self.eos_id = eos[0] if eos else None

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    # the fast variant skips offsets: 1.5x faster and less memory per token, the same ids
    return [np.asarray(e.ids, np.int32) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids) -> bytes:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.byte_level:   # exact bytes, also for a token that ends inside a multi-byte character
      return b"".join(self._pieces[i] for i in ids if 0 <= i < self.vocab_size)
    return self.tok.decode(ids, skip_special_tokens=True).encode("utf-8")


class SentencePieceTokenizer:
  """A SentencePiece `.model` file, through the `sentencepiece` library."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    raw = self.path.read_bytes()
    self.sp = sentencepiece.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(raw)
    except Exception as e:
      raise UserError(f"tokenizer {path} is not a valid SentencePiece model: {str(e).splitlines()[0][:200]}") from None
    self.name, self.sha256 = self.path.name, hashlib.sha256(raw).hexdigest()
    self.vocab_size = self.sp.get_piece_size()
    self.token_bytes = np.array([0 if (self.sp.is_control(i) or self.sp.is_unknown(i)) else
                                 len(_piece_bytes(self.sp.id_to_piece(i))) for i in range(self.vocab_size)], np.int32)
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    return np.asarray(self.sp.encode(text), np.int32)

  def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self.sp.encode([t.decode("utf-8") if isinstance(t, bytes) else t for t in texts])]

  def decode(self, ids) -> bytes:
    return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1)]).encode("utf-8")


@functools.lru_cache(maxsize=8)
def _load_file(path: str, mtime_ns: int):
  return (SentencePieceTokenizer if path.endswith(".model") else HFTokenizer)(path)


def load(spec: str):
  """`bytes`, a tokenizer.json, or a SentencePiece .model file."""
  if spec in ("bytes", ""):
    return ByteTokenizer()
  path = Path(spec)
  if not path.suffix in (".json", ".model"):
    raise UserError(f"data.tokenizer='{spec}' is neither 'bytes' nor a tokenizer file (a Hugging Face tokenizer.json "
                    f"or a SentencePiece .model)")
  if not path.is_file():
    raise UserError(f"tokenizer file not found: {spec} (expected 'bytes', a tokenizer.json or a SentencePiece .model)")
  return _load_file(str(path.resolve()), path.stat().st_mtime_ns)


# ---- tokenizing in worker processes (dcmodel ingest): this module imports no jax, so a spawned
# worker starts light; it encodes with the same tokenizer object the Grain stage uses.
_WORKER = None


def worker_init(spec: str) -> None:
  global _WORKER
  os.environ["RAYON_NUM_THREADS"] = "1"     # one core per worker process: no thread pool inside it
  _WORKER = load(spec)


def worker_encode(texts: list[bytes]) -> list[np.ndarray]:
  return _WORKER.encode_batch(texts)


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path, progress: bool = True) -> HFTokenizer:
  """Train a byte-level BPE (GPT-2's scheme: every byte is in the alphabet, so any text encodes)
  with the `tokenizers` library and save it as a tokenizer.json."""
  alphabet = hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()
  if vocab_size > 2 ** 20:
    raise UserError(f"--vocab-size {vocab_size} is larger than 1,048,576; embedding tables of that size are not what a "
                    f"BPE vocabulary is for")
  if vocab_size < len(alphabet) + 1:
    raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs the {len(alphabet)} byte symbols "
                    f"plus at least one merge")
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=progress)
  tok.train_from_iterator(texts, trainer)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  tok.save(str(tmp))
  tmp.replace(out)
  return HFTokenizer(out)
