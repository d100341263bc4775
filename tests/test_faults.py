"""Faults: kill -9 at random moments, damaged checkpoints, non-finite steps, another layout, disk full."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import EXPERIMENTS, ROOT, experiment
from dcmodel.checkpoint import Checkpointer, fingerprint
from dcmodel.config import CheckpointConfig
from dcmodel.data import pipeline
from dcmodel.data.types import InMemory
from dcmodel.errors import UserError
from dcmodel.train import state as state_lib
from dcmodel.train.loop import train
from dcmodel.train.metrics import read


def saved_state(workdir, step):
  """A checkpoint's arrays, onto one local device (whatever topology wrote them)."""
  path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path).item_metadata
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
  return ckptr.restore(path, target)


def assert_trees_equal(a, b):
  a, b = jax.device_get(a), jax.device_get(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_bitwise(tmp_path):
  """Five launches of the same command, each SIGKILLed at a random moment once its run has
  passed a random step (so the kills do not depend on how fast this machine trains), then a
  last launch that finishes: bitwise equal to an uninterrupted run."""
  total = 250
  args = ["train", str(EXPERIMENTS / "digits_cnn.py"), "--set", f"train.steps={total}", "--set", "checkpoint.every_steps=5",
          "--set", "train.progress=false", "--set", "train.log_every=5"]
  ref = tmp_path / "ref"
  subprocess.run([sys.executable, "-m", "dcmodel.cli", *args, "--workdir", str(ref)], check=True, cwd=ROOT,
                 capture_output=True, timeout=600)
  work = tmp_path / "killed"
  rng = random.Random(1234)
  killed_after, reached = [], 0
  listed = lambda kind: ([p for p in os.listdir(work / "checkpoints") if kind(p)] if (work / "checkpoints").exists() else [])
  for _ in range(5):
    target = reached + rng.randint(5, 40)        # kill once a checkpoint at or past this step exists ...
    proc = subprocess.Popen([sys.executable, "-m", "dcmodel.cli", *args, "--workdir", str(work)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and max([int(p) for p in listed(str.isdigit)], default=0) < target:
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.4))             # ... plus a random delay: mid-step or mid-save
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      steps = sorted(int(p) for p in listed(str.isdigit))
      reached = steps[-1] if steps else 0
      killed_after.append((reached, "mid-save" if listed(lambda p: "tmp" in p) else ""))
  assert len(killed_after) >= 5, f"only {len(killed_after)} runs were still going when killed"
  final = subprocess.run([sys.executable, "-m", "dcmodel.cli", *args, "--workdir", str(work)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert final.returncode == 0, final.stderr[-2000:]
  assert_trees_equal(saved_state(work, total), saved_state(ref, total))
  print("checkpoint steps present after each kill:", killed_after)


def _run(tmp_path, name="w", *overrides, hooks=()):
  cfg = experiment("digits_cnn", "train.steps=20", "checkpoint.every_steps=5", "checkpoint.max_to_keep=2", *overrides)
  return train(cfg, tmp_path / name, batch_hooks=hooks)


def _largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_file(step_dir / "state")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _drop_commit_marker(step_dir):
  (step_dir / "state" / "commit_success.txt").unlink()


def _flip_bytes(step_dir):
  path = _largest_file(step_dir / "state")
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, len(data) // 2 + 16):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _wrong_metadata(step_dir):
  meta = step_dir / "meta" / "metadata"
  text = meta.read_text()
  import json
  record = json.loads(text)
  record["fingerprints"] = {k + "_renamed": v for k, v in record["fingerprints"].items()}
  meta.write_text(json.dumps(record))


@pytest.mark.parametrize("damage, problem", [
    (_truncate, "unreadable"), (_drop_commit_marker, "missing commit marker"),
    (_flip_bytes, ""), (_wrong_metadata, "do not match the model"),
])
def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys, damage, problem):
  _run(tmp_path)
  work = tmp_path / "w"
  assert sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit()) == [15, 20]
  damage(work / "checkpoints" / "20")
  capsys.readouterr()
  result = _run(tmp_path, "w", "train.steps=25")
  out = capsys.readouterr().out
  assert result.start_step == 15, out
  line = next(l for l in out.splitlines() if "is damaged" in l)
  assert "checkpoint step 20" in line and problem in line
  assert ("unreadable" in line or "checksum mismatch" in line) if damage is _flip_bytes else True
  assert len(os.listdir(work / "checkpoints-damaged")) == 1          # kept for inspection, not deleted


def test_every_checkpoint_damaged_is_an_error_not_a_silent_restart(tmp_path):
  _run(tmp_path)
  for step in (15, 20):
    _drop_commit_marker(tmp_path / "w" / "checkpoints" / str(step))
  with pytest.raises(UserError, match="no usable checkpoint"):
    _run(tmp_path, "w", "train.steps=25")


def test_retention_keeps_newest_good_while_newer_is_unverified(tmp_path):
  cfg = experiment("digits_cnn")
  placed = state_lib.place(cfg)
  target, state = placed.target, placed.init()
  it = pipeline.train_iterator(InMemory({"id": np.arange(8), "x": np.zeros((8, 8, 8), np.float32), "y": np.zeros(8, np.int32)}),
                               "x", None, 8, 0)
  ckpt = Checkpointer(tmp_path / "c", CheckpointConfig(max_to_keep=1))
  ckpt.save(1, state, it)
  ckpt.wait()
  ckpt.save(2, state, it)
  ckpt.manager.wait_until_finished()
  _flip_bytes(tmp_path / "c" / "2")                 # damaged before it could be verified
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]                 # step 1 survives: step 2 never verified
  step, _ = ckpt.restore_latest(target, it)
  assert step == 1
  ckpt.save(3, state, it)
  ckpt.close()
  assert ckpt.all_steps() == [3]                    # once 3 is verified, older steps go


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
  def poison(step, batch):
    if step == 3:
      batch["x"][:] = np.nan
  result = _run(tmp_path, "w", "train.log_every=5", "train.nonfinite=skip", hooks=(poison,))
  records = [r for r in read(tmp_path / "w" / "metrics.jsonl") if r["split"] == "train"]
  assert records[-1]["skipped_nonfinite_steps"] == 1 and np.isfinite(records[0]["loss"])
  hashes = jax.device_get(fingerprint(result.state))
  assert all(bool(f) for _, f in jax.tree.leaves(hashes, is_leaf=lambda x: isinstance(x, tuple)))
  # skipped means untouched: 3 steps then a poisoned 4th equal 3 steps, bitwise (moments and step count included)
  three = _run(tmp_path, "three", "train.steps=3", "train.log_every=1")
  four = _run(tmp_path, "four", "train.steps=4", "train.log_every=1", "train.nonfinite=skip", hooks=(poison,))
  assert_trees_equal(four.state, three.state)


