"""The foundation's promises: same numbers on every mesh, parameters where the rules say,
and exact resume (bitwise parameters, identical batches)."""

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import experiment
from dcmodel.train import loop as loop_lib
from dcmodel.train import state as state_lib
from dcmodel.train.evaluate import MAX_IN_FLIGHT
from dcmodel.train.loop import train
from dcmodel.train.metrics import read

MESHES = {"1x1": (1, 1), "8x1": (8, 1), "4x2": (4, 2), "2x4": (2, 4)}


def _run(tmp_path, name, data, model, *overrides):
  cfg = experiment(name, f"mesh.data={data}", f"mesh.model={model}", "train.steps=20", "train.log_every=1",
                   "checkpoint.enabled=false", *overrides)
  devices = jax.devices()[: data * model]
  result = train(cfg, tmp_path / f"{name}-{data}x{model}", devices=devices)
  losses = [r["loss"] for r in read(tmp_path / f"{name}-{data}x{model}" / "metrics.jsonl") if r["split"] == "train"]
  return result, np.array(losses)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp"])
def test_same_loss_on_every_mesh(tmp_path, name):
  ref_result, ref = _run(tmp_path, name, 1, 1)
  assert len(ref) == 20 and ref[-1] < ref[0]
  ref_params = jax.device_get(state_lib.params(ref_result.graphdef, ref_result.state))
  for label, (d, m) in MESHES.items():
    if (d, m) == (1, 1):
      continue
    result, losses = _run(tmp_path, name, d, m)
    np.testing.assert_allclose(losses, ref, rtol=1e-4, err_msg=f"{name} on {label}")
    params = jax.device_get(state_lib.params(result.graphdef, result.state))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params)
    np.testing.assert_allclose(result.final_eval["loss"], ref_result.final_eval["loss"], rtol=1e-4)


def test_parameters_are_laid_out_by_the_rules(tmp_path):
  cfg = experiment("digits_cnn", "mesh.data=2", "mesh.model=4", "train.steps=1", "checkpoint.enabled=false")
  result = train(cfg, tmp_path / "w")
  model, opt = nnx.merge(result.graphdef, result.state)
  conv2 = model.convs[1].kernel.get_value()
  assert conv2.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "model")
  shard_bytes = {s.data.nbytes for s in conv2.addressable_shards}
  assert shard_bytes == {conv2.nbytes // 4}                      # total / model-axis size
  assert model.convs[1].bias.get_value().sharding.spec == jax.sharding.PartitionSpec("model")
  head = model.head.kernel.get_value()
  assert head.sharding.is_fully_replicated                      # 'embed'->fsdp (size 1), 'classes' unsharded
  # The optimizer state follows its parameter.
  mu = opt.opt_state[0].mu["convs"][1]["kernel"].get_value()
  assert mu.sharding.spec == conv2.sharding.spec


def test_mlp_is_megatron_split_on_model_axis(tmp_path):
  cfg = experiment("digits_mlp", "mesh.data=4", "mesh.model=2", "train.steps=1", "checkpoint.enabled=false")
  model, _ = nnx.merge(*(lambda r: (r.graphdef, r.state))(train(cfg, tmp_path / "w")))
  P = jax.sharding.PartitionSpec
  assert model.layers[0].kernel.get_value().sharding.spec == P(None, "model")   # column split
  assert model.layers[1].kernel.get_value().sharding.spec == P("model", None)   # row split
  k = model.layers[0].kernel.get_value()
  assert {s.data.shape for s in k.addressable_shards} == {(64, 128)}


def test_resume_is_exact(tmp_path):
  def batches_into(log):
    return lambda step, batch: log.append((step, batch["id"].copy()))

  straight_log, resumed_log = [], []
  base = ("train.steps=20", "checkpoint.every_steps=10", "checkpoint.async_save=true")
  straight = train(experiment("digits_cnn", *base), tmp_path / "straight", batch_hooks=(batches_into(straight_log),))
  first = train(experiment("digits_cnn", *base[1:], "train.steps=10"), tmp_path / "resumed",
                batch_hooks=(batches_into(resumed_log),))
  assert first.start_step == 0
  second = train(experiment("digits_cnn", *base), tmp_path / "resumed", batch_hooks=(batches_into(resumed_log),))
  assert second.start_step == 10 and second.steps_run == 10
  assert [s for s, _ in resumed_log] == list(range(20))
  for (s1, a), (s2, b) in zip(straight_log, resumed_log):
    np.testing.assert_array_equal(a, b, err_msg=f"batch {s1}")
  p1 = jax.device_get(nnx.to_pure_dict(straight.state))
  p2 = jax.device_get(nnx.to_pure_dict(second.state))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p1, p2)


