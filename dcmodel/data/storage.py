"""The storage stage: `dcmodel ingest` keeps a source as sharded ArrayRecord files plus a
manifest, the way a data center keeps training data; training then reads them through Grain's
ArrayRecordDataSource, each process only the records of its own rows.

Layout of an ingested directory:
  manifest.json                      source, record counts, per-file SHA-256, cleaning report,
                                     normalization statistics fitted on the train split
  train-00000-of-00004.array_record  one record per example (cleaned, not normalized)
  test-00000-of-00001.array_record
A manifest that does not match its files (missing file, other size or checksum, other count)
is an error before training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from dcmodel.config import DataConfig
from dcmodel.data import preprocess, sources
from dcmodel.errors import UserError

MANIFEST = "manifest.json"


def encode(row: dict[str, np.ndarray]) -> bytes:
  """One example as bytes: a JSON header (name, dtype, shape) followed by the raw arrays."""
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


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def ingest(cfg: DataConfig, out_dir: str | Path, shards: int = 4) -> dict:
  """Clean a source, fit normalization on its train split, and write it as ArrayRecord shards."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from dcmodel.data import pipeline   # not at the top: pipeline -> preprocess -> sources -> storage
  out = Path(out_dir)
  if (out / MANIFEST).exists():
    raise UserError(f"{out} already holds an ingested data set ({MANIFEST}); pick another directory")
  source = sources.load(cfg)
  prepared = preprocess.prepare(source)
  out.mkdir(parents=True, exist_ok=True)
  files = {}
  for split, cols in prepared.splits.items():
    n = len(cols["id"])
    count = max(1, min(shards if split == "train" else 1, n))
    bounds = np.linspace(0, n, count + 1).astype(int)
    files[split] = []
    for s in range(count):
      name = f"{split}-{s:05d}-of-{count:05d}.array_record"
      writer = ArrayRecordWriter(str(out / name), "group_size:1")
      for i in range(bounds[s], bounds[s + 1]):
        # a slice, not v[i]: numpy drops trailing NUL bytes from a text (S<L>) element
        writer.write(encode({k: v[i:i + 1].reshape(v.shape[1:]) for k, v in cols.items()}))
      writer.close()
      files[split].append({"file": name, "records": int(bounds[s + 1] - bounds[s]), "sha256": _sha256(out / name),
                           "bytes": (out / name).stat().st_size})
  norm = prepared.normalizer
  manifest = {
      "source": source.name, "feature": source.feature, "num_classes": source.num_classes, "info": source.info,
      "transforms": [pipeline.transform_spec(t) for t in source.transforms],
      "splits": files, "cleaning": {s: dataclasses.asdict(r) for s, r in prepared.reports.items()},
      "normalizer": None if norm is None else {"mean": np.asarray(norm.mean).tolist(), "scale": np.asarray(norm.scale).tolist()},
  }
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
  return manifest


class RecordRows:
  """Rows of one split read by index through Grain's ArrayRecordDataSource."""

  def __init__(self, paths: list[str], count: int):
    import grain
    self.source = grain.sources.ArrayRecordDataSource(paths)
    self.count = count

  def __len__(self):
    return self.count

  def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    rows = [decode(r) for r in self.source.__getitems__([int(i) for i in idx])]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def verify(directory: Path) -> dict:
  path = Path(directory) / MANIFEST
  if not path.exists():
    raise UserError(f"{directory} has no {MANIFEST}; create it with `dcmodel ingest`")
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")
  from array_record.python.array_record_module import ArrayRecordReader
  for split, entries in manifest["splits"].items():
    for e in entries:
      f = Path(directory) / e["file"]
      if not f.exists():
        raise UserError(f"manifest {path} lists {e['file']}, which is missing")
      if f.stat().st_size != e["bytes"] or _sha256(f) != e["sha256"]:
        raise UserError(f"{f} does not match its manifest checksum (expected sha256 {e['sha256'][:12]}...); re-ingest it")
      reader = ArrayRecordReader(str(f))
      if reader.num_records() != e["records"]:
        raise UserError(f"{f} holds {reader.num_records()} records, manifest says {e['records']}")
      reader.close()
  return manifest


@sources.register("arrayrecord")
def arrayrecord(cfg: DataConfig) -> sources.Source:
  """An ingested directory (data.options={'path': DIR}); checked against its manifest first."""
  if "path" not in cfg.options:
    raise UserError("data.source 'arrayrecord' needs data.options={'path': INGESTED_DIR}")
  directory = Path(cfg.options["path"])
  from dcmodel.data import pipeline
  manifest = verify(directory)
  splits = {split: RecordRows([str(directory / e["file"]) for e in entries], sum(e["records"] for e in entries))
            for split, entries in manifest["splits"].items()}
  norm = manifest["normalizer"]
  src = sources.Source(manifest["source"], splits, feature=manifest["feature"], num_classes=manifest["num_classes"],
                       normalize=None, info={**manifest["info"], "ingested": str(directory)},
                       transforms=tuple(pipeline.from_spec(t) for t in manifest.get("transforms", [])))
  src.normalizer = None if norm is None else preprocess.Normalizer(np.asarray(norm["mean"], np.float32),
                                                                  np.asarray(norm["scale"], np.float32))
  return src
