"""Inference: KV-cache decoding equals recomputation, predict equals eval, a killed predict
resumes without duplicates, query equals a NumPy reference."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import EXPERIMENTS, ROOT, experiment
from dcmodel.errors import UserError
from dcmodel.infer import results as results_lib
from dcmodel.infer.generate import Generator, Sampling, greedy_by_recompute
from dcmodel.infer.predict import predict
from dcmodel.train import state as state_lib
from dcmodel.train.loop import train

PROMPTS = [b"def main(argv", b"import os\n", b"class Q", b"    return self._x + 1"]


def random_gpt(*overrides):
  cfg = experiment("stdlib_gpt", "model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.d_ff=128",
                   "model.max_len=64", *overrides)
  placed = state_lib.place(cfg)
  # Sharper logits than at init (weights x4), so argmax decisions are far from ties.
  state = jax.tree.map(lambda x: x * 4 if x.dtype == np.float32 else x, placed.init())
  return placed, state


@pytest.mark.parametrize("layout", [
    ("mesh.data=8", "model.positions=rope", "model.num_kv_heads=2"),                 # DP, GQA, RoPE
    ("mesh.data=4", "mesh.model=2", "model.positions=rope", "model.num_kv_heads=2"),  # DP x TP: KV heads split
    ("mesh.data=2", "mesh.model=4", "model.positions=learned", "model.norm=layernorm", "model.mlp=gelu"),
], ids=["dp", "dp_x_tp", "tp_learned_positions"])
def test_kv_cache_greedy_equals_full_recompute(layout):
  placed, state = random_gpt(*layout)
  graphdef = placed.graphdef
  gen = Generator(placed, state)
  out = gen(PROMPTS, Sampling(max_new_tokens=24))
  assert out.tokens.shape == (len(PROMPTS), 24)
  for prompt, got in zip(PROMPTS, out.tokens):
    np.testing.assert_array_equal(got, greedy_by_recompute(graphdef, state, prompt, 24))
  # the cache is laid out like the model: under TP each device holds a slice of the KV heads
  if "mesh.model=2" in layout:
    with placed.context():
      _, caches = gen._fns(Sampling(max_new_tokens=24))[0](state, jax.numpy.zeros((8, 4), jax.numpy.int32),
                                                              jax.numpy.zeros((8,), jax.numpy.int32), jax.random.key(0))
    k = caches[0].k
    assert k.shape == (8, 2, 28, 16)
    assert k.addressable_shards[0].data.shape == (2, 1, 28, 16)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
  placed, state = random_gpt("mesh.data=8")
  gen = Generator(placed, state)
  a = gen(PROMPTS, Sampling(16, temperature=1.0, top_k=20, seed=3)).tokens
  b = gen(PROMPTS, Sampling(16, temperature=1.0, top_k=20, seed=3)).tokens
  c = gen(PROMPTS, Sampling(16, temperature=1.0, top_k=20, seed=4)).tokens
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  np.testing.assert_array_equal(gen(PROMPTS, Sampling(16, temperature=0.7, top_k=1, seed=9)).tokens,
                                gen(PROMPTS, Sampling(16)).tokens)


def test_generate_refuses_what_learned_positions_cannot_hold():
  placed, state = random_gpt("mesh.data=8", "model.positions=learned")
  with pytest.raises(UserError, match="exceeds the model's learned positions"):
    Generator(placed, state)([b"x" * 50], Sampling(max_new_tokens=20))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  work = tmp_path_factory.mktemp("digits")
  cfg = experiment("digits_cnn", "train.steps=60", "data.eval_batch_size=40")
  result = train(cfg, work)
  return cfg, work, result


@pytest.mark.parametrize("mesh", [(), ("mesh.data=4", "mesh.model=2")], ids=["dp", "dp_x_tp"])
def test_predict_equals_the_training_eval(digits_run, tmp_path, mesh):
  cfg, work, result = digits_run
  from dcmodel import config as config_lib
  got = predict(config_lib.apply_overrides(cfg, list(mesh)), work, str(tmp_path / "res"), progress=False)
  assert got["rows"] == got["of"] == result.final_eval["examples"] == 360
  assert got["accuracy"] == result.final_eval["accuracy"]
  np.testing.assert_allclose(got["loss"], result.final_eval["loss"], rtol=1e-5)
  res = results_lib.Results(tmp_path / "res")
  assert res.meta["checkpoint_step"] == 60 and res.meta["split"] == "test"
  rows = res.read(slice(0, 360))
  np.testing.assert_array_equal(rows["id"], np.arange(360))
  np.testing.assert_allclose(rows["probs"].sum(1), 1, rtol=1e-5)
  np.testing.assert_array_equal(rows["pred"], rows["probs"].argmax(1))


def test_killed_predict_resumes_with_exactly_one_row_per_example(digits_run, tmp_path):
  cfg, work, _ = digits_run
  out = tmp_path / "res"
  # kill -9 the predict process right after its 4th batch (batch 8 -> 45 batches)
  script = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import conftest\n"
            f"from dcmodel.infer.predict import predict\n"
            f"cfg = conftest.experiment('digits_cnn', 'train.steps=60', 'data.eval_batch_size=40')\n"
            f"predict(cfg, {str(work)!r}, {str(out)!r}, batch_size=8, progress=False,\n"
            f"        after_batch=lambda i: i == 3 and os.kill(os.getpid(), signal.SIGKILL))\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert 0 < results_lib.Results(out).rows_done < 360
  partial = results_lib.Results(out).rows_done
  # the committed rows are readable as they are
  assert (results_lib.Results(out).read(slice(0, partial))["id"] == np.arange(partial)).all()

  again = predict(cfg, work, str(out), batch_size=8, progress=False)
  assert again["new_batches"] == 45 - partial // 8
  clean = predict(cfg, work, str(tmp_path / "clean"), batch_size=8, progress=False)
  a = results_lib.Results(out).read(slice(0, 360))
  b = results_lib.Results(tmp_path / "clean").read(slice(0, 360))
  np.testing.assert_array_equal(a["id"], np.arange(360))          # one row per example, in order
  assert results_lib.Results(out).rows_done == 360
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert again["accuracy"] == clean["accuracy"]


def test_results_of_another_checkpoint_are_refused_untouched(digits_run, tmp_path):
  cfg, work, _ = digits_run
  out = tmp_path / "res"
  predict(cfg, work, str(out), progress=False)
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  meta = json.loads((out / "meta.json").read_text())
  meta["checkpoint_step"] = 5
  (out / "meta.json").write_text(json.dumps(meta))
  before[out / "meta.json"] = (out / "meta.json").read_bytes()
  with pytest.raises(UserError, match="already holds other results .*checkpoint_step"):
    predict(cfg, work, str(out), progress=False)
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_predict_refuses_a_language_model_and_an_empty_workdir(tmp_path):
  with pytest.raises(UserError, match="use dcmodel generate"):
    predict(experiment("stdlib_gpt"), tmp_path, str(tmp_path / "r"))
  with pytest.raises(UserError, match="no checkpoints in"):
    predict(experiment("digits_cnn"), tmp_path / "none", str(tmp_path / "r"))
  assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A results store with known random columns (ties in `score` on purpose)."""
  path = str(tmp_path_factory.mktemp("store") / "res")
  rng = np.random.default_rng(0)
  n, chunk = 1000, 64
  ref = {"id": np.arange(n), "label": rng.integers(0, 5, n).astype(np.int32), "pred": rng.integers(0, 5, n).astype(np.int32),
         "score": np.round(rng.random(n), 2).astype(np.float32), "probs": rng.random((n, 5)).astype(np.float32)}
  w = results_lib.ResultsWriter(path, n, chunk, {k: (v.dtype.name, v.shape[1:]) for k, v in ref.items()},
                                {"experiment": "t", "task": "classification"})
  for lo in range(0, n, chunk):
    w.write(lo, {k: v[lo:lo + chunk] for k, v in ref.items()})
  return path, ref


