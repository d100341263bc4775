"""`Dataset`: the one object the loop, predict, ingest, baselines and benchmarks take their data
from. Built once from the data config and the model's declared batch (`BatchSpec`):

- a table: source -> cleaning (rows with NaN/Inf or out of range dropped, counted) ->
  normalization fitted on train -> the source's Grain stages (tokenize, hash) per batch;
- a corpus (for a language model): documents -> cleaning -> split -> tokenization (in memory, or
  read from `dcmodel ingest`'s shards) -> packed rows of seq_len + 1 tokens (transforms.PackedWindows).

Either way the splits are random-access rows, fed by the same Grain graph (pipeline.py), and a
sample of the batches is checked against the model's spec before anything trains.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dcmodel.config import DataConfig
from dcmodel.data import documents, pipeline, sources, tokenizers
from dcmodel.data.clean import Normalizer, clean_rows
from dcmodel.data.registry import Corpus, Table, Tokens
from dcmodel.data.transforms import PackedWindows
from dcmodel.data.types import BatchSpec, Columns, InMemory, Rows, check_range
from dcmodel.errors import UserError

SAMPLE_ROWS = 4096          # rows checked against the spec before training
LABEL_ROWS = 100_000        # rows whose labels are checked, per split


@dataclasses.dataclass
class Dataset:
  name: str
  splits: dict[str, Rows]
  spec: BatchSpec
  feature: str | None = None           # the column normalization acts on (tables)
  normalizer: Normalizer | None = None
  transforms: tuple = ()
  reports: dict = dataclasses.field(default_factory=dict)   # split -> CleanReport | CorpusReport
  info: dict = dataclasses.field(default_factory=dict)
  num_classes: int | None = None
  tokenizer: object = None             # corpora: the tokenizer their tokens came from
  valid_range: tuple[float, float] = (-np.inf, np.inf)   # tables: the feature values cleaning keeps

  @classmethod
  def load(cls, cfg: DataConfig, spec: BatchSpec) -> "Dataset":
    src = sources.load(cfg)
    ds = cls.from_corpus(src, cfg, spec) if spec.lm else cls.from_table(src, cfg, spec)
    ds.check()
    return ds

  @classmethod
  def from_table(cls, src, cfg: DataConfig, spec: BatchSpec) -> "Dataset":
    if not isinstance(src, Table):
      raise UserError(f"data '{src.name}' is a document corpus, but the model reads a table of examples (x, y); "
                      f"corpora train language models (model gpt)")
    splits, reports = {}, {}
    for name, cols in src.splits.items():
      if not isinstance(cols, dict):   # stored rows were cleaned when they were ingested
        splits[name], reports[name] = cols, None
        continue
      cols, reports[name] = clean_rows(cols, src.feature, src.valid_range)
      if reports[name].kept == 0:
        r = reports[name]
        raise UserError(f"data source '{src.name}' split '{name}' has no valid rows after cleaning "
                        f"({r.dropped_nonfinite} non-finite, {r.dropped_out_of_range} out of range)")
      splits[name] = InMemory(cols)
    normalizer = src.normalizer
    if normalizer is None and src.normalize:
      normalizer = Normalizer.fit(splits["train"].cols[src.feature], per_feature=src.normalize == "per_feature")
    return cls(src.name, splits, spec, src.feature, normalizer, src.transforms, {k: v for k, v in reports.items() if v},
               dict(src.info), src.num_classes, valid_range=src.valid_range)

  @classmethod
  def from_corpus(cls, src, cfg: DataConfig, spec: BatchSpec) -> "Dataset":
    if isinstance(src, Table):
      raise UserError(f"the model is a language model and reads a document corpus, but data '{src.name}' is a table; "
                      f"use data.source=corpus with data.path=... (or stdlib_text)")
    tok = tokenizers.load(cfg.tokenizer)
    if tok.vocab_size > spec.fields["x"].high:
      raise UserError(f"tokenizer {tok.name} has {tok.vocab_size} tokens, but model.vocab_size={spec.fields['x'].high}; "
                      f"the vocabulary must hold every id the tokenizer gives")
    tokens = documents.tokenize(src, cfg, cfg.read_threads) if isinstance(src, Corpus) else src
    if isinstance(src, Tokens) and src.tokenizer_sha256 != tok.sha256:
      raise UserError(f"data.path {cfg.path} was ingested with another tokenizer (sha256 {src.tokenizer_sha256[:12]}...) "
                      f"than data.tokenizer={cfg.tokenizer} (sha256 {tok.sha256[:12]}...); set data.tokenizer to the one "
                      f"it was ingested with, or ingest again")
    L = spec.seq_len
    splits = {"train": PackedWindows(tokens.streams["train"], L, tok.token_bytes),
              "test": PackedWindows(tokens.streams["test"], L, tok.token_bytes, pad_last=True)}
    if len(splits["train"]) == 0:
      raise UserError(f"corpus {src.name} has {len(tokens.streams['train'])} training tokens, fewer than one row of "
                      f"{L + 1} (model.max_len + 1)")
    info = {**tokens.info, "tokenizer": tok.name, "tokenizer_sha256": tok.sha256}
    return cls(src.name, splits, spec, reports=tokens.reports, info=info, tokenizer=tok)

  # ---- rows and batches
  def rows(self, split: str, limit: int | None = None) -> Columns:
    """The first `limit` rows (all by default) as the model sees them (after normalization and
    the Grain stages), outside the pipeline: for checks and baselines."""
    rows = self.splits[split]
    n = len(rows) if limit is None else min(len(rows), limit)
    batch = pipeline.Gather(rows, self.feature, self.normalizer).map(np.arange(n))
    for t in self.transforms:
      batch = t.map(batch)
    return batch

  def train_iterator(self, global_batch_size: int, seed: int, read_threads: int = 1, prefetch: int = 4,
                     steps_per_element: int = 1):
    return pipeline.train_iterator(self.splits["train"], self.feature, self.normalizer, global_batch_size, seed,
                                   read_threads, prefetch, self.transforms, steps_per_element)

  def eval_batches(self, split: str, global_batch_size: int):
    if split not in self.splits:
      raise UserError(f"unknown split '{split}'; this data has {', '.join(self.splits)}")
    return pipeline.eval_batches(self.splits[split], self.feature, self.normalizer, global_batch_size, self.transforms)

  @property
  def device_keys(self) -> tuple[str, ...]:
    """What goes to the devices: the fields the model declared (ids stay on the host)."""
    return tuple(self.spec.fields)

  # ---- checks and reports
  def check(self) -> None:
    """A sample of training rows against the model's spec (shapes, dtypes, id ranges), and every
    split's labels (up to LABEL_ROWS each) against the classes the model predicts."""
    self.spec.check(self.rows("train", SAMPLE_ROWS), self.name)
    y = self.spec.fields.get("y")
    if y is not None and not self.spec.lm and y.high is not None:
      for split, rows in self.splits.items():
        got = pipeline.Gather(rows, None, None).map(np.arange(min(len(rows), LABEL_ROWS)))["y"]
        if not np.issubdtype(got.dtype, np.integer):
          raise UserError(f"data '{self.name}' split '{split}' has labels of dtype {got.dtype}, expected integers")
        check_range(got, y, "y", f"{self.name}' split '{split}")

  def report(self) -> dict:
    """The cleaning report and the source's facts, flat, for metrics.jsonl (split 'data')."""
    flat = {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))}
    for split, r in self.reports.items():
      counts = dataclasses.asdict(r)
      if split == "source":     # records that could not be read belong to no split
        counts = {"bad_records": counts["bad_records"]}
      flat.update({f"{split}_{k}": v for k, v in counts.items()})
    flat.update({f"{s}_rows": len(r) for s, r in self.splits.items()})
    return flat
