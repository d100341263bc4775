"""The storage stage: ingest to ArrayRecord + manifest; training from it equals training from the
source; a killed corpus ingest resumes with every document exactly once; mismatches are refused."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import EXPERIMENTS, ROOT, experiment
from dcmodel import cli
from dcmodel.config import DataConfig
from dcmodel.data import documents, ingest, sources, tokenizers
from dcmodel.data.clean import doc_hash
from dcmodel.data.dataset import Dataset
from dcmodel.data.sources import stored
from dcmodel.errors import UserError
from dcmodel.train.loop import train
from dcmodel.train.metrics import read


def test_training_from_ingested_records_equals_in_memory(tmp_path):
  exp = str(EXPERIMENTS / "digits_cnn.py")
  assert cli.main(["ingest", exp, "--out", str(tmp_path / "data"), "--shards", "3"]) == 0
  manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
  assert [e["records"] for e in manifest["splits"]["train"]] == [479, 479, 479]
  assert manifest["normalizer"] is not None and manifest["cleaning"]["train"]["kept"] == 1437
  common = ("train.steps=12", "train.log_every=1", "checkpoint.enabled=false")
  mem = train(experiment("digits_cnn", *common), tmp_path / "mem")
  rec = train(experiment("digits_cnn", *common, "data.source=arrayrecord", f"data.path={tmp_path / 'data'}"), tmp_path / "rec")
  losses = lambda w: [r["loss"] for r in read(w / "metrics.jsonl") if r["split"] == "train"]
  assert losses(tmp_path / "rec") == losses(tmp_path / "mem")
  assert rec.final_eval == mem.final_eval


def test_manifest_mismatch_is_a_clear_error(tmp_path):
  ingest.ingest(experiment("digits_cnn").data, tmp_path / "d", shards=2)
  shard = tmp_path / "d" / "train-00001-of-00002.array_record"
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  with pytest.raises(UserError, match="does not match its manifest checksum"):
    stored.verify(tmp_path / "d")
  shard.unlink()
  with pytest.raises(UserError, match="lists train-00001-of-00002.array_record, which is missing"):
    stored.verify(tmp_path / "d")
  with pytest.raises(UserError, match="already holds an ingested data set"):
    ingest.ingest(experiment("digits_cnn").data, tmp_path / "d")


def test_ingested_text_keeps_its_tokenizer_and_gives_the_same_batches(tmp_path):
  """A text table is stored as text; the manifest names its Tokenize stage, and the records read
  back through the pipeline give exactly the in-memory source's token batches."""
  cfg = experiment("stdlib_bert", "data.options={'max_per_class': 40}")
  manifest = ingest.ingest(cfg.data, tmp_path / "d", shards=2)
  assert manifest["transforms"] == [{"type": "Tokenize", "args": {"feature": "text", "tokenizer": "bytes", "length": 256}}]
  batches = []
  for data in (cfg.data, DataConfig(source="arrayrecord", path=str(tmp_path / "d"))):
    it = Dataset.load(data, cfg.model.batch_spec()).train_iterator(16, seed=3)
    batches.append([next(it) for _ in range(4)])
  for mem, rec in zip(*batches):
    assert mem.keys() == rec.keys() and rec["x"].shape == (16, 256)
    for k in mem:
      np.testing.assert_array_equal(mem[k], rec[k])


def test_record_encoding_roundtrip():
  row = {"id": np.int64(7), "x": np.arange(12, dtype=np.float32).reshape(3, 4), "cat": np.array([1, 2], np.int32),
         "text": np.array(b"ab\x00\x00", "S4")}
  back = stored.decode(stored.encode(row))
  for k in row:
    np.testing.assert_array_equal(back[k], row[k])
    assert back[k].dtype == np.asarray(row[k]).dtype and back[k].tobytes() == np.asarray(row[k]).tobytes()


# ---------------------------------------------------------------------------- corpora

def _corpus(tmp_path, n=400):
  """A JSONL corpus with duplicates, empty documents and metadata."""
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "naïve", "文字", "x", "=", "(", ")", ":", "\n", "    "]
  docs = [" ".join(rng.choice(words, rng.integers(5, 200))) for _ in range(n)]
  docs[10] = docs[3]
  docs[20] = ""
  path = tmp_path / "corpus.jsonl"
  path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
  cfg = DataConfig(source="corpus", path=str(path), test_fraction=0.1)
  tok = tokenizers.train_bpe(documents.train_texts(sources.load(cfg), cfg), 320, tmp_path / "tok.json", progress=False)
  return DataConfig(source="corpus", path=str(path), test_fraction=0.1, tokenizer=str(tmp_path / "tok.json")), tok


