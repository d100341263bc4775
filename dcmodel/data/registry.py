"""Sources by name (`data.source`), and the three shapes a source's data comes in:

- `Table`: rows as columns (features, labels, ids), already split into train and test;
- `Corpus`: documents read in order (a fresh pass per call), split by position: every k-th
  document is held out, so the split needs no second pass and a streamed ingest agrees with it;
- `Tokens`: a corpus already cleaned and tokenized (an ingested directory), as token streams.

A source is a function `(DataConfig) -> Table | Corpus | Tokens`, registered here by the modules
under sources/.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Iterator

import numpy as np

from dcmodel.config import DataConfig
from dcmodel.data.clean import Normalizer
from dcmodel.data.types import Columns, CorpusReport, Rows
from dcmodel.errors import UserError


@dataclasses.dataclass
class Table:
  name: str
  splits: dict[str, Columns | Rows]        # 'train', 'test' -> columns (or stored rows, already cleaned)
  feature: str = "x"                       # the column cleaning and normalization act on
  valid_range: tuple[float, float] = (-np.inf, np.inf)
  num_classes: int | None = None
  normalize: str | None = "per_feature"    # per_feature | global | None
  info: dict = dataclasses.field(default_factory=dict)   # e.g. bayes_auc of a planted source
  normalizer: Normalizer | None = None     # pre-fitted (an ingested data set's manifest)
  transforms: tuple = ()                   # Grain maps run on every gathered batch (tokenization, hashing)


@dataclasses.dataclass(frozen=True)
class Document:
  index: int          # position in the source's order, among readable documents
  text: bytes         # valid UTF-8
  meta: dict          # the record's other fields (JSONL keys, Parquet/SQL columns)
  where: str          # file and line/row, for messages


@dataclasses.dataclass
class Corpus:
  name: str
  documents: Callable[[CorpusReport], Iterator[Document]]   # one pass in order; counts unreadable records
  holdout_every: int                                        # document i is held out when i % k == 0
  info: dict = dataclasses.field(default_factory=dict)

  def split_of(self, index: int) -> str:
    return "test" if index % self.holdout_every == 0 else "train"


@dataclasses.dataclass
class Tokens:
  name: str
  streams: dict        # split -> a token stream (transforms.TokenStream or the stored one)
  tokenizer_sha256: str
  reports: dict        # split -> CorpusReport
  info: dict = dataclasses.field(default_factory=dict)


_SOURCES: dict[str, Callable] = {}


def register(name: str):
  def wrap(fn):
    _SOURCES[name] = fn
    return fn
  return wrap


def load(cfg: DataConfig) -> Table | Corpus | Tokens:
  if cfg.source not in _SOURCES:
    close = difflib.get_close_matches(cfg.source, sorted(_SOURCES), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown data.source '{cfg.source}'; {hint}known sources: {', '.join(sorted(_SOURCES))}")
  return _SOURCES[cfg.source](cfg)


def holdout_every(test_fraction: float) -> int:
  """Every k-th document held out for a test fraction (0.02 -> every 50th)."""
  return max(2, round(1 / test_fraction))
