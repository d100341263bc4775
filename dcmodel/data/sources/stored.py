"""An ingested directory (`data.source=arrayrecord`, `data.path=DIR`): what `dcmodel ingest`
wrote, checked against its manifest before anything is read.

Two kinds (the manifest's `kind`):
- `rows`: a table, one record per example (cleaned, not normalized; the manifest holds the
  normalization fitted on train and the Grain stages to run);
- `tokens`: a corpus, one record per document (its token ids, source position, hash and
  metadata), with a sidecar per shard holding every document's length and hash, so rows of packed
  tokens are read by random access without scanning the records.

Layout:
  manifest.json                          kind, source, counts, per-file SHA-256, cleaning report,
                                         tokenizer (tokens) or normalization (rows)
  train-00000.array_record (+ .docs.npz)  shards, in order
  test-00000.array_record (+ .docs.npz)
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from pathlib import Path

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from dcmodel.config import DataConfig
from dcmodel.data import transforms
from dcmodel.data.clean import Normalizer
from dcmodel.data.registry import Table, Tokens, register
from dcmodel.data.types import CorpusReport
from dcmodel.errors import UserError

MANIFEST = "manifest.json"


def encode(row: dict[str, np.ndarray]) -> bytes:
  """One record as bytes: a JSON header (name, dtype, shape) followed by the raw arrays."""
  header = [(k, str(np.asarray(v).dtype), list(np.shape(v))) for k, v in row.items()]
  head = json.dumps(header).encode()
  return len(head).to_bytes(4, "little") + head + b"".join(np.ascontiguousarray(v).tobytes() for v in row.values())


def decode(record: bytes) -> dict[str, np.ndarray]:
  n = int.from_bytes(record[:4], "little")
  header = json.loads(record[4:4 + n])
  out, offset = {}, 4 + n
  for key, dtype, shape in header:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    out[key] = np.frombuffer(record, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    offset += size
  return out


def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def read_manifest(directory: Path) -> dict:
  path = Path(directory) / MANIFEST
  if not path.exists():
    raise UserError(f"{directory} has no {MANIFEST}; create it with `dcmodel ingest`")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")


def verify(directory: Path) -> dict:
  """The manifest, after checking every file it lists: present, same size and checksum, same
  record count. A mismatch is an error before training."""
  directory = Path(directory)
  manifest = read_manifest(directory)
  if not manifest.get("complete", True):
    raise UserError(f"{directory} holds an unfinished ingest; run the same `dcmodel ingest` command again to finish it")
  for split, entries in manifest["splits"].items():
    for e in entries:
      for name, digest, size in ((e["file"], e["sha256"], e["bytes"]), *([(e["docs"], e["docs_sha256"], None)] if "docs" in e else [])):
        f = directory / name
        if not f.exists():
          raise UserError(f"manifest {directory / MANIFEST} lists {name}, which is missing")
        if (size is not None and f.stat().st_size != size) or sha256(f) != digest:
          raise UserError(f"{f} does not match its manifest checksum (expected sha256 {digest[:12]}...); re-ingest it")
      reader = ArrayRecordReader(str(directory / e["file"]))
      count = reader.num_records()
      reader.close()
      if count != e["records"]:
        raise UserError(f"{directory / e['file']} holds {count} records, manifest says {e['records']}")
  return manifest


class RecordRows:
  """Rows of one table split read by index through Grain's ArrayRecordDataSource."""

  def __init__(self, paths: list[str], count: int):
    self.source = grain.sources.ArrayRecordDataSource(paths) if paths else None
    self.count = count

  def __len__(self):
    return self.count

  def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    rows = [decode(r) for r in self.source.__getitems__([int(i) for i in idx])]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class StoredTokens:
  """A corpus split's token stream over ingested shards: document d is record d; its offset in
  the stream comes from the sidecars' lengths. Recently read documents are cached, since
  consecutive rows of packed tokens mostly fall in the same document."""

  def __init__(self, directory: Path, entries: list[dict]):
    self.source = grain.sources.ArrayRecordDataSource([str(directory / e["file"]) for e in entries]) if entries else None
    lengths = [np.load(directory / e["docs"])["lengths"] for e in entries]
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    self.doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()   # Grain may read with several threads

  def __len__(self) -> int:
    return int(self.doc_starts[-1])

  def _docs(self, ids: list[int]) -> dict[int, np.ndarray]:
    with self._lock:
      got = {d: self._cache[d] for d in ids if d in self._cache}
      missing = [d for d in ids if d not in got]
      for d, rec in zip(missing, self.source.__getitems__(missing) if missing else []):
        got[d] = self._cache[d] = decode(rec)["tokens"].astype(np.int32)
        if len(self._cache) > 256:
          self._cache.popitem(last=False)
      return got

  def gather(self, positions: np.ndarray) -> np.ndarray:
    flat = positions.reshape(-1)
    doc = np.searchsorted(self.doc_starts, flat, side="right") - 1
    docs = self._docs(sorted(set(doc.tolist())))
    out = np.empty(len(flat), np.int32)
    for d, tokens in docs.items():
      sel = doc == d
      out[sel] = tokens[flat[sel] - self.doc_starts[d]]
    return out.reshape(positions.shape)


@register("arrayrecord")
def arrayrecord(cfg: DataConfig) -> Table | Tokens:
  if not cfg.path:
    raise UserError("data.source 'arrayrecord' needs data.path=INGESTED_DIR (written by `dcmodel ingest`)")
  directory = Path(cfg.path)
  manifest = verify(directory)
  info = {**manifest.get("info", {}), "ingested": str(directory)}
  if manifest.get("kind") == "tokens":
    streams = {split: StoredTokens(directory, entries) for split, entries in manifest["splits"].items()}
    reports = {s: CorpusReport(**r) for s, r in manifest["cleaning"].items()}
    return Tokens(manifest["source"], streams, manifest["tokenizer"]["sha256"], reports, info)
  splits = {split: RecordRows([str(directory / e["file"]) for e in entries], sum(e["records"] for e in entries))
            for split, entries in manifest["splits"].items()}
  return Table(manifest["source"], splits, feature=manifest["feature"], num_classes=manifest["num_classes"],
               normalize=None, info=info, normalizer=Normalizer.from_json(manifest["normalizer"]),
               transforms=tuple(transforms.from_spec(t) for t in manifest.get("transforms", [])))