def _stored_hashes(directory):
  """Every stored document's (split, source position, hash), in stream order."""
  m = json.loads((directory / "manifest.json").read_text())
  out = []
  for split, entries in m["splits"].items():
    for e in entries:
      side = np.load(directory / e["docs"])
      out += [(split, int(i), h.tobytes()) for i, h in zip(side["index"], side["hashes"])]
  return out


def test_corpus_ingest_gives_the_batches_of_the_corpus_read_directly(tmp_path):
  data, tok = _corpus(tmp_path)
  spec = experiment("corpus_gpt", "model.max_len=32", "model.vocab_size=320").model.batch_spec()
  manifest = ingest.ingest(data, tmp_path / "d", workers=2, chunk_bytes=4096, progress=False)
  assert manifest["complete"] and manifest["chunks"] > 3 and manifest["tokenizer"]["sha256"] == tok.sha256
  assert manifest["cleaning"]["train"]["duplicates"] + manifest["cleaning"]["test"]["duplicates"] == 1
  direct = Dataset.load(data, spec)
  shards = Dataset.load(DataConfig(source="arrayrecord", path=str(tmp_path / "d"), tokenizer=data.tokenizer), spec)
  for split in ("train", "test"):
    assert len(direct.splits[split]) == len(shards.splits[split]) > 0
  a, b = direct.train_iterator(16, seed=1), shards.train_iterator(16, seed=1)
  for _ in range(5):
    x, y = next(a), next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  ea, eb = direct.eval_batches("test", 16), shards.eval_batches("test", 16)
  for i in range(len(ea)):
    for k in ea[i]:
      np.testing.assert_array_equal(ea[i][k], eb[i][k])
  with pytest.raises(UserError, match="was ingested with another tokenizer"):
    Dataset.load(DataConfig(source="arrayrecord", path=str(tmp_path / "d")), spec)


def test_killed_corpus_ingest_resumes_without_losing_or_repeating_a_document(tmp_path):
  data, _ = _corpus(tmp_path, n=1500)
  out = tmp_path / "d"
  script = (f"import sys; from dcmodel.config import DataConfig; from dcmodel.data import ingest\n"
            f"ingest.ingest(DataConfig(**{{k: v for k, v in {data.__dict__!r}.items()}}), {str(out)!r}, workers=1, "
            f"chunk_bytes=2048, progress=False)\n")
  rng = np.random.default_rng(0)
  for attempt in range(3):
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:   # wait for a committed chunk, then kill at a random moment
      if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text())["chunks"] > 2 * attempt + 1:
        time.sleep(float(rng.uniform(0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.02)
    proc.wait()
  m = json.loads((out / "manifest.json").read_text())
  assert not m["complete"] and m["position"] > 0, "the ingest finished before it could be killed"
  ingest.ingest(data, out, workers=2, chunk_bytes=2048, progress=False)
  resumed = _stored_hashes(out)
  ingest.ingest(data, tmp_path / "clean", workers=1, chunk_bytes=10**9, progress=False)
  assert resumed == _stored_hashes(tmp_path / "clean")
  kept = [(s, d.index, doc_hash(d.text)) for s, d, k in
          documents.classified(sources.load(data), documents.document_filter(data), documents.new_reports()) if k]
  assert sorted(resumed) == sorted(kept) and len({h for _, _, h in resumed}) == len(resumed)
  r1 = json.loads((out / "manifest.json").read_text())["cleaning"]
  r2 = json.loads((tmp_path / "clean" / "manifest.json").read_text())["cleaning"]
  assert r1 == r2


def test_ingest_refuses_a_directory_it_did_not_make_and_another_unfinished_ingest(tmp_path):
  data, _ = _corpus(tmp_path, n=50)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(UserError, match="non-empty directory without an ingest manifest"):
    ingest.ingest(data, tmp_path / "mine", progress=False)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  out = tmp_path / "d"
  out.mkdir()
  (out / "manifest.json").write_text(json.dumps({"kind": "tokens", "complete": False, "source": "other", "position": 3}))
  with pytest.raises(UserError, match="holds an unfinished ingest of something else"):
    ingest.ingest(data, out, progress=False)
