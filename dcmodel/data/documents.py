"""A corpus's documents, cleaned and split, and (in memory) tokenized into token streams.

The same steps in the same order whether a corpus is read directly (here) or streamed by
`dcmodel ingest` into shards (ingest.py): documents in the source's order -> the cleaning rules
(exact duplicates, length bounds; one set of hashes over both splits) -> split by position ->
tokenized by the `TokenizeDocuments` Grain stage. So both give the same token streams, and the
same packed rows.
"""

from __future__ import annotations

from typing import Iterator

import grain

from dcmodel.config import DataConfig
from dcmodel.data import tokenizers
from dcmodel.data.clean import DocumentFilter
from dcmodel.data.registry import Corpus, Document, Tokens
from dcmodel.data.transforms import TokenizeDocuments, TokenStream
from dcmodel.data.types import CorpusReport
from dcmodel.errors import UserError

SPLITS = ("train", "test")
CHUNK_DOCS = 256      # documents per tokenization call


def new_reports() -> dict[str, CorpusReport]:
  """Per split, plus 'source' for records that could not be read (they belong to no split)."""
  return {"source": CorpusReport(), **{s: CorpusReport() for s in SPLITS}}


def document_filter(cfg: DataConfig) -> DocumentFilter:
  return DocumentFilter(cfg.dedup, cfg.min_doc_bytes, cfg.max_doc_bytes)


def classified(corpus: Corpus, filt: DocumentFilter, reports: dict[str, CorpusReport],
               skip: int = 0) -> Iterator[tuple[str, Document, bool]]:
  """(split, document, kept by the cleaning rules) for every document in order, counted in
  `reports`; the first `skip` documents (those a resumed ingest already has) are passed over
  without being counted or remembered."""
  for doc in corpus.documents(reports["source"]):
    if doc.index < skip:
      continue
    split = corpus.split_of(doc.index)
    yield split, doc, filt.keep(doc.text, reports[split])


def check_not_empty(name: str, reports: dict[str, CorpusReport], holdout_every: int) -> None:
  for split in SPLITS:
    if reports[split].kept == 0:
      r = reports[split]
      why = (f"{r.read} read: {r.duplicates} duplicates, {r.too_short} too short, {r.too_long} too long; "
             f"{reports['source'].bad_records} unreadable records skipped")
      hint = (f"; the held-out split takes every {holdout_every}th document: add documents or raise data.test_fraction"
              if split == "test" and reports["train"].kept else "")
      raise UserError(f"corpus {name} has no {split} documents after cleaning ({why}){hint}")


def tokenize(corpus: Corpus, cfg: DataConfig, read_threads: int = 1) -> Tokens:
  """The corpus cleaned, split and tokenized into in-memory token streams (a corpus that fits in
  memory; `dcmodel ingest` streams larger ones into shards)."""
  tok = tokenizers.load(cfg.tokenizer)
  reports = new_reports()
  texts = {s: [] for s in SPLITS}
  for split, doc, kept in classified(corpus, document_filter(cfg), reports):
    if kept:
      texts[split].append(doc.text)
  check_not_empty(corpus.name, reports, corpus.holdout_every)
  streams = {}
  for split in SPLITS:
    ds = grain.MapDataset.source(texts[split]).batch(CHUNK_DOCS, batch_fn=list).map(TokenizeDocuments(cfg.tokenizer))
    docs = [ids for chunk in ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads)) for ids in chunk]
    streams[split] = TokenStream.concat(docs)
    reports[split].tokens = len(streams[split])
  return Tokens(corpus.name, streams, tok.sha256, reports, dict(corpus.info))


def train_texts(corpus: Corpus, cfg: DataConfig) -> Iterator[str]:
  """The training split's documents after cleaning, as text (what a tokenizer is trained on:
  never the held-out documents)."""
  reports = new_reports()
  for split, doc, kept in classified(corpus, document_filter(cfg), reports):
    if kept and split == "train":
      yield doc.text.decode("utf-8")
