"""A user's corpus as documents (`data.source=corpus`, `data.path=` a file, a directory or a glob):

- text files: one document per file (any extension not below);
- JSON Lines (`.jsonl`): one document per line, its text under `data.text_field`, the other keys
  kept as metadata;
- Parquet (`.parquet`): the `data.text_field` column, read with pyarrow one record batch at a
  time, never the whole file;
- a database (`.db`, `.sqlite`, `.sqlite3`, or any path with `data.query` set): the rows of
  `data.query`, fetched in batches, through the standard library's sqlite3 or any DB-API 2.0
  module named by `data.sql_driver` (its `connect(data.path)`).

A bad record (not UTF-8, malformed JSON, a missing or null field, a missing column) is a one-line
error naming the file and line or row; with `data.on_bad_record=skip` it is skipped and counted.
Documents are numbered in reading order (files sorted), and every k-th is held out.
"""

from __future__ import annotations

import glob
import importlib
import json
import sqlite3
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from dcmodel.config import DataConfig
from dcmodel.data.registry import Corpus, Document, holdout_every, register
from dcmodel.data.types import CorpusReport
from dcmodel.errors import UserError

DOC_LIMIT_BYTES = 256 * 2 ** 20      # one document (a text file, a JSON line) larger than this is refused
DATABASE = (".db", ".sqlite", ".sqlite3")


class BadRecord(Exception):
  """An unreadable record, named by file and line or row. Readers yield it (not raise it), so
  one bad record does not end the file when bad records are skipped."""


def _utf8(data: bytes, where: str) -> bytes:
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise BadRecord(f"{where} is not valid UTF-8 (line {line}, byte {e.start}: {data[e.start:e.start + 1]!r})") from None
  return data


def _text(value, field: str, where: str) -> bytes:
  if isinstance(value, str):
    return value.encode("utf-8", errors="surrogatepass")
  if isinstance(value, (bytes, bytearray)):
    return _utf8(bytes(value), where)
  kind = "null" if value is None else type(value).__name__
  raise BadRecord(f"{where}: field {field!r} is {kind}, expected a string")


def text_file(path: Path, cfg: DataConfig) -> Iterator[tuple[bytes, dict, str]]:
  size = path.stat().st_size
  if size > DOC_LIMIT_BYTES:
    raise UserError(f"{path} is {size / 2**20:.0f} MiB, one document per text file and at most "
                    f"{DOC_LIMIT_BYTES // 2**20} MiB each; split it, or store documents as JSON Lines")
  try:
    yield _utf8(path.read_bytes(), str(path)), {"file": str(path)}, str(path)
  except BadRecord as e:
    yield e


def jsonl_file(path: Path, cfg: DataConfig) -> Iterator[tuple[bytes, dict, str]]:
  field = cfg.text_field
  with open(path, "rb") as f:
    for n, line in enumerate(iter(lambda: f.readline(DOC_LIMIT_BYTES + 1), b""), 1):
      where = f"{path}: line {n}"
      if len(line) > DOC_LIMIT_BYTES:
        raise UserError(f"{where} is longer than {DOC_LIMIT_BYTES // 2**20} MiB; one document per line, at most that long")
      if not line.strip():
        continue
      try:
        record = json.loads(_utf8(line, where))
        if not isinstance(record, dict):
          raise BadRecord(f"{where} is a JSON {type(record).__name__}, expected an object with a {field!r} field")
        if field not in record:
          raise BadRecord(f"{where} has no field {field!r} (fields: {', '.join(sorted(record)[:8])}); set data.text_field")
        yield _text(record.pop(field), field, where), record, where
      except json.JSONDecodeError as e:
        yield BadRecord(f"{where} is not valid JSON ({e.msg} at column {e.colno})")
      except BadRecord as e:
        yield e


