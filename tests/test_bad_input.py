"""Bad input: one clear line on stderr, exit code 2, and the workdir left exactly as it was."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import EXPERIMENTS, ROOT
from dcmodel import cli

CNN = str(EXPERIMENTS / "digits_cnn.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished quick run whose files must survive every bad command aimed at it."""
  work = tmp_path_factory.mktemp("trained") / "w"
  assert cli.main(["train", CNN, "--workdir", str(work), "--set", "train.steps=4", "--set", "train.progress=false",
                   "--set", "checkpoint.every_steps=2"]) == 0
  return work


def snapshot(path):
  digest = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      digest[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return digest


_counter = iter(range(10**6))


def write(tmp_path, name, content):
  p = tmp_path / f"{next(_counter)}-{name}"
  p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
  return str(p)


def npz(tmp_path, **arrays):
  p = tmp_path / f"{next(_counter)}-data.npz"
  np.savez(p, **arrays)
  return str(p)


GOOD_X = np.random.default_rng(0).uniform(0, 1, (40, 64)).astype(np.float32)
GOOD_Y = np.arange(40) % 10


def cases(tmp_path):
  """(description, argv after 'train', expected fragment of the one-line message)."""
  exp = lambda text: write(tmp_path, "exp.py", text)
  mlp_data = lambda path: ["--set", "data.source=npz", "--set", f"data.path={path}",
                           "--set", "data.global_batch_size=8", "--set", "data.eval_batch_size=8"]
  mlp = str(EXPERIMENTS / "digits_mlp.py")
  dlrm = str(EXPERIMENTS / "clicks_dlrm.py")
  small_clicks = ["--set", "data.options={'rows': 2000}", "--set", "data.global_batch_size=64", "--set", "data.eval_batch_size=64"]
  return [
      ("malformed experiment file", [exp("def get_config(:\n")], "is not valid Python: line 1"),
      ("missing experiment file", [str(tmp_path / "nope.py")], "experiment file not found"),
      ("experiment without get_config", [exp("x = 1\n")], "has no get_config() function"),
      ("get_config returns the wrong type", [exp("def get_config():\n  return {}\n")], "returned dict, expected dcmodel.config.Config"),
      ("experiment raising on import", [exp("import not_a_module_xyz\n")], "failed to import: ModuleNotFoundError"),
      ("unknown model name", [exp("from dcmodel import models\nfrom dcmodel.config import Config\n"
                                  "def get_config():\n  return Config(model=models.get_config('cnnn'))\n")],
       "unknown model 'cnnn'; did you mean cnn?"),
      ("unknown config key", [CNN, "--set", "train.stesp=3"], "unknown config key 'train.stesp'; did you mean train.steps"),
      ("unknown section", [CNN, "--set", "trian.steps=3"], "unknown config key 'trian.steps'"),
      ("mistyped value", [CNN, "--set", "train.steps=ten"], "train.steps: expected int, got 'ten'"),
      ("float for an int", [CNN, "--set", "data.global_batch_size=12.5"], "data.global_batch_size: expected int, got 12.5"),
      ("setting a section", [CNN, "--set", "train=3"], "config key 'train' is a section"),
      ("--set without =", [CNN, "--set", "train.steps"], "--set expects KEY=VALUE"),
      ("zero steps", [CNN, "--set", "train.steps=0"], "train.steps must be a positive integer, got 0"),
      ("negative batch", [CNN, "--set", "data.global_batch_size=-8"], "data.global_batch_size must be a positive integer, got -8"),
      ("negative model size", [CNN, "--set", "model.features=(32, -64)"], "model sizes must be positive"),
      ("image not divisible by pools", [CNN, "--set", "model.image_size=(6, 6)"], "must be divisible by 2**len(features)=4"),
      ("unknown convolution", [CNN, "--set", "model.conv=fft"], "model.conv='fft' is not one of auto, xla, matmul"),
      ("batch not divisible by data axis", [CNN, "--set", "data.global_batch_size=100"], "does not divide the batch axes data x fsdp = 8"),
      ("mesh larger than devices", [CNN, "--set", "mesh.data=4", "--set", "mesh.model=4"], "needs 16 devices but only 8 are available"),
      ("two fill axes", [CNN, "--set", "mesh.model=-1"], "at most one mesh axis may be -1"),
      ("unknown logical axis in rules", [CNN, "--set", "mesh.rules=(('embedd', 'model'),)"], "unknown logical axes ['embedd']"),
      ("test fraction out of range", [CNN, "--set", "data.test_fraction=1.5"], "data.test_fraction must be in (0, 1)"),
      ("negative learning rate", [CNN, "--set", "optimizer.learning_rate=-1"], "optimizer.learning_rate must be > 0"),
      ("unknown optimizer", [CNN, "--set", "optimizer.name=adamm"], "optimizer.name 'adamm' is unknown"),
      ("unknown schedule", [CNN, "--set", "optimizer.schedule=cosin"], "optimizer.schedule 'cosin' is unknown"),
      ("unknown nonfinite policy", [CNN, "--set", "train.nonfinite=ignore"], "train.nonfinite must be 'skip' or 'stop'"),
      ("unknown data source", [CNN, "--set", "data.source=digit"], "unknown data.source 'digit'; did you mean digits"),
      ("data file missing", [mlp, *mlp_data(tmp_path / "none.npz")], "data file not found"),
      ("data with NaN/Inf everywhere", [mlp, *mlp_data(npz(tmp_path, x=np.full((40, 64), np.nan, np.float32), y=GOOD_Y))],
       "has no valid rows after cleaning (32 non-finite"),
      ("data of the wrong dtype", [mlp, *mlp_data(npz(tmp_path, x=np.array([["a"] * 64] * 40), y=GOOD_Y))], "dtype <U1, expected numbers"),
      ("data of the wrong shape", [mlp, *mlp_data(npz(tmp_path, x=GOOD_X[:, :10], y=GOOD_Y))], "has examples of shape (10,) in 'x', but the model expects (64,)"),
      ("labels and features disagree", [mlp, *mlp_data(npz(tmp_path, x=GOOD_X, y=GOOD_Y[:30]))], "expected x of shape (N, ...) and y of shape (N,)"),
      ("empty data", [mlp, *mlp_data(npz(tmp_path, x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64)))], "no examples (x has 0 rows)"),
      ("labels out of range", [mlp, *mlp_data(npz(tmp_path, x=GOOD_X, y=GOOD_Y + 5))], "has labels 5..14 in 'y', but the model takes 0..9"),
      ("text that is not UTF-8", [mlp, "--set", "data.source=csv", "--set",
                                  f"data.path={write(tmp_path, 'd.csv', b'a,label' + bytes([10, 0xff, 0xfe]) + b',1')}"],
       "is not valid UTF-8 text"),
      ("workdir of a different model", [mlp], "holds checkpoints of a different model (cnn"),
      ("embedding tables smaller than the ids", [dlrm, *small_clicks, "--set", "model.table_sizes=(100, 500, 200, 100)"],
       "ids up to (99"),  # Zipf ids reach the cap of each planted table: 999 > 100 rows
      ("hashed ids into tables of another size", [dlrm, *small_clicks, "--set",
                                                  "data.options={'rows': 2000, 'hash_buckets': (4000, 64, 64, 64)}"],
       "but the model's tables hold (1000, 500, 200, 100) rows"),
      ("hash buckets for too few tables", [dlrm, *small_clicks, "--set", "data.options={'rows': 2000, 'hash_buckets': (64,)}"],
       "must give a positive bucket count for each of the 4 tables"),
      ("dropout out of range", [str(EXPERIMENTS / "stdlib_gpt.py"), "--set", "model.dropout=1.0"], "model.dropout must be in [0, 1)"),
      ("vocabulary smaller than the tokenizer's ids", [str(EXPERIMENTS / "stdlib_gpt.py"), "--set", "model.vocab_size=100"],
       "tokenizer bytes has 256 tokens, but model.vocab_size=100; the vocabulary must hold every id the tokenizer gives"),
      ("unknown compute dtype", [CNN, "--set", "model.dtype=float16"], "model.dtype='float16' is not one of float32, bfloat16"),
  ]


