"""A user's own corpus end to end, through the CLI as a user runs it, and BPE against bytes.

The corpora are not dcmodel's: JSON Lines of the documentation files found on this host
(site-packages' .md/.rst/.txt and /usr/share/doc's, one document per file, field `text`, the path
kept as metadata) and Parquet of the C headers under /usr/include (column `source`). Made once
into --dir unless --jsonl / --parquet name files of your own.

For each corpus:   `dcmodel tokenizer train` (byte-level BPE of --vocab-size on the training split)
-> `dcmodel ingest` (clean, tokenize in worker processes, ArrayRecord shards)
-> `dcmodel train` of experiments/corpus_gpt.py on the shards (packed rows, 8 simulated devices)
   for --seconds of wall-clock (train.max_seconds: a checkpoint and the final evaluation at the
   end; half that for the Parquet corpus, which only has to show the path)
-> `dcmodel generate` from the run, decoded through the same tokenizer.
The JSON Lines corpus is also trained with the byte tokenizer for the same wall-clock: its test
bits/byte (nats / ln 2 / the documents' UTF-8 bytes, so tokenizers compare) beside the BPE run's.
Constant learning rate after warm-up (a cosine over a step count neither run reaches would
favour the run that steps faster).

Run: python -m benchmarks.own_corpus [--seconds 240] [--vocab-size 4096]. Writes results/own_corpus.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import write
from dcmodel import hostenv

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = str(ROOT / "experiments" / "corpus_gpt.py")
PROMPTS = {"jsonl": ["The ", "## Installation\n\n", "This program is free software"],
           "parquet": ["#include <", "static inline int ", "/* Copyright (C) "]}


def texts(patterns: list[str], max_mb: int):
  """(path, text) of the UTF-8 files of at least 200 characters the patterns match, up to max_mb."""
  size = 0
  for name in sorted({f for pattern in patterns for f in glob.glob(pattern, recursive=True)}):
    try:
      text = Path(name).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    if len(text) >= 200 and size <= max_mb * 2 ** 20:
      size += len(text.encode())
      yield name, text


def make_jsonl(path: Path, max_mb: int = 64) -> dict:
  site = f"{sys.prefix}/lib/python3*/site-packages/**/*"
  docs = [{"text": text, "path": name} for name, text in
          texts([f"{site}.md", f"{site}.rst", f"{site}.txt", "/usr/share/doc/**/copyright", "/usr/share/doc/**/*.md"], max_mb)]
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  return {"path": str(path), "documents": len(docs), "text_bytes": sum(len(d["text"].encode()) for d in docs)}


def make_parquet(path: Path, max_mb: int = 64) -> dict:
  rows = [{"file": name, "source": text} for name, text in texts(["/usr/include/**/*.h"], max_mb)]
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=256)
  return {"path": str(path), "documents": len(rows), "text_bytes": sum(len(r["source"].encode()) for r in rows)}


def cli(*args, timeout=3600) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  t = time.perf_counter()
  p = subprocess.run([sys.executable, "-m", "dcmodel.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)
  p.wall_s = time.perf_counter() - t
  print(f"$ dcmodel {' '.join(args)}  [{p.wall_s:.0f} s, exit {p.returncode}]", flush=True)
  if p.returncode != 0:
    raise RuntimeError(f"dcmodel {' '.join(args)} failed:\n{p.stderr[-3000:]}")
  return p


def final_eval(workdir: Path) -> dict:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  test = [r for r in records if r.get("split") in ("test", "eval")]   # the held-out documents' final evaluation
  train = [r for r in records if r.get("split") == "train"]
  return {"step": test[-1]["step"], "test_bits_per_byte": test[-1]["bits_per_byte"], "test_loss": test[-1]["loss"],
          "train_tokens_per_s": sorted(r["tokens_per_s"] for r in train[1:])[len(train[1:]) // 2] if len(train) > 1 else None}


def one(dirs: Path, name: str, corpus: str, field: str, tokenizer: str, vocab: int, seconds: float, generate: bool) -> dict:
  data = ["--set", f"data.path={corpus}", "--set", f"data.text_field={field}"]
  out = {"corpus": corpus, "tokenizer": tokenizer}
  if tokenizer == "bpe":
    tok = dirs / f"{name}-tokenizer.json"
    p = cli("tokenizer", "train", EXPERIMENT, *data, "--vocab-size", str(vocab), "--out", str(tok))
    out["tokenizer_train_s"] = round(p.wall_s, 1)
    spec, model_vocab = str(tok), vocab
  else:
    spec, model_vocab = "bytes", 256
  shards = dirs / f"{name}-shards"
  p = cli("ingest", EXPERIMENT, *data, "--set", f"data.tokenizer={spec}", "--out", str(shards))
  manifest = json.loads((shards / "manifest.json").read_text())
  tokens = sum(e["tokens"] for entries in manifest["splits"].values() for e in entries)
  out["ingest"] = {"wall_s": round(p.wall_s, 1), "tokens": tokens, "cleaning": manifest["cleaning"]}
  work = dirs / f"{name}-run"
  run = ["--workdir", str(work), "--set", "data.source=arrayrecord", "--set", f"data.path={shards}",
         "--set", f"data.tokenizer={spec}", "--set", f"model.vocab_size={model_vocab}",
         "--set", f"train.max_seconds={seconds}", "--set", "train.steps=100000", "--set", "train.eval_every=0",
         "--set", "train.log_every=25", "--set", "checkpoint.every_steps=100000", "--set", "optimizer.schedule=constant",
         "--set", "train.progress=false"]
  p = cli("train", EXPERIMENT, *run)
  out["train"] = {"wall_s": round(p.wall_s, 1), **final_eval(work)}
  train_split = manifest["cleaning"]["train"]
  out["bytes_per_token"] = round(train_split["bytes_kept"] / max(train_split["tokens"], 1), 3)
  if generate:
    prompts = [a for pr in PROMPTS[name.split("-")[0]] for a in ("--prompt", pr)]
    p = cli("generate", str(work / "config.json"), "--workdir", str(work), *prompts, "--max-new-tokens", "48",
            "--temperature", "0")
    out["generated"] = p.stdout.strip().splitlines()
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--dir", default="/tmp/dcmodel-own-corpus", help="where corpora, shards and runs go")
  ap.add_argument("--jsonl", help="a JSON Lines corpus (field `text`); default: this host's documentation")
  ap.add_argument("--parquet", help="a Parquet corpus (column `source`); default: this host's C headers")
  ap.add_argument("--seconds", type=float, default=240, help="wall-clock of each JSON Lines training run")
  ap.add_argument("--vocab-size", type=int, default=4096)
  args = ap.parse_args(argv)
  dirs = Path(args.dir)
  dirs.mkdir(parents=True, exist_ok=True)
  corpora = {}
  if args.jsonl is None:
    args.jsonl = str(dirs / "docs.jsonl")
    corpora["jsonl"] = make_jsonl(Path(args.jsonl)) if not Path(args.jsonl).exists() else {"path": args.jsonl}
  if args.parquet is None:
    args.parquet = str(dirs / "headers.parquet")
    corpora["parquet"] = make_parquet(Path(args.parquet)) if not Path(args.parquet).exists() else {"path": args.parquet}
  for c in (args.jsonl, args.parquet):
    corpora.setdefault(Path(c).suffix[1:], {"path": c})["bytes_on_disk"] = os.path.getsize(c)
  runs = {"jsonl-bpe": one(dirs, "jsonl-bpe", args.jsonl, "text", "bpe", args.vocab_size, args.seconds, True),
          "jsonl-bytes": one(dirs, "jsonl-bytes", args.jsonl, "text", "bytes", 256, args.seconds, True),
          "parquet-bpe": one(dirs, "parquet-bpe", args.parquet, "source", "bpe", args.vocab_size, args.seconds / 2, True)}
  bpe, byt = runs["jsonl-bpe"]["train"], runs["jsonl-bytes"]["train"]
  report = {"corpora": corpora, "seconds": args.seconds, "vocab_size": args.vocab_size, "runs": runs,
            "bpe_vs_bytes": {"bpe_bits_per_byte": bpe["test_bits_per_byte"], "bytes_bits_per_byte": byt["test_bits_per_byte"],
                             "bpe_steps": bpe["step"], "bytes_steps": byt["step"]}}
  write("own_corpus", report)
  print(json.dumps(report["bpe_vs_bytes"]))
  for k, r in runs.items():
    print(k, r["train"], r.get("bytes_per_token"))
    for line in r.get("generated", []):
      print("   ", re.sub(r"\s+", " ", line)[:160])
  return 0


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
