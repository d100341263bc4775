import json
import subprocess
import sys

import pytest

from conftest import EXPERIMENTS, ROOT, experiment
from dcmodel import config as config_lib
from dcmodel.errors import UserError


def test_overrides_are_typed_and_applied():
  cfg = experiment("digits_cnn", "optimizer.learning_rate=3e-3", "train.steps=200", "model.features=(16, 32)",
                   "checkpoint.async_save=false", "optimizer.name=sgd")
  assert cfg.optimizer.learning_rate == 3e-3 and cfg.train.steps == 200
  assert cfg.model.features == (16, 32) and cfg.checkpoint.async_save is False and cfg.optimizer.name == "sgd"


def test_int_is_accepted_for_float_but_not_the_reverse():
  assert experiment("digits_cnn", "optimizer.learning_rate=1").optimizer.learning_rate == 1.0
  with pytest.raises(UserError, match=r"train.steps: expected int, got 2.5"):
    experiment("digits_cnn", "train.steps=2.5")


def test_unknown_key_names_close_matches():
  with pytest.raises(UserError) as e:
    experiment("digits_cnn", "optimizer.learning_rat=1e-3")
  assert "unknown config key 'optimizer.learning_rat'" in str(e.value)
  assert "optimizer.learning_rate" in str(e.value)
  assert "\n" not in str(e.value)


def test_wrong_type_names_field_and_expected_type():
  with pytest.raises(UserError, match=r"data.global_batch_size: expected int, got 'big'"):
    experiment("digits_cnn", "data.global_batch_size=big")
  with pytest.raises(UserError, match=r"checkpoint.async_save: expected bool"):
    experiment("digits_cnn", "checkpoint.async_save=3")
  with pytest.raises(UserError, match=r"model.features: expected tuple"):
    experiment("digits_cnn", "model.features=7")


def test_nonpositive_sizes_rejected():
  with pytest.raises(UserError, match="train.steps must be a positive integer, got 0"):
    experiment("digits_cnn", "train.steps=0")
  with pytest.raises(UserError, match="model sizes must be positive"):
    experiment("digits_cnn", "model.features=(32, -1)")


def test_resolved_config_roundtrips_to_json(tmp_path):
  cfg = experiment("digits_cnn", "train.steps=7")
  path = config_lib.save(cfg, tmp_path)
  saved = json.loads(path.read_text())
  assert saved["train"]["steps"] == 7 and saved["model"]["name"] == "cnn"
  assert saved["mesh"]["rules"][0] == ["batch", ["data", "fsdp"]]


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "dcmodel.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--set", "optimizer.lr=1"], "unknown config key 'optimizer.lr'"),
    (["--set", "train.steps=many"], "train.steps: expected int, got 'many'"),
    (["--set", "data.global_batch_size=100"], "data.global_batch_size=100 does not divide the batch axes data x fsdp = 8"),
    (["--set", "mesh.data=4", "--set", "mesh.model=4"], "needs 16 devices but only 8 are available"),
])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, message):
  r = _cli("train", str(EXPERIMENTS / "digits_cnn.py"), "--workdir", str(tmp_path / "w"), *args)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("dcmodel: error: ") and message in lines[0], r.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_model_field_added_later_keeps_old_workdirs_resumable():
  from conftest import experiment
  from dcmodel.config import same_model, to_dict
  cfg = experiment("digits_cnn")
  saved = {k: v for k, v in json.loads(json.dumps(to_dict(cfg)["model"], default=list)).items() if k != "dtype"}
  assert same_model(cfg, saved)                                             # written before `dtype` existed
  assert not same_model(experiment("digits_cnn", "model.dtype=bfloat16"), saved)
  assert not same_model(experiment("digits_cnn", "model.features=(16, 64)"), saved)
  # How the model is computed is not which model it is: the same parameters resume under any.
  assert same_model(experiment("digits_cnn", "model.conv=xla"), saved)
  assert same_model(experiment("digits_cnn", "model.conv=matmul"), {**saved, "conv": "xla"})
  gpt = experiment("stdlib_gpt")
  assert same_model(experiment("stdlib_gpt", "model.remat=block"), json.loads(json.dumps(to_dict(gpt)["model"], default=list)))