def one_line_failures(listed, capsys) -> list[str]:
  """Run each (description, argv, fragment) through the CLI; the cases that did not fail with exit
  2 and exactly one `dcmodel: error:` line holding the fragment."""
  failures = []
  for description, argv, fragment in listed:
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    if not (code == 2 and len(lines) == 1 and lines[0].startswith("dcmodel: error: ") and fragment in lines[0]):
      failures.append(f"{description}: exit {code}, stderr {err[-400:]!r}")
  return failures


def test_at_least_25_bad_inputs_fail_cleanly(tmp_path, trained, capsys):
  listed = [(d, ["train", *argv, "--workdir", str(trained), "--set", "train.progress=false"], f)
            for d, argv, f in cases(tmp_path)]
  assert len(listed) >= 25
  before = snapshot(trained)
  failures = one_line_failures(listed, capsys)
  assert not failures, "\n".join(failures)
  assert snapshot(trained) == before, "a failed command changed the workdir"


def test_unwritable_workdir(tmp_path, capsys):
  if os.geteuid() == 0:
    target = "/proc/dcmodel-workdir"           # not writable even for root
  else:
    (tmp_path / "ro").mkdir(mode=0o500)
    target = str(tmp_path / "ro" / "w")
  code = cli.main(["train", CNN, "--workdir", target, "--set", "train.progress=false"])
  assert code == 2 and "is not writable" in capsys.readouterr().err


def test_debug_flag_shows_the_traceback():
  with pytest.raises(Exception, match="train.steps: expected int"):
    cli.main(["--debug", "train", CNN, "--set", "train.steps=x"])


def test_real_process_prints_no_traceback(tmp_path):
  r = subprocess.run([sys.executable, "-m", "dcmodel.cli", "train", str(tmp_path / "missing.py")],
                     capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
