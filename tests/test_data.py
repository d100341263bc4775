import numpy as np
import pytest

from dcmodel.config import DataConfig
from dcmodel.data import pipeline, preprocess, sources
from dcmodel.errors import UserError


def test_digits_split_is_deterministic_and_disjoint():
  a = sources.load(DataConfig(source="digits"))
  b = sources.load(DataConfig(source="digits"))
  np.testing.assert_array_equal(a.splits["train"]["id"], b.splits["train"]["id"])
  train, test = set(a.splits["train"]["id"]), set(a.splits["test"]["id"])
  assert not train & test and len(train) + len(test) == 1797 and len(test) == 360


def test_cleaning_drops_and_counts_bad_rows():
  src = sources.load(DataConfig(source="digits", options={"corrupt_rows": 30}))
  prep = preprocess.prepare(src)
  total = {k: sum(getattr(r, k) for r in prep.reports.values()) for k in ("kept", "dropped_nonfinite", "dropped_out_of_range")}
  assert total == {"kept": 1797 - 30, "dropped_nonfinite": 20, "dropped_out_of_range": 10}
  for cols in prep.splits.values():
    assert np.isfinite(cols["x"]).all() and cols["x"].max() <= 16


def test_normalization_is_fitted_on_train_only():
  prep = preprocess.prepare(sources.load(DataConfig(source="digits")))
  x_train = prep.normalizer(prep.splits["train"]["x"])
  x_test = prep.normalizer(prep.splits["test"]["x"])
  assert abs(x_train.mean()) < 1e-5 and abs(x_train.std() - 1) < 1e-4
  assert abs(x_test.mean()) > 1e-4                               # test statistics were not used
  per_feature = preprocess.Normalizer.fit(prep.splits["train"]["x"].reshape(-1, 64))
  np.testing.assert_allclose(per_feature(prep.splits["train"]["x"].reshape(-1, 64)).mean(0), 0, atol=1e-5)


def test_epochs_reshuffle_and_cover_every_row():
  prep = preprocess.prepare(sources.load(DataConfig(source="digits")))
  cols = prep.splits["train"]
  n = len(cols["id"])
  it = pipeline.train_iterator(cols, "x", prep.normalizer, global_batch_size=1, seed=3)
  first = [int(next(it)["id"][0]) for _ in range(n)]
  second = [int(next(it)["id"][0]) for _ in range(n)]
  assert sorted(first) == sorted(cols["id"].tolist()) == sorted(second) and first != second


def test_iterator_state_restores_the_same_batches():
  prep = preprocess.prepare(sources.load(DataConfig(source="digits")))
  it = pipeline.train_iterator(prep.splits["train"], "x", prep.normalizer, 32, seed=0)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["id"] for _ in range(3)]
  it2 = pipeline.train_iterator(prep.splits["train"], "x", prep.normalizer, 32, seed=0)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["id"], e)


def test_eval_batches_pad_with_mask():
  prep = preprocess.prepare(sources.load(DataConfig(source="digits")))
  ds = pipeline.eval_batches(prep.splits["test"], "x", prep.normalizer, 128)
  batches = [ds[i] for i in range(len(ds))]
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
  from conftest import experiment
  buckets = (64, 32, 16, 8)
  cfg = experiment("clicks_dlrm", "data.options={'rows': 3000, 'hash_buckets': (64, 32, 16, 8)}")
  src = sources.load(cfg.data)
  prep = preprocess.prepare(src)
  raw = prep.splits["train"]["cat"]
  assert raw.max() > 10_000                                     # the log holds raw ids, not table rows
  it = pipeline.train_iterator(prep.splits["train"], "x", prep.normalizer, 32, seed=0, transforms=prep.transforms)
  batch = next(it)
  where = {int(i): k for k, i in enumerate(prep.splits["train"]["id"])}
  rows = np.array([where[int(i)] for i in batch["id"]])
  for t, n in enumerate(buckets):
    want = np.array([murmurhash3_32(int(v), seed=t, positive=True) % n for v in raw[rows, t]])
    np.testing.assert_array_equal(batch["cat"][:, t], want)
    assert batch["cat"][:, t].max() < n
  ev = pipeline.eval_batches(prep.splits["test"], "x", prep.normalizer, 64, prep.transforms)[0]
  assert np.all(ev["cat"].max(0) < np.array(buckets)) and ev["cat"].dtype == np.int32


def _tiny_stdlib(tmp_path):
  """A stand-in standard library: UTF-8 files (one with multi-byte characters and NUL bytes),
  one file that is not UTF-8 (the source drops it)."""
  root = tmp_path / "lib"
  (root / "pkg").mkdir(parents=True)
  files = {"a.py": "print('héllo wörld')\n" * 40, "b.py": "x = '\x00\x00'\n" * 50, "pkg/c.py": "def f():\n  return 1\n" * 30,
           "pkg/d.py": "# ünïcode 文字\n" * 25}
  for name, text in files.items():
    (root / name).write_text(text, encoding="utf-8")
  (root / "pkg" / "bad.py").write_bytes(b"\xff\xfe not utf-8\n")
  return root


def test_tokenization_is_a_grain_stage_of_the_pipeline(tmp_path):
  from dcmodel.data import text
  from dcmodel.data.tokenize import ByteTokenizer
  tok = ByteTokenizer()
  assert tok.decode(tok.encode("naïve 文字")) == "naïve 文字".encode()
  cfg = DataConfig(source="stdlib_text", options={"root": str(_tiny_stdlib(tmp_path)), "seq_len": 16, "holdout_every": 2})
  src = sources.load(cfg)
  prep = preprocess.prepare(src)
  assert src.info["files_not_utf8"] == 1
  rows = prep.splits["train"]["text"]
  assert rows.dtype == np.dtype("S17")                            # stored as text, not as token ids
  train_bytes, _, _ = text.corpus_bytes(cfg)
  it = pipeline.train_iterator(prep.splits["train"], src.feature, prep.normalizer, 8, seed=0, transforms=prep.transforms)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {"id", "x", "y", "mask"} and batch["x"].dtype == np.int32 and batch["x"].shape == (8, 16)
    for i, x, y in zip(batch["id"], batch["x"], batch["y"]):    # window i of the training bytes, shifted by one
      window = np.frombuffer(train_bytes[16 * i: 16 * i + 17], np.uint8)
      np.testing.assert_array_equal(x, window[:-1])
      np.testing.assert_array_equal(y, window[1:])
  # A window that ends in NUL bytes keeps them (numpy drops trailing NULs from an S element).
  ends_nul = [i for i in range(len(rows)) if train_bytes[16 * i + 16] == 0]
  assert ends_nul
  ev = pipeline.eval_batches({k: v[ends_nul[:4]] for k, v in prep.splits["train"].items()}, src.feature, None, 4,
                             prep.transforms)[0]
  assert ev["y"].shape == (4, 16) and (ev["y"][:, -1] == 0).all()
