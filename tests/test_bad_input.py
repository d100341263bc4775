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
      ("unknown nonfinite policy", [CNN, "--set", "train.nonfinite=ignore"], "train.nonfinite must be 'skip', 'stop' or 'apply'"),
      ("no norm for the guard", [CNN, "--set", "train.grad_norm=false"], "train.grad_norm=false needs train.nonfinite=apply: 'skip'"),
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


# ---------------------------------------------------------------------------- resources and files
# Every number that sizes work is checked against what exists before any work; output paths never
# land on a user's files; whatever a user's experiment file raises is the one line.

GPT = str(EXPERIMENTS / "corpus_gpt.py")
TINY_GPT = ["--set", "model.d_model=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2", "--set", "model.d_ff=64",
            "--set", "model.max_len=32", "--set", "data.global_batch_size=8", "--set", "data.eval_batch_size=8",
            "--set", "train.steps=2", "--set", "train.final_eval=false", "--set", "train.progress=false",
            "--set", "optimizer.warmup_steps=1"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, trained):
  """A trained tiny GPT on a small corpus, a results store of the CNN run, and files a user owns."""
  root = tmp_path_factory.mktemp("outputs")
  docs = root / "docs.jsonl"
  docs.write_text("".join(f'{{"text": "document {i}: {"lorem ipsum dolor sit amet " * (3 + i % 5)}"}}\n' for i in range(200)))
  gpt = root / "gpt"
  corpus = ["--set", "data.source=corpus", "--set", f"data.path={docs}", *TINY_GPT]
  assert cli.main(["train", GPT, *corpus, "--workdir", str(gpt)]) == 0
  results = root / "results"
  assert cli.main(["predict", CNN, "--workdir", str(trained), "--out", str(results), "--set", "train.progress=false"]) == 0
  (root / "mine.txt").write_text("a file the user owns\n")
  (root / "mydir").mkdir()
  (root / "mydir" / "notes.txt").write_text("the user's notes\n")
  (root / "myconf").mkdir()
  (root / "myconf" / "config.json").write_text('{"learning_rate": 0.1}\n')
  (root / "exits.py").write_text("import sys\nsys.exit(3)\n")
  (root / "types.py").write_text("from dcmodel import models\nfrom dcmodel.config import Config, TrainConfig\n"
                                 "def get_config():\n  return Config(model=models.get_config('cnn', image_size=(8, 8)), "
                                 "train=TrainConfig(steps='10'))\n")
  (root / "broken_model.py").write_text(
      "import dataclasses\nfrom dcmodel.config import Config, DataConfig\nfrom dcmodel.models import registry\n"
      "from dcmodel.models.mlp import MLPConfig\n\n@registry.register('broken_mlp')\n@dataclasses.dataclass(frozen=True)\n"
      "class Broken(MLPConfig):\n  def make(self, rngs):\n    raise ValueError('my model is broken')\n\n"
      "def get_config():\n  return Config(model=Broken(input_dim=64, hidden=(8,), num_outputs=10),\n"
      "                data=DataConfig(global_batch_size=64, eval_batch_size=64))\n")
  return {"root": root, "gpt": gpt, "corpus": corpus, "results": results}