def test_nonfinite_apply_applies_counts_and_never_checkpoints_it(tmp_path):
  def poison(step, batch):
    if step == 7:
      batch["x"][:] = np.nan
  # all steps finite: the unguarded step computes what the guarded one does (another program, so
  # XLA may fuse it otherwise: equal to float32 rounding, not bitwise)
  three = _run(tmp_path, "three", "train.steps=3", "train.log_every=1", "checkpoint.enabled=false")
  applied = _run(tmp_path, "applied", "train.steps=3", "train.log_every=1", "checkpoint.enabled=false", "train.nonfinite=apply")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), applied.state, three.state)
  records = [r for r in read(tmp_path / "applied" / "metrics.jsonl") if r["split"] == "train"]
  assert records[-1]["nonfinite_steps"] == 0 and "skipped_nonfinite_steps" not in records[-1]
  # without the gradient's norm: the same updates, the norm not reported
  bare = _run(tmp_path, "bare", "train.steps=3", "train.log_every=1", "checkpoint.enabled=false", "train.nonfinite=apply",
              "train.grad_norm=false")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), bare.state, applied.state)
  bare_records = [r for r in read(tmp_path / "bare" / "metrics.jsonl") if r["split"] == "train"]
  assert "grad_norm" in records[-1] and "grad_norm" not in bare_records[-1]
  assert [r["loss"] for r in bare_records] == pytest.approx([r["loss"] for r in records], rel=1e-5)
  # a poisoned step is applied (the parameters turn NaN, as in PyTorch), counted, and never saved
  with pytest.raises(UserError, match=r"refusing to checkpoint step 10: the state holds NaN or Inf \(train.nonfinite=apply\); "
                                      r"training stopped; last checkpoint: 5"):
    _run(tmp_path, "w", "train.log_every=5", "train.nonfinite=apply", hooks=(poison,))
  records = [r for r in read(tmp_path / "w" / "metrics.jsonl") if r["split"] == "train"]
  assert records[-1]["nonfinite_steps"] == 3 and np.isnan(records[-1]["loss"])   # step 8 and the two after it, on NaN parameters
  state = saved_state(tmp_path / "w", 5)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.floating))
  # without the norm the count is of NaN losses: the same three steps
  with pytest.raises(UserError, match=r"refusing to checkpoint step 10: .*last checkpoint: 5"):
    _run(tmp_path, "w2", "train.log_every=5", "train.nonfinite=apply", "train.grad_norm=false", hooks=(poison,))
  assert [r for r in read(tmp_path / "w2" / "metrics.jsonl") if r["split"] == "train"][-1]["nonfinite_steps"] == 3


