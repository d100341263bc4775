"""The data layer: tables (split, cleaning, normalization, the Grain iterator), corpora from a
user's files (text, JSONL, Parquet, SQLite) cleaned, tokenized and packed, tokenizers, and the
package's layering."""

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, experiment
from dcmodel.config import DataConfig
from dcmodel.data import documents, pipeline, sources, tokenizers
from dcmodel.data.clean import Normalizer
from dcmodel.data.dataset import Dataset
from dcmodel.data.transforms import PackedWindows, TokenStream
from dcmodel.errors import UserError

DIGITS = experiment("digits_cnn").model.batch_spec()


def digits(**kw) -> Dataset:
  return Dataset.load(DataConfig(source="digits", **kw), DIGITS)


def test_digits_split_is_deterministic_and_disjoint():
  a, b = digits(), digits()
  np.testing.assert_array_equal(a.splits["train"].cols["id"], b.splits["train"].cols["id"])
  train, test = set(a.splits["train"].cols["id"]), set(a.splits["test"].cols["id"])
  assert not train & test and len(train) + len(test) == 1797 and len(test) == 360


def test_cleaning_drops_and_counts_bad_rows():
  ds = digits(options={"corrupt_rows": 30})
  total = {k: sum(getattr(r, k) for r in ds.reports.values()) for k in ("kept", "dropped_nonfinite", "dropped_out_of_range")}
  assert total == {"kept": 1797 - 30, "dropped_nonfinite": 20, "dropped_out_of_range": 10}
  for rows in ds.splits.values():
    assert np.isfinite(rows.cols["x"]).all() and rows.cols["x"].max() <= 16


def test_normalization_is_fitted_on_train_only():
  ds = digits()
  x_train = ds.normalizer(ds.splits["train"].cols["x"])
  x_test = ds.normalizer(ds.splits["test"].cols["x"])
  assert abs(x_train.mean()) < 1e-5 and abs(x_train.std() - 1) < 1e-4
  assert abs(x_test.mean()) > 1e-4                               # test statistics were not used
  flat = ds.splits["train"].cols["x"].reshape(-1, 64)
  np.testing.assert_allclose(Normalizer.fit(flat)(flat).mean(0), 0, atol=1e-5)


def test_epochs_reshuffle_and_cover_every_row():
  ds = digits()
  n = len(ds.splits["train"])
  it = ds.train_iterator(global_batch_size=1, seed=3)
  first = [int(next(it)["id"][0]) for _ in range(n)]
  second = [int(next(it)["id"][0]) for _ in range(n)]
  assert sorted(first) == sorted(ds.splits["train"].cols["id"].tolist()) == sorted(second) and first != second


def test_iterator_state_restores_the_same_batches():
  ds = digits()
  it = ds.train_iterator(32, seed=0)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["id"] for _ in range(3)]
  it2 = ds.train_iterator(32, seed=0)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["id"], e)


def test_eval_batches_pad_with_mask():
  batches = list(digits().eval_batches("test", 128))
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 360
  assert all(len(b["id"]) == 128 for b in batches)


def test_unknown_source():
  with pytest.raises(UserError, match="unknown data.source 'digit'; did you mean digits"):
    sources.load(DataConfig(source="digit"))


def test_to_device_shards_over_batch_axes():
  from dcmodel.config import MeshConfig
  from dcmodel.mesh import batch_sharding, build_mesh
  mesh = build_mesh(MeshConfig(data=4, model=2))
  arr = pipeline.to_device({"x": np.zeros((8, 3), np.float32)}, batch_sharding(mesh))["x"]
  assert arr.shape == (8, 3) and {s.data.shape for s in arr.addressable_shards} == {(2, 3)}


def test_feature_hashing_is_a_grain_stage_of_the_pipeline():
  from sklearn.utils import murmurhash3_32
  buckets = (64, 32, 16, 8)
  cfg = experiment("clicks_dlrm", "data.options={'rows': 3000, 'hash_buckets': (64, 32, 16, 8)}", "model.table_sizes=(64, 32, 16, 8)")
  ds = Dataset.load(cfg.data, cfg.model.batch_spec())
  raw = ds.splits["train"].cols["cat"]
  assert raw.max() > 10_000                                     # the log holds raw ids, not table rows
  batch = next(ds.train_iterator(32, seed=0))
  where = {int(i): k for k, i in enumerate(ds.splits["train"].cols["id"])}
  rows = np.array([where[int(i)] for i in batch["id"]])
  for t, n in enumerate(buckets):
    want = np.array([murmurhash3_32(int(v), seed=t, positive=True) % n for v in raw[rows, t]])
    np.testing.assert_array_equal(batch["cat"][:, t], want)
  ev = ds.eval_batches("test", 64)[0]
  assert np.all(ev["cat"].max(0) < np.array(buckets)) and ev["cat"].dtype == np.int32


