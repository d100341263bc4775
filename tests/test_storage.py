"""The storage stage: ingest to ArrayRecord + manifest, train from it, refuse a mismatched manifest."""

import json

import numpy as np
import pytest

from conftest import experiment
from dcmodel import cli
from dcmodel.data import storage
from dcmodel.errors import UserError
from dcmodel.train.loop import train
from dcmodel.train.metrics import read


def test_training_from_ingested_records_equals_in_memory(tmp_path, capsys):
  exp = str(__import__("conftest").EXPERIMENTS / "digits_cnn.py")
  assert cli.main(["ingest", exp, "--out", str(tmp_path / "data"), "--shards", "3"]) == 0
  manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
  assert [e["records"] for e in manifest["splits"]["train"]] == [479, 479, 479]
  assert manifest["normalizer"] is not None and manifest["cleaning"]["train"]["kept"] == 1437
  common = ("train.steps=12", "train.log_every=1", "checkpoint.enabled=false")
  mem = train(experiment("digits_cnn", *common), tmp_path / "mem")
  rec = train(experiment("digits_cnn", *common, "data.source=arrayrecord",
                         f"data.options={{'path': '{tmp_path / 'data'}'}}"), tmp_path / "rec")
  losses = lambda w: [r["loss"] for r in read(w / "metrics.jsonl") if r["split"] == "train"]
  assert losses(tmp_path / "rec") == losses(tmp_path / "mem")
  assert rec.final_eval == mem.final_eval


def test_manifest_mismatch_is_a_clear_error(tmp_path):
  storage.ingest(experiment("digits_cnn").data, tmp_path / "d", shards=2)
  shard = tmp_path / "d" / "train-00001-of-00002.array_record"
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  with pytest.raises(UserError, match="does not match its manifest checksum"):
    storage.verify(tmp_path / "d")
  shard.unlink()
  with pytest.raises(UserError, match="lists train-00001-of-00002.array_record, which is missing"):
    storage.verify(tmp_path / "d")
  with pytest.raises(UserError, match="already holds an ingested data set"):
    storage.ingest(experiment("digits_cnn").data, tmp_path / "d")


def test_ingested_text_keeps_its_tokenizer_and_gives_the_same_batches(tmp_path):
  """Text is stored as text; the manifest names the Tokenize stage, and the records read back
  through the pipeline give exactly the in-memory source's token batches."""
  from dcmodel.data import pipeline, preprocess, sources
  cfg = experiment("stdlib_bert", "data.options={'max_per_class': 40}").data
  manifest = storage.ingest(cfg, tmp_path / "d", shards=2)
  assert manifest["transforms"] == [{"type": "Tokenize", "args": {"feature": "text", "tokenizer": "bytes", "next_token": False}}]
  batches = []
  for src in (sources.load(cfg), sources.load(type(cfg)(source="arrayrecord", options={"path": str(tmp_path / "d")}))):
    prep = preprocess.prepare(src)
    it = pipeline.train_iterator(prep.splits["train"], src.feature, prep.normalizer, 16, seed=3, transforms=prep.transforms)
    batches.append([next(it) for _ in range(4)])
  for mem, rec in zip(*batches):
    assert mem.keys() == rec.keys() and rec["x"].shape == (16, 256)
    for k in mem:
      np.testing.assert_array_equal(mem[k], rec[k])


def test_record_encoding_roundtrip():
  row = {"id": np.int64(7), "x": np.arange(12, dtype=np.float32).reshape(3, 4), "cat": np.array([1, 2], np.int32),
         "text": np.array(b"ab\x00\x00", "S4")}
  back = storage.decode(storage.encode(row))
  for k in row:
    np.testing.assert_array_equal(back[k], row[k])
    assert back[k].dtype == np.asarray(row[k]).dtype and back[k].tobytes() == np.asarray(row[k]).tobytes()
