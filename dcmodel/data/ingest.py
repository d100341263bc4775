"""The storage stage: `dcmodel ingest` keeps a data set as ArrayRecord shards plus a manifest
(read back by sources/stored.py, layout there), the way a data center keeps training data.

- A table: cleaned once, normalization fitted on train, one record per example.
- A corpus: streamed with bounded memory, documents -> cleaning -> split -> tokenization in
  worker processes -> one record per document. Work is committed a chunk at a time (shards,
  their sidecars, then the manifest, atomically), so a killed ingest resumes from the last
  committed chunk when the same command runs again: no document lost or written twice.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from dcmodel.config import DataConfig
from dcmodel.data import documents, sources, tokenizers, transforms
from dcmodel.data.clean import doc_hash
from dcmodel.data.dataset import Dataset
from dcmodel.data.registry import Corpus, Table
from dcmodel.data.sources.stored import MANIFEST, encode, read_manifest, sha256
from dcmodel.data.types import CorpusReport
from dcmodel.errors import UserError
from dcmodel.resources import check_count, check_host_memory, cpu_count

CHUNK_BYTES = 64 * 2 ** 20      # text per committed chunk: what a kill can cost
BATCH_DOCS = 256                # documents per worker task, and at most
BATCH_BYTES = 1 << 20           # this much text: tokenizing holds ~60 bytes per byte of text (the
                                # library's per-token records), so a task's memory stays ~60 MiB
TOKENIZE_BYTES_PER_BYTE = 64    # what one document's tokenization may hold, checked before it is sent


def _write_json(path: Path, payload: dict) -> None:
  """Atomically: a reader sees the old file or the new one, never half of one."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(path)


def _fsync(path: Path) -> None:
  with open(path, "rb") as f:
    os.fsync(f.fileno())


def ingest(cfg: DataConfig, out_dir: str | Path, shards: int = 4, workers: int | None = None,
           chunk_bytes: int = CHUNK_BYTES, progress: bool = True) -> dict:
  """Ingest `cfg`'s source into `out_dir`; a corpus resumes an unfinished ingest there."""
  out = Path(out_dir)
  if out.exists() and not out.is_dir():
    raise UserError(f"--out {out} is a file; ingest writes a directory")
  if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
    raise UserError(f"--out {out} is a non-empty directory without an ingest manifest; pick a new directory "
                    f"(ingest never writes into a directory it did not create)")
  src = sources.load(cfg)
  if isinstance(src, Table):
    return ingest_table(src, cfg, out, shards)
  if not isinstance(src, Corpus):
    raise UserError(f"data.source '{cfg.source}' is already ingested; nothing to do")
  return ingest_corpus(src, cfg, out, workers, chunk_bytes, progress)


# ---------------------------------------------------------------------------- tables

def ingest_table(src: Table, cfg: DataConfig, out: Path, shards: int) -> dict:
  if (out / MANIFEST).exists():
    raise UserError(f"{out} already holds an ingested data set ({MANIFEST}); pick another directory")
  ds = Dataset.from_table(src, cfg, spec=None)
  train_rows = len(ds.splits["train"].cols["id"])
  check_count("--shards", shards, 1, train_rows, f"one file per shard; the training split has {train_rows} rows")
  out.mkdir(parents=True, exist_ok=True)
  files = {}
  for split, rows in ds.splits.items():
    cols = rows.cols
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
      files[split].append({"file": name, "records": int(bounds[s + 1] - bounds[s]), "sha256": sha256(out / name),
                           "bytes": (out / name).stat().st_size})
  manifest = {
      "kind": "rows", "source": ds.name, "feature": ds.feature, "num_classes": ds.num_classes, "info": ds.info,
      "transforms": [transforms.spec(t) for t in ds.transforms], "splits": files,
      "cleaning": {s: dataclasses.asdict(r) for s, r in ds.reports.items()},
      "normalizer": None if ds.normalizer is None else ds.normalizer.as_json()}
  _write_json(out / MANIFEST, manifest)
  return manifest