def resource_cases(o, trained):
  """(description, full argv, expected fragment of the one-line message)."""
  root, q = o["root"], ["--set", "train.progress=false"]
  clicks = str(EXPERIMENTS / "clicks_dlrm.py")
  stdlib_gpt = str(EXPERIMENTS / "stdlib_gpt.py")
  fresh = lambda name: ["--workdir", str(root / f"never-{name}")]
  return [
      ("no simulated devices", ["--host-devices", "0", "train", CNN, *q, *fresh("a")], "--host-devices must be between 1 and 512, got 0"),
      ("a hundred thousand simulated devices", ["--host-devices", "100000", "train", CNN, *q, *fresh("a")],
       "--host-devices must be between 1 and 512, got 100000"),
      ("more processes than devices allow", ["launch", "--processes", "600", CNN, *q, *fresh("a")],
       "--processes must be between 1 and 512, got 600"),
      ("huge devices per process", ["launch", "--processes", "2", "--devices-per-process", "100000", CNN, *fresh("a")],
       "--devices-per-process must be between 1 and 512, got 100000"),
      ("processes x devices beyond the bound", ["launch", "--processes", "300", "--devices-per-process", "2", CNN, *fresh("a")],
       "--processes x devices per process must be between 1 and 512, got 600"),
      ("a batch of 10^8 examples", ["train", CNN, *q, "--set", "data.global_batch_size=100000000", *fresh("b")],
       "batches in flight"),
      ("an eval batch of 10^9", ["train", CNN, *q, "--set", "data.eval_batch_size=1000000000", *fresh("b")], "of memory, but this host has"),
      ("a batch larger than the training split", ["train", CNN, *q, "--set", "data.global_batch_size=2048", *fresh("b")],
       "data.global_batch_size=2048 is more than the 1437 training examples of digits"),
      ("sequences of a million tokens", ["train", stdlib_gpt, *q, "--set", "model.max_len=1000000", *fresh("c")], "activations"),
      ("a vocabulary of 10^9", ["train", stdlib_gpt, *q, "--set", "model.vocab_size=1000000000", *fresh("c")],
       "needs at least"),
      ("a million layers", ["train", stdlib_gpt, *q, "--set", "model.num_layers=1000000", *fresh("c")],
       "model.num_layers=1000000 is more than 512"),
      ("10^12 planted rows", ["train", clicks, *q, "--set", "data.options={'rows': 1000000000000}", *fresh("d")],
       "data.source=clicks with data.options['rows']=1000000000000 needs at least"),
      ("negative planted rows", ["train", clicks, *q, "--set", "data.options={'rows': -5}", *fresh("d")],
       "data.options['rows'] must be an integer >= 2, got -5"),
      ("a million read threads", ["train", CNN, *q, "--set", "data.read_threads=1000000", *fresh("e")],
       "data.read_threads must be between 0 and 64"),
      ("a prefetch of 10^9 batches", ["train", CNN, *q, "--set", "data.prefetch=1000000000", *fresh("e")],
       "data.prefetch must be between 0 and 1024"),
      ("a million steps per call", ["train", CNN, *q, "--set", "train.steps_per_dispatch=1000000", "--set", "train.steps=1000000",
                                    "--set", "train.log_every=1000000", "--set", "checkpoint.every_steps=1000000", *fresh("e")],
       "batches in flight"),
      ("workdir is a user's file", ["train", CNN, *q, "--workdir", str(root / "mine.txt")], "is a file, not a directory"),
      ("workdir is a directory of the user's files", ["train", CNN, *q, "--workdir", str(root / "mydir")],
       "holds files that are not a dcmodel run's (notes.txt)"),
      ("workdir holds a config.json of something else", ["train", CNN, *q, "--workdir", str(root / "myconf")],
       "holds a config.json that is not a dcmodel run's"),
      ("profile span backwards", ["train", CNN, *q, "--profile-steps", "5:3", *fresh("f")], "must be A:B with 0 <= A < B"),
      ("negative checkpoint interval", ["train", CNN, *q, "--set", "checkpoint.every_seconds=-1", *fresh("f")],
       "must be 0 or more"),
      ("no checkpoint schedule", ["train", CNN, *q, "--set", "checkpoint.every_steps=0", *fresh("f")],
       "checkpoint.every_steps and checkpoint.every_seconds are both 0"),
      ("experiment calls sys.exit", ["train", str(root / "exits.py"), *fresh("g")], "called sys.exit(3) while being imported"),
      ("experiment returns a wrong type", ["train", str(root / "types.py"), *fresh("g")], "train.steps: expected int, got '10'"),
      ("experiment's own model raises", ["train", str(root / "broken_model.py"), *q, *fresh("g")],
       "broken_model.py, line 10: ValueError: my model is broken"),
      ("a hundred million new tokens", ["generate", GPT, *o["corpus"], "--workdir", str(o["gpt"]), "--prompt", "doc",
                                        "--max-new-tokens", "100000000"], "KV cache"),
      ("top-k beyond the vocabulary", ["generate", GPT, *o["corpus"], "--workdir", str(o["gpt"]), "--prompt", "doc",
                                       "--temperature", "1", "--top-k", "1000000000"], "--top-k 1000000000 is more than the 256 tokens"),
      ("predict --out is a user's file", ["predict", CNN, "--workdir", str(trained), "--out", str(root / "mine.txt")],
       "is a file; a results store is a directory"),
      ("predict --out is a directory of the user's files", ["predict", CNN, "--workdir", str(trained), "--out", str(root / "mydir")],
       "is a directory of other things"),
      ("predict batch of 10^9", ["predict", CNN, "--workdir", str(trained), "--out", str(root / "never-r"), "--batch-size", "1000000000"],
       "--batch-size 1000000000 (a batch read"),
      ("ingest into 10^9 shards", ["ingest", CNN, "--out", str(root / "never-i"), "--shards", "1000000000"],
       "--shards must be between 1 and 1437"),
      ("ingest with 10^5 workers", ["ingest", GPT, *o["corpus"], "--out", str(root / "never-i"), "--workers", "100000"],
       "--workers must be between 1 and"),
      ("query top 10^12", ["query", str(o["results"]), "--top", "1000000000000"], "--top 1000000000000 is more than the 360 committed rows"),
      ("a trace that is not there", ["bench", "--trace", str(trained)], "no profiler trace under"),
      ("tokenizer of no merges", ["tokenizer", "train", stdlib_gpt, "--vocab-size", "10", "--out", str(root / "never-tok.json")],
       "--vocab-size 10 is too small"),
  ]


def test_at_least_20_resource_and_file_inputs_fail_cleanly(tmp_path, trained, outputs, capsys):
  listed = resource_cases(outputs, trained)
  assert len(listed) >= 20
  before = snapshot(outputs["root"]), snapshot(trained)
  failures = []
  for description, argv, fragment in listed:
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    lines = [l for l in err.splitlines() if not l.startswith("WARNING:")]
    ok = code == 2 and len(lines) == 1 and lines[0].startswith("dcmodel: error: ") and fragment in lines[0]
    if not ok:
      failures.append(f"{description}: exit {code}, stderr {err[:500]!r}")
  assert not failures, "\n".join(failures)
  assert (snapshot(outputs["root"]), snapshot(trained)) == before, "a failed command changed files on disk"
  assert not list(outputs["root"].glob("never-*")), "a failed command created its output"


def test_second_run_on_a_held_workdir_is_refused(trained, capsys):
  """A live holder of the workdir's lock (here this process, through its own open of the file):
  the second run is refused naming the holder's pid and host, and touches nothing."""
  import socket
  from dcmodel.train.lock import RunLock
  holder = RunLock(trained)
  holder.acquire()
  try:
    before = snapshot(trained)
    code = cli.main(["train", CNN, "--workdir", str(trained), "--set", "train.steps=8", "--set", "train.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in err
    assert snapshot(trained) == before
  finally:
    holder.release()