def parquet_file(path: Path, cfg: DataConfig) -> Iterator[tuple[bytes, dict, str]]:
  field = cfg.text_field
  try:
    f = pq.ParquetFile(path)
  except Exception as e:   # pyarrow raises ArrowInvalid / OSError for damaged files
    yield BadRecord(f"{path} is not a readable Parquet file: {str(e).splitlines()[0][:200]}")
    return
  names = f.schema_arrow.names
  if field not in names:
    yield BadRecord(f"{path} has no column {field!r} (columns: {', '.join(names[:8])}); set data.text_field")
    return
  row = 0
  for batch in f.iter_batches(batch_size=1024):
    cols = batch.to_pydict()
    texts = cols.pop(field)
    for i, value in enumerate(texts):
      where = f"{path}: row {row + i}"
      try:
        yield _text(value, field, where), {k: v[i] for k, v in cols.items()}, where
      except BadRecord as e:
        yield e
    row += len(texts)


def database(path: str, cfg: DataConfig) -> Iterator[tuple[bytes, dict, str]]:
  field = cfg.text_field
  if not cfg.query:
    raise UserError(f"data.path {path} is a database; set data.query (e.g. \"SELECT body AS text, id FROM docs\")")
  try:
    driver = sqlite3 if cfg.sql_driver == "sqlite3" else importlib.import_module(cfg.sql_driver)
  except ImportError:
    raise UserError(f"data.sql_driver '{cfg.sql_driver}' is not installed (expected a DB-API 2.0 module)") from None
  if driver is sqlite3 and not Path(path).is_file():
    raise UserError(f"database file not found: {path}")
  try:
    conn = driver.connect(f"file:{path}?mode=ro", uri=True) if driver is sqlite3 else driver.connect(path)
    cursor = conn.cursor()
    cursor.execute(cfg.query)
  except Exception as e:   # every driver has its own Error classes
    raise UserError(f"data.query failed on {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
  names = [d[0] for d in cursor.description or ()]
  if field not in names:
    raise UserError(f"data.query on {path} returns no column {field!r} (columns: {', '.join(names)}); "
                    f"select it (... AS {field}) or set data.text_field")
  j, row = names.index(field), 0
  try:
    while rows := cursor.fetchmany(1024):
      for r in rows:
        where = f"{path}: row {row}"
        try:
          yield _text(r[j], field, where), {n: v for n, v in zip(names, r) if n != field}, where
        except BadRecord as e:
          yield e
        row += 1
  finally:
    conn.close()


def corpus_files(pattern: str) -> list[Path]:
  """A file, every file under a directory, or a glob's files, sorted (the documents' order)."""
  path = Path(pattern)
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
  elif path.is_file():
    files = [path]
  else:
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
  if not files:
    raise UserError(f"data.path '{pattern}' matches no files (expected a file, a directory or a glob)")
  return files


def reader(path: Path, cfg: DataConfig):
  suffix = path.suffix.lower()
  if cfg.query or suffix in DATABASE:
    return lambda: database(str(path), cfg)
  if suffix == ".jsonl":
    return lambda: jsonl_file(path, cfg)
  if suffix == ".parquet":
    return lambda: parquet_file(path, cfg)
  return lambda: text_file(path, cfg)


@register("corpus")
def corpus(cfg: DataConfig) -> Corpus:
  if not cfg.path:
    raise UserError("data.source 'corpus' needs data.path=FILE|DIRECTORY|GLOB (.jsonl, .parquet, a database, or text files)")
  # A DB-API path (a DSN) need not be a file; every other corpus is files.
  files = [Path(cfg.path)] if cfg.query and cfg.sql_driver != "sqlite3" else corpus_files(cfg.path)
  readers = [reader(p, cfg) for p in files]
  skip = cfg.on_bad_record == "skip"

  def documents(report: CorpusReport) -> Iterator[Document]:
    index = 0
    for read in readers:
      for record in read():
        if isinstance(record, BadRecord):
          if not skip:
            raise UserError(f"{record} (data.on_bad_record=skip skips and counts such records)")
          report.bad_records += 1
          continue
        text, meta, where = record
        yield Document(index, text, meta, where)
        index += 1

  return Corpus(f"corpus:{cfg.path}", documents, holdout_every(cfg.test_fraction), info={"files": len(files)})