def test_query_matches_numpy(store):
  path, ref = store
  q = lambda **kw: results_lib.query(path, **kw)
  ids = [5, 999, 0, 64, 63, 500]
  for k in ref:
    np.testing.assert_array_equal(q(ids=ids)[k], ref[k][ids])
    np.testing.assert_array_equal(q(range="100:250")[k], ref[k][100:250])
  order = np.argsort(-ref["score"], kind="stable")
  np.testing.assert_array_equal(q(top=25)["id"], order[:25])
  np.testing.assert_array_equal(q(top=7, by="label", ascending=True)["id"], np.argsort(ref["label"], kind="stable")[:7])
  wrong = np.flatnonzero(ref["pred"] != ref["label"])
  np.testing.assert_array_equal(q(where=("pred!=label",))["id"], wrong)
  both = np.flatnonzero((ref["pred"] != ref["label"]) & (ref["score"] >= 0.5))
  np.testing.assert_array_equal(q(where=("pred!=label", "score>=0.5"))["id"], both)
  in_range = both[(both >= 300) & (both < 700)]
  top = in_range[np.argsort(-ref["score"][in_range], kind="stable")[:10]]
  got = q(where=("pred!=label", "score>=0.5"), range="300:700", top=10)
  np.testing.assert_array_equal(got["id"], top)
  np.testing.assert_array_equal(got["probs"], ref["probs"][top])
  sub = [7, 8, 9, 900, 901]
  keep = [i for i in sub if ref["pred"][i] == 3]
  np.testing.assert_array_equal(q(ids=sub, where=("pred==3",))["id"], keep)


@pytest.mark.parametrize("args,message", [
    (["--where", "pred=3"], "--where must look like"),
    (["--where", "nope>1"], "unknown column 'nope'"),
    (["--top", "3", "--by", "probs"], "--by one of"),
    (["--ids", "1,x"], "--ids must be comma-separated"),
    (["--ids", "1,5000"], "not among the 1000 committed rows"),
    (["--range", "5"], "--range must look like a:b"),
])
def test_query_bad_input_is_one_line(store, args, message):
  path, _ = store
  proc = subprocess.run([sys.executable, "-m", "dcmodel.cli", "query", path, *args], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 2
  assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_predict_query_generate(digits_run, tmp_path):
  _, work, _ = digits_run
  env = {**os.environ, "DCMODEL_HOST_DEVICES": "8"}
  run = lambda *a: subprocess.run([sys.executable, "-m", "dcmodel.cli", *a], cwd=ROOT, capture_output=True, text=True, env=env)
  out = str(tmp_path / "res")
  p = run("predict", str(EXPERIMENTS / "digits_cnn.py"), "--set", "train.steps=60", "--set", "data.eval_batch_size=40",
          "--workdir", str(work), "--out", out)
  assert p.returncode == 0, p.stderr
  assert "predicted 360/360 rows" in p.stdout
  q = run("query", out, "--top", "3", "--by", "loss", "--columns", "id,label,pred,loss", "--json")
  got = json.loads(q.stdout)
  ref = results_lib.Results(out).read(slice(0, 360))
  np.testing.assert_array_equal(got["id"], np.argsort(-ref["loss"], kind="stable")[:3])
  g = run("generate", str(EXPERIMENTS / "digits_cnn.py"), "--workdir", str(work), "--prompt", "x")
  assert g.returncode == 2 and "generate needs a gpt experiment" in g.stderr