# ---------------------------------------------------------------------------- corpora

DOCS = ["def main(argv):\n  return 0\n", "naïve 文字 — unicode\n" * 3, "x = 1\n", "def main(argv):\n  return 0\n",
        "import os\nprint(os.sep)\n" * 4, "", "class Q:\n  pass\n" * 2, "a" * 300]


def _jsonl(path, docs, field="text"):
  path.write_text("".join(json.dumps({field: d, "id": i, "lang": "py"}) + "\n" for i, d in enumerate(docs)))
  return path


def corpus_cfg(path, **kw) -> DataConfig:
  return DataConfig(source="corpus", path=str(path), test_fraction=0.25, **kw)


def read_docs(cfg):
  src = sources.load(cfg)
  reports = documents.new_reports()
  return [(split, d.text, kept) for split, d, kept in documents.classified(src, documents.document_filter(cfg), reports)], reports


def test_every_corpus_format_gives_the_same_documents(tmp_path):
  """Text files in a directory, JSON Lines, Parquet (read in record batches) and SQLite rows: the
  same documents, in order, with the same cleaning (empty and duplicate dropped, counted)."""
  (tmp_path / "dir").mkdir()
  for i, d in enumerate(DOCS):
    (tmp_path / "dir" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
  _jsonl(tmp_path / "c.jsonl", DOCS)
  pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "c.parquet", row_group_size=3)
  with sqlite3.connect(tmp_path / "c.db") as db:
    db.execute("CREATE TABLE docs (id INTEGER, body TEXT)")
    db.executemany("INSERT INTO docs VALUES (?, ?)", list(enumerate(DOCS)))
  got = {}
  for name, cfg in {"dir": corpus_cfg(tmp_path / "dir"), "jsonl": corpus_cfg(tmp_path / "c.jsonl"),
                    "parquet": corpus_cfg(tmp_path / "c.parquet", text_field="body"),
                    "sqlite": corpus_cfg(tmp_path / "c.db", query="SELECT body AS text, id FROM docs ORDER BY id")}.items():
    got[name], reports = read_docs(cfg)
    assert sum(r.duplicates for r in reports.values()) == 1 and sum(r.too_short for r in reports.values()) == 1, name
  assert got["dir"] == got["jsonl"] == got["parquet"] == got["sqlite"]
  kept = [t for _, t, k in got["jsonl"] if k]
  assert kept == [d.encode() for i, d in enumerate(DOCS) if d and i != 3]
  assert [s for s, _, _ in got["jsonl"]] == ["test", "train", "train", "train"] * 2      # every 4th held out


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "broken\n', "line 2 is not valid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', "line 2 has no field 'text'"),
    (b'{"text": "ok"}\n{"text": null}\n', "line 2: field 'text' is null, expected a string"),
    (b'{"text": "ok"}\n' + b'{"text": "\xff\xfe"}\n', "line 2 is not valid UTF-8"),
    (b'["text"]\n', "line 1 is a JSON list"),
])
def test_bad_records_are_one_line_errors_or_skipped_and_counted(tmp_path, content, message):
  path = tmp_path / "c.jsonl"
  path.write_bytes(content + b'{"text": "more"}\n' * 3)
  with pytest.raises(UserError, match=message) as e:
    read_docs(corpus_cfg(path))
  assert str(path) in str(e.value) and "\n" not in str(e.value)
  docs, reports = read_docs(corpus_cfg(path, on_bad_record="skip"))
  assert reports["source"].bad_records == 1 and len(docs) == content.count(b"\n") - 1 + 3


def test_parquet_without_the_column_and_an_empty_corpus(tmp_path):
  pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
  with pytest.raises(UserError, match=r"c.parquet has no column 'text' \(columns: body\)"):
    read_docs(corpus_cfg(tmp_path / "c.parquet"))
  (tmp_path / "e.jsonl").write_text("\n\n")
  with pytest.raises(UserError, match="has no train documents after cleaning"):
    Dataset.load(corpus_cfg(tmp_path / "e.jsonl"), experiment("corpus_gpt").model.batch_spec())


