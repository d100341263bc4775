"""Bad corpora, records and tokenizers: one line on stderr, exit 2, and nothing on disk changed
(the trained workdir, the ingested directory, the user's files)."""

import json
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import EXPERIMENTS
from dcmodel import cli
from test_bad_input import one_line_failures, snapshot

GPT = str(EXPERIMENTS / "corpus_gpt.py")
TINY = ["--set", "model.d_model=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2", "--set", "model.d_ff=64",
        "--set", "model.max_len=16", "--set", "data.global_batch_size=8", "--set", "data.eval_batch_size=8",
        "--set", "data.test_fraction=0.25", "--set", "model.vocab_size=300", "--set", "train.progress=false"]
DOCS = [f"def f{i}(x):\n    return x + {i}\n" for i in range(40)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A user's files, a workdir trained on them with the byte tokenizer, an ingest made with a
  trained BPE, and the BPE file."""
  d = tmp_path_factory.mktemp("corpus")
  (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
  assert cli.main(["tokenizer", "train", GPT, "--set", f"data.path={d / 'c.jsonl'}", "--set", "data.test_fraction=0.25",
                   "--set", "train.progress=false", "--vocab-size", "280", "--out", str(d / "tok.json")]) == 0
  assert cli.main(["ingest", GPT, *TINY, "--set", f"data.path={d / 'c.jsonl'}", "--set", f"data.tokenizer={d / 'tok.json'}",
                   "--out", str(d / "ingested")]) == 0
  assert cli.main(["train", GPT, *TINY, "--set", f"data.path={d / 'c.jsonl'}", "--set", "train.steps=2",
                   "--set", "train.log_every=2", "--workdir", str(d / "w")]) == 0
  return d


def write(d, name, content):
  p = d / f"bad-{name}"    # never one of the fixture's own files
  p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
  return str(p)


def cases(d):
  """(description, argv, expected fragment of the one-line message)."""
  jsonl = lambda name, content: ["--set", f"data.path={write(d, name, content)}"]
  pq.write_table(pa.table({"body": ["x = 1"] * 10}), d / "nocol.parquet")
  with sqlite3.connect(d / "db.sqlite") as db:
    db.execute("CREATE TABLE IF NOT EXISTS docs (body TEXT)")
  train = lambda *a: ["train", GPT, *TINY, *a, "--workdir", str(d / "w")]
  corpus = ["--set", f"data.path={d / 'c.jsonl'}"]
  return [
      ("corpus without a path", train(), "data.source 'corpus' needs data.path"),
      ("path that matches nothing", train("--set", f"data.path={d / 'nope' / '*.jsonl'}"), "matches no files"),
      ("malformed JSON line", train(*jsonl("a.jsonl", '{"text": "ok"}\n{"text": \n')), "bad-a.jsonl: line 2 is not valid JSON"),
      ("record without the field", train(*jsonl("b.jsonl", '{"body": "x"}\n')), "bad-b.jsonl: line 1 has no field 'text'"),
      ("field of the wrong type", train(*jsonl("c.jsonl", '{"text": 5}\n')), "bad-c.jsonl: line 1: field 'text' is int"),
      ("text file not UTF-8", train("--set", "data.path=" + write(d, "d.txt", b"ok\n" + bytes([0xff, 0xfe]))),
       "bad-d.txt is not valid UTF-8 (line 2"),
      ("Parquet without the column", train("--set", f"data.path={d / 'nocol.parquet'}"), "nocol.parquet has no column 'text'"),
      ("empty corpus", train(*jsonl("e.jsonl", "\n\n")), "has no train documents after cleaning"),
      ("too little text for one row", train(*jsonl("f.jsonl", '{"text": "a"}\n{"text": "b"}\n')),
       "fewer than one row of 17 (model.max_len + 1)"),
      ("database without a query", train("--set", f"data.path={d / 'db.sqlite'}"), "set data.query"),
      ("query that fails", train("--set", f"data.path={d / 'db.sqlite'}", "--set", "data.query=SELECT nope FROM docs"),
       "data.query failed"),
      ("query without the text column", train("--set", f"data.path={d / 'db.sqlite'}", "--set", "data.query=SELECT body FROM docs"),
       "returns no column 'text'"),
      ("bad-record policy", train(*corpus, "--set", "data.on_bad_record=ignore"), "data.on_bad_record must be 'error' or 'skip'"),
      ("tokenizer file missing", train(*corpus, "--set", f"data.tokenizer={d / 'none.json'}"), "tokenizer file not found"),
      ("tokenizer that is not one", train(*corpus, "--set", f"data.tokenizer={write(d, 'tok.json', '{}')}"),
       "bad-tok.json is not a valid Hugging Face tokenizer.json"),
      ("tokenizer bigger than the vocabulary", train(*corpus, "--set", f"data.tokenizer={d / 'tok.json'}",
                                                     "--set", "model.vocab_size=260"), "but model.vocab_size=260"),
      ("workdir trained with another tokenizer", train(*corpus, "--set", f"data.tokenizer={d / 'tok.json'}"),
       "was trained with another tokenizer"),
      ("ingest made with another tokenizer", train("--set", "data.source=arrayrecord", "--set", f"data.path={d / 'ingested'}"),
       "was ingested with another tokenizer"),
      ("a table for a language model", train("--set", "data.source=digits"), "is a table"),
      ("a corpus for a classifier", ["train", str(EXPERIMENTS / "digits_mlp.py"), *corpus, "--set", "data.source=corpus",
                                     "--workdir", str(d / "w")], "is a document corpus"),
      ("ingest into a user's directory", ["ingest", GPT, *TINY, *corpus, "--out", str(d)],
       "non-empty directory without an ingest manifest"),
      ("ingest into a finished ingest", ["ingest", GPT, *TINY, *corpus, "--set", f"data.tokenizer={d / 'tok.json'}",
                                         "--out", str(d / "ingested")], "already holds an ingested data set"),
      ("tokenizer over an existing file", ["tokenizer", "train", GPT, *corpus, "--vocab-size", "300", "--out", str(d / "tok.json")],
       "exists; the tokenizer is written to a new file"),
      ("tokenizer vocabulary too small", ["tokenizer", "train", GPT, *corpus, "--vocab-size", "100", "--out", str(d / "t2.json")],
       "--vocab-size 100 is too small"),
      ("tokenizer of a table", ["tokenizer", "train", str(EXPERIMENTS / "digits_mlp.py"), "--vocab-size", "300",
                                "--out", str(d / "t3.json")], "is not a document corpus"),
  ]


def test_bad_corpora_records_and_tokenizers_fail_cleanly(world, capsys):
  listed = cases(world)
  assert len(listed) >= 20
  before = snapshot(world)
  failures = one_line_failures(listed, capsys)
  assert not failures, "\n".join(failures)
  after = snapshot(world)
  written = {k for k in after if k not in before}   # the cases' own input files only
  assert {k: after[k] for k in before} == before and all(k.split("/")[0] not in ("w", "ingested") for k in written)
