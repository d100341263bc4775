"""Real text that every machine with Python has: the standard library's own source files.

`stdlib_text`: a corpus of the .py files under the stdlib, in sorted order, every
`holdout_every`-th file held out; rows are windows of `seq_len` + 1 bytes of text, which the
pipeline's `Tokenize` stage turns into `seq_len` input tokens and the next tokens as targets.
`stdlib_snippets`: 256-byte snippets of text labelled by the top-level stdlib package they come
from (the 10 largest), split by file so no file is in both splits; tokenized the same way.
Both keep the text as it is (byte strings); cleaning happened per file (not UTF-8: dropped).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from dcmodel.config import DataConfig
from dcmodel.data.sources import Source, register
from dcmodel.data.tokenize import Tokenize, as_rows
from dcmodel.errors import UserError


def stdlib_files(root: str | None = None) -> list[Path]:
  base = Path(root or sysconfig.get_paths()["stdlib"])
  return sorted(p for p in base.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def utf8_files(files: list[Path]) -> tuple[list[tuple[Path, bytes]], int]:
  """Cleaning for text: keep files that are valid UTF-8 (a few stdlib test files are
  deliberately not); returns the kept (path, bytes) and how many were dropped."""
  kept, dropped = [], 0
  for p in files:
    data = p.read_bytes()
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:
      dropped += 1
      continue
    kept.append((p, data))
  return kept, dropped


def _windows(data: bytes, length: int) -> np.ndarray:
  arr = np.frombuffer(data, np.uint8)
  n = (len(arr) - 1) // length
  return arr[: n * length + 1], n


@register("stdlib_text")
def stdlib_text(cfg: DataConfig) -> Source:
  seq_len = int(cfg.options.get("seq_len", 256))
  max_test_windows = int(cfg.options.get("max_test_windows", 2048))
  train, test, dropped = corpus_bytes(cfg)

  def cols(data, limit=None):
    arr, n = _windows(data, seq_len)
    if limit:
      n = min(n, limit)
    starts = np.arange(n) * seq_len
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return {"id": np.arange(n, dtype=np.int64), "text": as_rows(arr[idx])}

  return Source("stdlib_text", {"train": cols(train), "test": cols(test, max_test_windows)}, feature="text",
                normalize=None, info={"files_not_utf8": dropped}, transforms=(Tokenize("text", next_token=True),))


def corpus_bytes(cfg: DataConfig) -> tuple[bytes, bytes, int]:
  """(train bytes, held-out bytes, files dropped) of stdlib_text; baselines use exactly these."""
  every = int(cfg.options.get("holdout_every", 50))
  files, dropped = utf8_files(stdlib_files(cfg.options.get("root")))
  if not files:
    raise UserError("no UTF-8 .py files found under the standard library path")
  return (b"".join(d for i, (_, d) in enumerate(files) if i % every),
          b"".join(d for i, (_, d) in enumerate(files) if i % every == 0), dropped)


@register("stdlib_snippets")
def stdlib_snippets(cfg: DataConfig) -> Source:
  length = int(cfg.options.get("snippet_len", 256))
  per_class = int(cfg.options.get("max_per_class", 3000))
  classes = int(cfg.options.get("num_classes", 10))
  base = Path(cfg.options.get("root") or sysconfig.get_paths()["stdlib"])
  files, _ = utf8_files(stdlib_files(str(base)))
  by_pkg: dict[str, list[bytes]] = {}
  for p, data in files:
    rel = p.relative_to(base).parts
    if len(rel) > 1:
      by_pkg.setdefault(rel[0], []).append(data)
  sizes = {k: sum(len(d) for d in v) for k, v in by_pkg.items()}
  top = sorted(sizes, key=lambda k: (-sizes[k], k))[:classes]
  rng = np.random.default_rng(cfg.split_seed)
  parts = {"train": [], "test": []}
  for label, pkg in enumerate(sorted(top)):
    chunks = {"train": [], "test": []}
    for i, raw in enumerate(by_pkg[pkg]):
      data = np.frombuffer(raw, np.uint8)
      n = len(data) // length
      split = "test" if i % 5 == 0 else "train"
      chunks[split].extend(data[j * length:(j + 1) * length] for j in range(n))
    for split, cap in (("train", per_class), ("test", max(per_class // 4, 1))):
      rows = chunks[split]
      keep = rng.permutation(len(rows))[:cap]
      parts[split].extend((rows[k], label) for k in keep)
  ids = iter(range(10**9))
  cols = lambda rows: {"id": np.array([next(ids) for _ in rows], np.int64), "text": as_rows(np.stack([r for r, _ in rows])),
                       "y": np.array([l for _, l in rows], np.int32)}
  return Source("stdlib_snippets", {s: cols(r) for s, r in parts.items()}, feature="text", num_classes=len(top),
                normalize=None, info={"classes": sorted(top)}, transforms=(Tokenize("text"),))