def test_packed_rows_are_the_token_stream_with_document_boundaries():
  """Concatenate-and-split: row i is tokens [iL, iL+L]; segment ids number the documents in the
  row, positions restart at each document, weights are 0 where the target is in another document."""
  docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30), np.arange(40, 42)]   # lengths 5, 3, 10, 2
  stream = TokenStream.concat(docs)
  rows = PackedWindows(stream, 4, np.full(64, 2))
  assert len(rows) == (20 - 1) // 4
  got = rows.take(np.array([0, 1, 3]))
  np.testing.assert_array_equal(got["x"][0], [1, 2, 3, 4])
  np.testing.assert_array_equal(got["y"][0], [2, 3, 4, 5])
  np.testing.assert_array_equal(got["x"][1], [5, 10, 11, 12])          # doc 0's tail, then doc 1
  np.testing.assert_array_equal(got["segment_ids"][1], [1, 2, 2, 2])
  np.testing.assert_array_equal(got["positions"][1], [0, 0, 1, 2])     # each piece counts from 0
  np.testing.assert_array_equal(got["weights"][1], [0, 1, 1, 0])       # 5->10 and 12->20 cross documents
  np.testing.assert_array_equal(got["target_bytes"][1], [0, 2, 2, 0])
  padded = PackedWindows(stream, 4, np.ones(64), pad_last=True)
  assert len(padded) == 5
  last = padded.take(np.array([4]))
  np.testing.assert_array_equal(last["x"][0], [28, 29, 40, 41])
  np.testing.assert_array_equal(last["y"][0], [29, 40, 41, 0])         # the stream ends: padding
  np.testing.assert_array_equal(last["weights"][0], [1, 0, 1, 0])
  assert padded.take(np.arange(5))["weights"].sum() == sum(len(d) - 1 for d in docs)   # every in-document target once


def test_a_corpus_trains_through_the_pipeline_with_a_trained_tokenizer(tmp_path):
  """A trained byte-level BPE: its rows decode back to the documents' text, and bits per byte
  counts each target's UTF-8 bytes."""
  docs = [f"def f{i}(x):\n    return x * {i} + 'naïve'\n" * (1 + i % 3) for i in range(60)]
  path = _jsonl(tmp_path / "c.jsonl", docs)
  tok = tokenizers.train_bpe(documents.train_texts(sources.load(corpus_cfg(path)), corpus_cfg(path)), 300,
                             tmp_path / "tok.json", progress=False)
  assert tok.vocab_size <= 300 and tokenizers.load(str(tmp_path / "tok.json")).sha256 == tok.sha256
  cfg = experiment("corpus_gpt", f"data.path={path}", f"data.tokenizer={tmp_path / 'tok.json'}", "model.max_len=16",
                   "data.test_fraction=0.25", "model.vocab_size=320")
  ds = Dataset.load(cfg.data, cfg.model.batch_spec())
  train = ds.splits["train"]
  text = b"".join(tok.decode(train.stream.tokens[train.stream.doc_starts[d]:train.stream.doc_starts[d + 1]])
                  for d in range(len(train.stream.doc_starts) - 1))
  assert text == "".join(d for i, d in enumerate(docs) if i % 4).encode()
  batch = next(ds.train_iterator(8, seed=0))
  assert batch["x"].shape == (8, 16) and batch["x"].max() < tok.vocab_size
  assert (batch["target_bytes"] == tok.token_bytes[batch["y"]] * batch["weights"]).all()
  assert (tok.token_bytes[np.unique(batch["y"])] >= 1).all()


def test_sentencepiece_and_bytes_tokenizers_load(tmp_path):
  import sentencepiece as spm
  text = tmp_path / "t.txt"
  text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                 byte_fallback=True, minloglevel=2)
  sp = tokenizers.load(str(tmp_path / "sp.model"))
  ids = sp.encode("the lazy fox")
  assert sp.decode(ids) == b"the lazy fox" and sp.vocab_size == 300 and len(sp.token_bytes) == 300
  b = tokenizers.load("bytes")
  assert b.decode(b.encode("naïve 文字")) == "naïve 文字".encode()
  with pytest.raises(UserError, match="tokenizer file not found"):
    tokenizers.load(str(tmp_path / "none.json"))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(UserError, match="is not a valid Hugging Face tokenizer.json"):
    tokenizers.load(str(tmp_path / "bad.json"))


IMPORT_ALONE = """
import importlib, os, sys, traceback
import array_record.python.array_record_module, grain, jax, numpy, pyarrow.parquet, sentencepiece, sklearn, tokenizers, tqdm
assert not [m for m in sys.modules if m.startswith("dcmodel")]
bad = []
for name in sys.argv[1:]:
  pid = os.fork()
  if pid == 0:      # a child with no dcmodel module loaded: this one is imported first, alone
    try:
      importlib.import_module(name)
      os._exit(0)
    except BaseException:
      traceback.print_exc()
      os._exit(1)
  if os.waitpid(pid, 0)[1]:
    bad.append(name)
print(bad)
sys.exit(1 if bad else 0)
"""


def test_every_data_module_imports_alone():
  """No import cycles: each module of dcmodel.data, imported first and alone (a fresh process
  with only third-party libraries loaded), imports."""
  names = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
           for p in sorted((ROOT / "dcmodel" / "data").rglob("*.py"))]
  r = subprocess.run([sys.executable, "-c", IMPORT_ALONE, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert len(names) >= 12 and r.returncode == 0, r.stdout + r.stderr[-3000:]