# ---------------------------------------------------------------------------- corpora

class _Chunk:
  """The shards of one chunk being written: one ArrayRecord file per split (made when the split
  gets its first document), with each document's length, hash and source position."""

  def __init__(self, out: Path, number: int, token_dtype):
    self.out, self.number, self.dtype = out, number, token_dtype
    self.writers, self.docs = {}, collections.defaultdict(lambda: {"lengths": [], "hashes": [], "index": []})

  def add(self, split: str, doc, ids: np.ndarray) -> None:
    if split not in self.writers:
      self.writers[split] = ArrayRecordWriter(str(self.out / self.name(split)), "group_size:1")
    meta = json.dumps(doc.meta, default=str).encode()
    self.writers[split].write(encode({"tokens": ids.astype(self.dtype), "index": np.int64(doc.index),
                                      "meta": np.array(meta, f"S{max(len(meta), 1)}")}))
    d = self.docs[split]
    d["lengths"].append(len(ids)), d["hashes"].append(doc_hash(doc.text)), d["index"].append(doc.index)

  def name(self, split: str, suffix: str = ".array_record") -> str:
    return f"{split}-{self.number:05d}{suffix}"

  def close(self) -> dict[str, dict]:
    """Close and fsync the shards and write their sidecars; the manifest entries for them."""
    entries = {}
    for split, writer in self.writers.items():
      writer.close()
      d = self.docs[split]
      docs_name = self.name(split, ".docs.npz")
      with open(self.out / docs_name, "wb") as f:
        # hashes as bytes (N, 16), not numpy S16: an S element drops trailing NUL bytes
        np.savez(f, lengths=np.asarray(d["lengths"], np.int64), index=np.asarray(d["index"], np.int64),
                 hashes=np.frombuffer(b"".join(d["hashes"]), np.uint8).reshape(-1, 16))
      for name in (self.name(split), docs_name):
        _fsync(self.out / name)
      entries[split] = {"file": self.name(split), "records": len(d["lengths"]), "tokens": int(sum(d["lengths"])),
                        "sha256": sha256(self.out / self.name(split)), "bytes": (self.out / self.name(split)).stat().st_size,
                        "docs": docs_name, "docs_sha256": sha256(self.out / docs_name)}
    return entries


def _identity(src: Corpus, cfg: DataConfig, tok) -> dict:
  """What makes two ingests the same: a resumed one must match it exactly."""
  return {"source": src.name, "tokenizer": {"name": tok.name, "sha256": tok.sha256, "vocab_size": tok.vocab_size},
          "rules": {"dedup": cfg.dedup, "min_doc_bytes": cfg.min_doc_bytes, "max_doc_bytes": cfg.max_doc_bytes,
                       "on_bad_record": cfg.on_bad_record, "text_field": cfg.text_field, "query": cfg.query},
          "holdout_every": src.holdout_every}