def test_metrics_file_has_train_and_eval_records(tmp_path):
  cfg = experiment("digits_cnn", "train.steps=30", "train.log_every=10", "train.eval_every=20", "checkpoint.enabled=false")
  train(cfg, tmp_path / "w")
  records = read(tmp_path / "w" / "metrics.jsonl")
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  eval_steps = [r["step"] for r in records if r["split"] == "eval"]
  assert train_steps == [10, 20, 30] and eval_steps == [20, 30]
  for r in records:
    if r["split"] in ("train", "eval"):
      assert {"step", "split", "loss", "accuracy"} <= set(r) and 0 <= r["accuracy"] <= 1
  assert [r for r in records if r["split"] == "eval"][-1]["examples"] == 360
  assert (tmp_path / "w" / "config.json").exists()


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
  def run(accum):
    cfg = experiment("digits_mlp", "train.steps=5", "train.log_every=1", "checkpoint.enabled=false",
                     f"train.grad_accum_steps={accum}")
    r = train(cfg, tmp_path / f"a{accum}")
    return r, np.array([m["loss"] for m in read(tmp_path / f"a{accum}" / "metrics.jsonl") if m["split"] == "train"])
  one, l1 = run(1)
  four, l4 = run(4)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(state_lib.params(four.graphdef, four.state)),
               jax.device_get(state_lib.params(one.graphdef, one.state)))


def test_steps_per_dispatch_equals_one_step_per_call(tmp_path):
  """k steps in one jitted scan, fed by one Grain element of k batches: the same batches, losses
  and parameters as k calls; a resume from a checkpoint taken between calls is exact, also when
  the resumed run groups its steps differently (and unrolls them); a checkpoint step the new
  grouping cannot start from is a one-line error."""
  def run(k, name, steps=16, log_every=4, unroll=1):
    cfg = experiment("digits_mlp", f"train.steps={steps}", f"train.log_every={log_every}", "checkpoint.every_steps=8",
                     f"train.steps_per_dispatch={k}", f"train.dispatch_unroll={unroll}")
    seen = []
    r = train(cfg, tmp_path / name, batch_hooks=(lambda step, b: seen.append((step, b["id"].tolist())),))
    return r, seen, [m["loss"] for m in read(tmp_path / name / "metrics.jsonl") if m["split"] == "train"]
  one, ids1, l1 = run(1, "k1")
  four, ids4, l4 = run(4, "k4")
  assert ids4 == ids1
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  params = lambda r: jax.device_get(state_lib.params(r.graphdef, r.state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params(four), params(one))
  run(4, "resumed", steps=8)
  resumed, _, _ = run(4, "resumed")
  assert resumed.start_step == 8
  jax.tree.map(np.testing.assert_array_equal, params(resumed), params(four))
  run(4, "regrouped", steps=8)
  regrouped, ids2, _ = run(2, "regrouped", unroll=2)   # the saved iterator counted elements of 4 steps
  assert regrouped.start_step == 8 and ids2 == ids1[8:]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params(regrouped), params(one))
  from dcmodel.errors import UserError
  run(4, "odd", steps=12)
  with pytest.raises(UserError, match=r"checkpoint is at step 12, not a multiple of train.steps_per_dispatch=8"):
    run(8, "odd", log_every=8)


def test_steps_per_dispatch_must_divide_the_schedule():
  from dcmodel.errors import UserError
  with pytest.raises(UserError, match=r"train.log_every=50 must be a multiple of train.steps_per_dispatch=16"):
    experiment("digits_mlp", "train.steps=160", "train.steps_per_dispatch=16", "checkpoint.every_steps=32")
  with pytest.raises(UserError, match=r"train.dispatch_unroll must be a positive integer, got 0"):
    experiment("digits_mlp", "train.dispatch_unroll=0")


def test_long_stretch_between_metric_reads_does_not_abort(tmp_path):
  """2,000 small steps dispatched with no metric read in between: unbounded, the queue of
  steps grew until XLA:CPU aborted the process (a collective's 40 s rendezvous timeout; it did
  so in 3 of 3 runs here). The loop now keeps at most MAX_IN_FLIGHT calls ahead. A subprocess,
  because the failure is an abort."""
  import subprocess
  import sys
  from conftest import EXPERIMENTS, ROOT
  out = subprocess.run([sys.executable, "-m", "dcmodel.cli", "train", str(EXPERIMENTS / "digits_mlp.py"), "--workdir",
                        str(tmp_path / "w"), "--set", "train.steps=2000", "--set", "train.log_every=1000",
                        "--set", "checkpoint.enabled=false", "--set", "train.progress=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 2000" in out.stdout


def test_loop_holds_only_the_calls_in_flight(tmp_path, monkeypatch):
  """The loop keeps each dispatched call's metric sums only until it has waited for that call:
  holding all of them grew a run's memory with its length (a million calls at one step each kept
  ~6 million device arrays)."""
  held = []

  def spy(outputs, keep=True):
    wait(outputs, keep)
    held.append(len(outputs))

  wait = loop_lib.bound_in_flight
  monkeypatch.setattr(loop_lib, "bound_in_flight", spy)
  cfg = experiment("digits_mlp", "train.steps=40", "train.log_every=40", "checkpoint.enabled=false", "train.progress=false")
  train(cfg, tmp_path / "w")
  assert len(held) == 40 and max(held) == MAX_IN_FLIGHT


def test_time_budget_stops_with_a_checkpoint_and_a_final_evaluation(tmp_path):
  cfg = experiment("digits_mlp", "train.steps=100000", "train.max_seconds=3", "train.log_every=10",
                   "checkpoint.every_steps=100000")
  r = train(cfg, tmp_path / "w")
  assert r.stopped and "time budget" in r.stopped and 0 < r.steps_run < 100000
  records = read(tmp_path / "w" / "metrics.jsonl")
  assert [x["step"] for x in records if x["split"] == "eval"] == [r.steps_run]
  assert sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()) == [r.steps_run]