def test_nonfinite_stop_stops_with_a_message_and_keeps_checkpoints_finite(tmp_path):
  def poison(step, batch):
    if step == 7:
      batch["x"][:] = np.inf
  with pytest.raises(UserError, match=r"non-finite loss or gradients in 1 step\(s\) between steps 6 and 10"):
    _run(tmp_path, "w", "train.log_every=5", "train.nonfinite=stop", hooks=(poison,))
  state = saved_state(tmp_path / "w", 5)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_nonfinite_state_is_never_checkpointed(tmp_path):
  ckpt = Checkpointer(tmp_path / "c", CheckpointConfig())
  with pytest.raises(FloatingPointError, match="refusing to checkpoint step 3"):
    ckpt.save(3, {"w": jax.numpy.array([1.0, np.nan])}, None)
  assert ckpt.all_steps() == []


def test_restore_onto_other_layouts_and_back(tmp_path):
  def run(data, model, steps):
    cfg = experiment("digits_mlp", f"mesh.data={data}", f"mesh.model={model}", f"train.steps={steps}",
                     "checkpoint.every_steps=5")
    return train(cfg, tmp_path / "w", devices=jax.devices()[: data * model])

  first = run(4, 2, 10)
  values = jax.device_get(nnx.to_pure_dict(first.state))
  for data, model in ((2, 1), (1, 1)):
    r = run(data, model, 10)
    assert r.start_step == 10 and r.steps_run == 0
    assert_trees_equal(nnx.to_pure_dict(r.state), values)
    model_, _ = nnx.merge(r.graphdef, r.state)
    kernel = model_.layers[0].kernel.get_value()
    assert len(kernel.sharding.device_set) == data * model
    assert {s.data.shape for s in kernel.addressable_shards} == {kernel.shape}  # model axis 1: whole rows
  on_one = run(1, 1, 15)                               # train further on one device ...
  back = run(4, 2, 15)                                 # ... and restore onto 4x2 again
  assert back.start_step == 15
  assert_trees_equal(nnx.to_pure_dict(back.state), nnx.to_pure_dict(on_one.state))
  model_, _ = nnx.merge(back.graphdef, back.state)
  kernel = model_.layers[0].kernel.get_value()
  assert {s.data.shape for s in kernel.addressable_shards} == {(64, 128)}       # restored model-split


def _tmpfs(path, size):
  path.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
  if r.returncode:
    pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")


def test_disk_too_small_is_an_error_before_training(tmp_path):
  disk = tmp_path / "disk"
  _tmpfs(disk, "256k")
  try:
    with pytest.raises(UserError, match="not enough disk space"):
      _run(disk)
    assert not (disk / "w" / "metrics.jsonl").exists()
  finally:
    subprocess.run(["umount", str(disk)])


def test_disk_filling_up_mid_run_leaves_no_fake_checkpoint(tmp_path):
  disk = tmp_path / "disk"
  _tmpfs(disk, "8m")
  try:
    def fill(step, batch):
      if step == 12:                                   # after the step-10 checkpoint
        with open(disk / "ballast", "wb", buffering=0) as f:   # unbuffered: close has nothing left to flush
          try:
            while True:
              f.write(b"\0" * 65536)
          except OSError:
            pass
    with pytest.raises(UserError, match=r"could not be written .*last good checkpoint: 10"):
      _run(disk, "w", "checkpoint.async_save=false", hooks=(fill,))
    (disk / "ballast").unlink()
    resumed = _run(disk, "w")
    assert resumed.start_step == 10
  finally:
    subprocess.run(["umount", str(disk)])


def test_fingerprint_is_the_row_major_hash_whatever_the_sharding():
  """Computed per axis (no flattening, so no array is gathered onto every device), yet the same
  value as the row-major formula checkpoints were fingerprinted with before: they still verify."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (96, 40, 8)), NamedSharding(mesh, P(None, "b", "a")))
  i = jax.device_put(np.arange(1000, dtype=np.int32).reshape(8, 125), NamedSharding(mesh, P("b")))

  def row_major(a):
    a = np.asarray(a)
    bits = (a.astype(np.float32).view(np.uint32) if a.dtype.kind == "f" else a.astype(np.uint32)).reshape(-1).astype(np.uint64)
    weights = (np.arange(bits.size, dtype=np.uint64) * 2654435761 + 1) % 2**32
    return int((bits * weights % 2**32).sum() % 2**32)
  got = jax.device_get(fingerprint({"x": x, "i": i}))
  assert int(got["x"][0]) == row_major(x) and int(got["i"][0]) == row_major(i)
  assert bool(got["x"][1]) and bool(got["i"][1])