def ingest_corpus(src: Corpus, cfg: DataConfig, out: Path, workers: int | None, chunk_bytes: int, progress: bool) -> dict:
  workers = workers if workers is not None else cpu_count()
  check_count("--workers", workers, 1, cpu_count(), "tokenizer processes; more than this machine's cores only adds memory")
  tok = tokenizers.load(cfg.tokenizer)
  identity = _identity(src, cfg, tok)
  out.mkdir(parents=True, exist_ok=True)
  reports = documents.new_reports()
  filt = documents.document_filter(cfg)
  if (out / MANIFEST).exists():
    manifest = read_manifest(out)
    if manifest.get("complete"):
      raise UserError(f"{out} already holds an ingested data set ({MANIFEST}); pick another directory")
    if {k: manifest.get(k) for k in identity} != identity:
      differs = sorted(k for k in identity if manifest.get(k) != identity[k])
      raise UserError(f"{out} holds an unfinished ingest of something else (differs in {', '.join(differs)}); "
                      f"pick another directory or rerun the command that started it")
    for split, r in manifest["cleaning"].items():
      if split != "source":     # unreadable records are counted again as the skipped part is re-read
        reports[split] = CorpusReport(**r)
    if cfg.dedup:   # the hashes of every document kept so far: later copies of them stay duplicates
      for entries in manifest["splits"].values():
        for e in entries:
          filt.seen.update(h.tobytes() for h in np.load(out / e["docs"])["hashes"])
  else:
    manifest = {**identity, "kind": "tokens", "info": dict(src.info), "splits": {s: [] for s in documents.SPLITS},
                "position": 0, "chunks": 0, "complete": False}
  start, resumed_at = manifest["position"], manifest["position"]
  token_dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.int32
  pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=tokenizers.worker_init, initargs=(cfg.tokenizer,))
          if workers > 1 else None)
  local = transforms.TokenizeDocuments(cfg.tokenizer)
  bar = tqdm(unit="B", unit_scale=True, desc=f"ingest {src.name}", disable=not progress, dynamic_ncols=True,
             smoothing=0.1)
  t0, docs_done = time.perf_counter(), 0
  chunk, chunk_text, pending, batch, batch_text = _Chunk(out, manifest["chunks"], token_dtype), 0, collections.deque(), [], 0

  def submit(batch):
    texts = [d.text for _, d in batch]
    pending.append((batch, pool.submit(tokenizers.worker_encode, texts) if pool else local.map(texts)))

  def drain(keep: int) -> None:
    nonlocal docs_done
    while len(pending) > keep:
      done, result = pending.popleft()
      for (split, doc), ids in zip(done, result.result() if pool else result):
        chunk.add(split, doc, ids)
        reports[split].tokens += len(ids)
        bar.update(len(doc.text))
        docs_done += 1
      bar.set_postfix_str(f"{docs_done / (time.perf_counter() - t0):,.0f} docs/s", refresh=False)

  def commit(position: int, complete: bool = False) -> None:
    nonlocal chunk, chunk_text
    drain(0)
    for split, entry in chunk.close().items():
      manifest["splits"][split].append(entry)
    manifest.update(position=position, chunks=chunk.number + 1, complete=complete,
                    cleaning={k: dataclasses.asdict(r) for k, r in reports.items()})
    _write_json(out / MANIFEST, manifest)
    chunk, chunk_text = _Chunk(out, chunk.number + 1, token_dtype), 0

  try:
    position = start
    for split, doc, kept in documents.classified(src, filt, reports, skip=start):
      position = doc.index + 1
      if kept:
        if len(doc.text) > BATCH_BYTES:    # one document alone: is there memory to tokenize it?
          check_host_memory(TOKENIZE_BYTES_PER_BYTE * len(doc.text) * workers,
                            f"tokenizing document {doc.index} of {src.name} ({len(doc.text) / 2 ** 20:.0f} MiB)",
                            "drop such documents with --set data.max_doc_bytes=N, or use fewer --workers")
        batch.append((split, doc))
        chunk_text += len(doc.text)
        batch_text += len(doc.text)
      if len(batch) >= BATCH_DOCS or batch_text >= BATCH_BYTES or (batch and chunk_text >= chunk_bytes):
        submit(batch)
        batch, batch_text = [], 0
        drain(2 * workers)           # bounded: at most this many tasks in flight
      if chunk_text >= chunk_bytes:
        commit(position)
    if batch:
      submit(batch)
    documents.check_not_empty(src.name, reports, src.holdout_every)
    commit(position, complete=True)
  finally:
    bar.close()
    if pool:
      pool.shutdown(cancel_futures=True)
  manifest["ingest"] = {"resumed_at_document": resumed_at, "wall_s": time.perf_counter() - t0, "workers": workers}
  _write_json(out / MANIFEST, manifest)
  return manifest
