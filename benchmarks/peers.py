"""Peers at their best, side by side in one run: the design documents' Keras code (Keras 3 on
its JAX backend) and PyTorch, eager and torch.compile'd, on this CPU, against dcmodel's train
loop and the bare jitted step, for the documents' models at batch 32 on the same data for the
same number of epochs: the documents' epochs times --epochs-scale (10), so that every timed span
lasts about a second or more (at the documents' epochs dcmodel's lasted ~0.1 s, in which one
hiccup of this shared host moved a rate by 10-30%).

- mlp: 64 -> 256 -> 128 -> 10 on the digits (doc 002's classifier), Adam 1e-3, 10 epochs;
- cnn: conv 32 -> pool -> conv 64 -> pool -> dense 10 on the 8x8 digits (doc 004's CNN, SAME
  padding so the 8x8 images survive two poolings), Adam 1e-3, 10 epochs;
- rec: 100 -> 64 -> 32 -> 1 sigmoid on the planted tabular clicks (doc 003's recommender), 3 epochs.

dcmodel runs twice: `dcmodel` as configured by default (a step with a NaN/Inf loss or gradient
is skipped, metrics read back about once an epoch, as Keras reports them), and `dcmodel-tuned`
as a user after speed would run it, with the peers' semantics: train.nonfinite=apply (the update
is applied, as in Keras and PyTorch; on XLA:CPU the skip guard makes every update wait for the
gradient's global norm), train.grad_norm=false (neither peer computes the norm unless clipping)
and one metrics read at the end (train.log_every = the run's steps: every read drains the device
queue).

Every peer runs as its tuned user would run it, not at its defaults:
- keras: `compile(steps_per_execution=k, jit_compile=True)` with k = dcmodel's steps per jitted
  call (the same amortization as train.steps_per_dispatch), no progress bar;
- torch-eager: Adam's fused CPU kernel, evaluation under torch.inference_mode, one intra-op
  thread; torch-eager-2threads: the same on both cores (OpenMP's fork/join per op can cost these
  small models more than the second core gives, or not: both run, the faster counts);
- torch-compile: one thread, the model under torch.compile (TORCH_COMPILE_MODE, the faster of
  "default" and "max-autotune-no-cudagraphs" here) and the optimizer step compiled too. Its
  compilation happens in the untimed first epoch; recompilations and graph breaks are reported.
Beside them runs the bare step (`run_xla`): the same model and Adam as one jax.jit + optax
function, as many steps per call as dcmodel, over batches already on the device: what dcmodel's
loop keeps of its own step is `dcmodel_of_xla`.

Each framework runs in its own process on the same arrays (dcmodel's cleaned, train-normalized
splits, written once to an .npz). Throughput excludes the first epoch (compilation, warm-up);
each framework's final test accuracy is reported beside it. Every framework runs --rounds times
(3), interleaved; the median examples/s is reported with the spread. MFU: the model's FLOPs per
example (dcmodel.perf.accounting) over the calibrated matmul peak. Writes results/peers.{json,png}.
Needs the `peers` extra: `pip install -e '.[peers]'` (keras, torch==2.13.0 CPU).
Run: python -m benchmarks.peers [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dcmodel import hostenv

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
# dcmodel's train.steps_per_dispatch and train.dispatch_unroll per model: 32 or 64 steps per jitted
# call (one Grain element), in a loop. The recommender's ~50 us step gains from 64 (740-757k vs
# 640-671k examples/s here); the MLP and CNN do not. The CNN's convolutions are matmuls on CPU
# (model.conv=auto), so it no longer needs the unrolling that XLA:CPU's own convolutions did
# (~8x slower in a loop): 32.5k examples/s at 32 steps per call vs 30-31k at 8 unrolled.
DISPATCH = {"mlp": (32, 1), "cnn": (32, 1), "rec": (64, 1)}   # (steps per call, unrolled)
MODELS = {"mlp": ("digits_mlp", 10), "cnn": ("digits_cnn", 10), "rec": ("recommender_mlp", 3)}
# torch.compile's mode: "max-autotune-no-cudagraphs" ran the MLP 47k vs 38k examples/s under
# "default" and the CNN alike (1 thread; experiments_gpt_speed/torch_peer_configs.py)
TORCH_COMPILE_MODE = "max-autotune-no-cudagraphs"


def export(model: str, path: Path) -> None:
  """The experiment's cleaned, normalized train/test arrays, as every framework will see them."""
  from dcmodel import experiment
  from dcmodel.data.dataset import Dataset
  cfg = experiment.load(ROOT / "experiments" / f"{MODELS[model][0]}.py")
  ds = Dataset.load(cfg.data, cfg.model.batch_spec())
  tr, te = ds.rows("train"), ds.rows("test")     # cleaned and normalized (train statistics), as the model sees them
  x = lambda cols: np.asarray(cols["x"], np.float32).reshape(len(cols["y"]), -1)
  np.savez(path, x_train=x(tr), y_train=np.asarray(tr["y"]), x_test=x(te), y_test=np.asarray(te["y"]))


# ---------------------------------------------------------------- dcmodel
def overrides(model: str, steps: int, log_every: int, tuned: bool = False) -> list[str]:
  """The experiment overrides dcmodel runs under here (and in peers_step): the peers' batch,
  optimizer and steps per call, one device, no checkpoints; `tuned` applies every update unguarded
  and without the gradient's norm (train.nonfinite=apply, train.grad_norm=false), as Keras and PyTorch do."""
  per_call, unroll = DISPATCH[model]
  return [f"data.global_batch_size={BATCH}", "data.eval_batch_size=128", f"train.steps={steps}", "train.eval_every=0",
          f"train.log_every={log_every}", f"train.steps_per_dispatch={per_call}", f"train.dispatch_unroll={unroll}",
          "train.progress=false", "checkpoint.enabled=false", "optimizer.name=adam", "optimizer.learning_rate=0.001",
          "optimizer.schedule=constant", "optimizer.weight_decay=0.0", "mesh.data=1", "mesh.model=1",
          *(["train.nonfinite=apply", "train.grad_norm=false"] if tuned else [])]


def run_dcmodel(model: str, data: Path, epochs: int, tuned: bool = False) -> dict:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  import jax
  from dcmodel import experiment
  from dcmodel.train import hooks
  from dcmodel.train.loop import train
  from dcmodel.train.metrics import read
  n = len(np.load(data)["y_train"])
  per_call = DISPATCH[model][0]
  epoch = -(-n // BATCH)                                        # Keras's steps per epoch (last batch partial)
  first = -(-epoch // per_call) * per_call                      # untimed: compilation and warm-up, about one epoch
  steps = max(first + per_call, round(epoch * epochs / per_call) * per_call)   # the peers' step count, to a whole call
  cfg = experiment.load(ROOT / "experiments" / f"{MODELS[model][0]}.py",
                        overrides(model, steps, steps if tuned else first, tuned))
  stamps = {}

  class Stamp(hooks.Hook):
    """The wall clock once step `first` is done (after its metrics read, if one is due: the standard
    hooks run first), not a per-step batch hook: those slice every stacked batch on the host, work
    the loop otherwise skips."""
    schedule = hooks.Schedule(every_steps=first)

    def __call__(self, run):
      if not stamps:
        jax.block_until_ready(run.leaves)
        stamps[run.step] = time.time()

  with tempfile.TemporaryDirectory() as work:
    result = train(cfg, work, hooks=(Stamp(),), devices=jax.devices()[:1])
    logs = [r for r in read(Path(work) / "metrics.jsonl") if r["split"] == "train"]
  # Timed: from the first step after the first metrics read (a host-device sync) to the final
  # train metrics read (which waits for the last step); compilation and the final eval excluded.
  start, end = stamps[first], logs[-1]["time"]
  timed = (steps - first) * BATCH
  # MFU: the model's matmul/conv FLOPs per example (dcmodel.perf.accounting, forward + backward),
  # against this one device's matmul peak calibrated in the same process after training.
  from dcmodel.perf import accounting, calibrate
  flops = accounting.account(cfg).flops_per_step / BATCH
  return {"examples_per_s": timed / (end - start), "test_accuracy": result.final_eval.get("accuracy"),
          "steps_per_dispatch": per_call, "flops_per_example": flops, "peak_flops": calibrate.matmul_peak()}


# ---------------------------------------------------------------- Keras 3 on JAX (the documents' code, tuned)
def run_keras(model: str, data: Path, epochs: int) -> dict:
  """The documents' Keras model, compiled as a user after speed would: XLA (jit_compile) and as
  many steps per compiled call as dcmodel runs per dispatch (steps_per_execution)."""
  os.environ["KERAS_BACKEND"] = "jax"
  import keras
  from keras import layers
  a = np.load(data)
  keras.utils.set_random_seed(0)
  if model == "mlp":
    net = keras.Sequential([keras.Input((64,)), layers.Dense(256, activation="relu"), layers.Dense(128, activation="relu"),
                            layers.Dense(10, activation="softmax")])
    loss, x_train, x_test = "sparse_categorical_crossentropy", a["x_train"], a["x_test"]
  elif model == "cnn":
    net = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(32, (3, 3), padding="same", activation="relu"),
                            layers.MaxPooling2D((2, 2)), layers.Conv2D(64, (3, 3), padding="same", activation="relu"),
                            layers.MaxPooling2D((2, 2)), layers.Flatten(), layers.Dense(10, activation="softmax")])
    loss, x_train, x_test = "sparse_categorical_crossentropy", a["x_train"].reshape(-1, 8, 8, 1), a["x_test"].reshape(-1, 8, 8, 1)
  else:
    net = keras.Sequential([keras.Input((100,)), layers.Dense(64, activation="relu"), layers.Dense(32, activation="relu"),
                            layers.Dense(1, activation="sigmoid")])
    loss, x_train, x_test = "binary_crossentropy", a["x_train"], a["x_test"]
  net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"], jit_compile=True,
              steps_per_execution=DISPATCH[model][0])
  times = []

  class Clock(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      times.append(time.perf_counter() - self.t)

  net.fit(x_train, a["y_train"], epochs=epochs, batch_size=BATCH, verbose=0, callbacks=[Clock()], shuffle=True)
  _, acc = net.evaluate(x_test, a["y_test"], verbose=0)
  return {"examples_per_s": len(x_train) * (epochs - 1) / sum(times[1:]), "test_accuracy": float(acc),
          "steps_per_execution": DISPATCH[model][0]}


# ---------------------------------------------------------------- PyTorch, eager and compiled
def run_torch(model: str, data: Path, epochs: int, mode: str | None = None, threads: int = 1) -> dict:
  """The documents' PyTorch loop at its best here: `threads` intra-op threads, and Adam's
  fused CPU kernel in eager mode. With `mode`, the model and the optimizer step run under
  torch.compile (static shapes: the last, partial batch of an epoch gets its own graph instead
  of turning every step's graph dynamic)."""
  import torch
  from torch import nn
  from benchmarks.torch_gpt import dynamo_stats
  torch.manual_seed(0)
  torch.set_num_threads(threads)
  a = {k: torch.from_numpy(v) for k, v in np.load(data).items()}
  if model == "mlp":
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    shape, loss_fn = (-1, 64), nn.CrossEntropyLoss()
  elif model == "cnn":
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 2 * 2, 10))
    shape, loss_fn = (-1, 1, 8, 8), nn.CrossEntropyLoss()
  else:
    net = nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    shape, loss_fn = (-1, 100), nn.BCEWithLogitsLoss()
  # compiled, the optimizer step is Inductor's own fused loop over the (foreach) update
  opt = torch.optim.Adam(net.parameters(), 1e-3, **({"fused": True} if mode is None else {"foreach": True}))
  compile_kw = {"mode": None if mode == "default" else mode, "dynamic": False}
  forward = net if mode is None else torch.compile(net, **compile_kw)
  opt_step = opt.step if mode is None else torch.compile(opt.step, **compile_kw)
  x, y = a["x_train"].reshape(shape), a["y_train"]
  y = y.float() if model == "rec" else y.long()
  times, warm = [], None
  for epoch in range(epochs):
    if epoch == 1 and mode is not None:
      warm = dynamo_stats()
    t = time.perf_counter()
    perm = torch.randperm(len(x))
    for i in range(0, len(x), BATCH):
      idx = perm[i:i + BATCH]
      out = forward(x[idx])
      loss = loss_fn(out.squeeze(-1) if model == "rec" else out, y[idx])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt_step()
    times.append(time.perf_counter() - t)
  with torch.inference_mode():
    out = net(a["x_test"].reshape(shape))
    pred = (out.squeeze(-1) > 0).long() if model == "rec" else out.argmax(-1)
    acc = float((pred == a["y_test"].long()).float().mean())
  result = {"examples_per_s": len(x) * (epochs - 1) / sum(times[1:]), "test_accuracy": acc, "threads": torch.get_num_threads(),
            "first_epoch_s": times[0]}
  if mode is not None:
    end = dynamo_stats()
    result["compile"] = {"mode": mode, **end, "recompiles_timed": end["frames_compiled"] - warm["frames_compiled"]}
  return result


# ---------------------------------------------------------------- bare XLA: the ceiling
def bare_program(model: str, matmul=None):
  """(initial parameters, optax.adam, forward, step) of the bare step: the documents' model as plain
  jax arrays, the CNN's convolutions as matmuls, as in dcmodel on CPU; `matmul` replaces the
  dense layers' `x @ w` (experiments_gpt_speed.small_nn). Also peers_step's reference."""
  import jax
  import jax.numpy as jnp
  import optax
  from dcmodel.models.cnn import max_pool_2x2
  from dcmodel.models.layers import conv_as_matmul
  keys = iter(jax.random.split(jax.random.key(0), 9))
  dense = lambda i, o, shape=None: (jax.random.normal(next(keys), shape or (i, o)) / np.sqrt(i), jnp.zeros(o))
  layers = {"mlp": [dense(64, 256), dense(256, 128), dense(128, 10)], "rec": [dense(100, 64), dense(64, 32), dense(32, 1)],
            "cnn": [dense(9, 32, (3, 3, 1, 32)), dense(288, 64, (3, 3, 32, 64)), dense(256, 10)]}[model]
  convs = 2 if model == "cnn" else 0

  def forward(params, x):
    if convs:
      x = x.reshape(-1, 8, 8, 1)
      for w, b in params[:convs]:
        x = max_pool_2x2(jax.nn.relu(conv_as_matmul(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b))
      x = x.reshape(x.shape[0], -1)
    for i, (w, b) in enumerate(params[convs:]):
      x = (matmul or jnp.matmul)(x, w) + b
      x = jax.nn.relu(x) if i < len(params) - convs - 1 else x
    return x

  def loss(params, x, y):
    out = forward(params, x)
    if model == "rec":
      return optax.sigmoid_binary_cross_entropy(out[:, 0], y.astype(jnp.float32)).mean()
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

  tx = optax.adam(1e-3)

  def step(carry, batch):
    params, opt = carry
    updates, opt = tx.update(jax.grad(loss)(params, *batch), opt, params)
    return (optax.apply_updates(params, updates), opt), None

  return layers, tx, forward, step


def run_xla(model: str, data: Path, epochs: int, matmul=None) -> dict:
  """The same model and Adam as a bare jax.jit + optax step, as many steps per call (lax.scan)
  as dcmodel, over batches already on the device: no input pipeline, no metrics, no framework;
  the CNN's convolutions are matmuls, as in dcmodel on CPU. Keras runs on the same XLA, so no
  framework on XLA gets much further ahead of Keras than this step does: its ratio to Keras bounds
  the others'. `matmul` replaces the dense layers' `x @ w` (experiments_gpt_speed.small_nn)."""
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  import jax
  layers, tx, forward, step = bare_program(model, matmul)
  a = np.load(data)
  calls = jax.jit(lambda carry, xs, ys: jax.lax.scan(step, carry, (xs, ys))[0], donate_argnums=0)
  x, y = a["x_train"], a["y_train"]
  per_epoch, per_call = len(x) // BATCH, DISPATCH[model][0]    # full batches only
  rng = np.random.default_rng(0)
  order = np.concatenate([rng.permutation(len(x))[:per_epoch * BATCH] for _ in range(epochs)])
  n_calls = len(order) // (BATCH * per_call)
  order = order[:n_calls * BATCH * per_call].reshape(n_calls, per_call, BATCH)
  xs, ys = jax.device_put(x[order]), jax.device_put(y[order])
  jax.block_until_ready((xs, ys))
  carry = (layers, tx.init(layers))
  first = -(-per_epoch // per_call)                             # untimed: compilation and about one epoch
  for i in range(first):
    carry = calls(carry, xs[i], ys[i])
  jax.block_until_ready(carry)
  start = time.perf_counter()
  for i in range(first, n_calls):
    carry = calls(carry, xs[i], ys[i])
  jax.block_until_ready(carry)
  seconds = time.perf_counter() - start
  out = forward(carry[0], a["x_test"])
  pred = out[:, 0] > 0 if model == "rec" else out.argmax(-1)
  return {"examples_per_s": (n_calls - first) * per_call * BATCH / seconds, "test_accuracy": float((np.asarray(pred) == a["y_test"]).mean())}


RUNNERS = {"dcmodel": run_dcmodel, "dcmodel-tuned": lambda model, data, epochs: run_dcmodel(model, data, epochs, tuned=True),
           "xla": run_xla, "keras": run_keras, "torch-eager": run_torch,
           "torch-eager-2threads": lambda model, data, epochs: run_torch(model, data, epochs, threads=2),
           "torch-compile": lambda model, data, epochs: run_torch(model, data, epochs, TORCH_COMPILE_MODE)}
PEERS = ("keras", "torch-eager", "torch-eager-2threads", "torch-compile")


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="fewer epochs (3; 2 for rec)")
  p.add_argument("--rounds", type=int, default=3, help="interleaved runs of every framework (median reported)")
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--epochs-scale", type=int, default=10, help="the documents' epochs times this (timed spans of ~1 s or more)")
  p.add_argument("--frameworks", default=",".join(RUNNERS))
  p.add_argument("--one", nargs=3, metavar=("FRAMEWORK", "MODEL", "DATA"), help=argparse.SUPPRESS)
  p.add_argument("--epochs", type=int, default=None, help=argparse.SUPPRESS)
  # how TORCH_COMPILE_MODE was chosen: --one torch-eager ... --threads 1 --mode default
  p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    framework, model, data = args.one
    if framework.startswith("torch") and (args.threads or args.mode):
      out = run_torch(model, Path(data), args.epochs, args.mode, args.threads or 1)
    else:
      out = RUNNERS[framework](model, Path(data), args.epochs)
    print(json.dumps(out))
    return 0
  env = {**os.environ, "KERAS_BACKEND": "jax"}
  missing = [m for m in ("keras", "torch") if subprocess.call([sys.executable, "-c", f"import {m}"], stderr=subprocess.DEVNULL, env=env)]
  if missing:
    print(f"peers need the optional extra: pip install -e '.[peers]' (missing: {', '.join(missing)})", file=sys.stderr)
    return 2
  from benchmarks.common import write
  frameworks = args.frameworks.split(",")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for model in args.models.split(","):
      epochs = MODELS[model][1]
      epochs = min(epochs, 3 if model != "rec" else 2) if args.quick else epochs * args.epochs_scale
      data = Path(tmp) / f"{model}.npz"
      export(model, data)
      runs = {framework: [] for framework in frameworks}
      for _ in range(args.rounds):   # interleaved, so the shared host's load drifts over every framework alike
        for framework in frameworks:
          runs[framework].append(run_child(framework, model, data, epochs))
      rows.append(summarize(model, epochs, args.rounds, runs))
      report(rows[-1])
  write("peers" + ("_quick" if args.quick else ""), {"rows": rows})
  plot(rows, "_quick" if args.quick else "")
  ok = all(any(r.get(f"{p}vs_best_peer", 0) >= 1.0 and r.get(f"{p}dcmodel_of_xla", 0) >= 0.95 for p in ("", "tuned_")) for r in rows)
  return 0 if ok else 1


def run_child(framework: str, model: str, data: Path, epochs: int) -> dict:
  """One framework's run in its own process on one CPU device; a failure (say torch.compile
  on this host) is recorded with its message, not hidden."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "jax"}
  env.pop("XLA_FLAGS", None)   # one CPU device for every framework
  out = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--one", framework, model, str(data), "--epochs", str(epochs)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
  if out.returncode:
    lines = out.stderr.strip().splitlines()
    return {"error": lines[-1] if lines else f"exit code {out.returncode}", "stderr_tail": out.stderr[-2000:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(model: str, epochs: int, rounds: int, runs: dict) -> dict:
  row = {"model": model, "batch": BATCH, "epochs": epochs, "rounds": rounds}
  for framework, rs in runs.items():
    ok = [r for r in rs if "examples_per_s" in r]
    if not ok:
      row[framework] = {"error": rs[0]["error"], "stderr_tail": rs[0]["stderr_tail"]}
      continue
    speeds = sorted(r["examples_per_s"] for r in ok)
    row[framework] = {**ok[0], "examples_per_s": float(np.median(speeds)), "examples_per_s_runs": speeds,
                      "spread": (speeds[-1] - speeds[0]) / float(np.median(speeds)), "failed_runs": len(rs) - len(ok),
                      "test_accuracy": float(np.median([r["test_accuracy"] for r in ok]))}
  dc = row.get("dcmodel", row.get("dcmodel-tuned", {}))
  rate = lambda f: row.get(f, {}).get("examples_per_s")
  for framework in runs:   # same model, same FLOPs per example, same calibrated peak
    if rate(framework) and "flops_per_example" in dc:
      row[framework]["mfu"] = rate(framework) * dc["flops_per_example"] / dc["peak_flops"]
  peers = {f: rate(f) for f in PEERS if rate(f)}
  if peers:
    row["best_peer"] = max(peers, key=peers.get)
  for mine, prefix in (("dcmodel", ""), ("dcmodel-tuned", "tuned_")):
    if rate(mine):
      for f, r in peers.items():
        row[f"{prefix}vs_{f}"] = rate(mine) / r
      if peers:
        row[f"{prefix}vs_best_peer"] = rate(mine) / peers[row["best_peer"]]
      if rate("xla"):
        row[f"{prefix}dcmodel_of_xla"] = rate(mine) / rate("xla")
        # each round's pair ran back to back: the ratio within a round drifts less than the rates across rounds
        row[f"{prefix}dcmodel_of_xla_rounds"] = [m["examples_per_s"] / x["examples_per_s"] for m, x in zip(runs[mine], runs["xla"])
                                                 if "examples_per_s" in m and "examples_per_s" in x]
  if rate("xla") and rate("keras"):
    row["xla_vs_keras"] = rate("xla") / rate("keras")   # Keras runs the same XLA: the bound on vs_keras
  return row


def report(row: dict) -> None:
  print(f"{row['model']} ({row['epochs']} epochs, batch {row['batch']}, median of {row['rounds']} interleaved rounds):", flush=True)
  for f in RUNNERS:
    r = row.get(f)
    if r is None:
      continue
    if "error" in r:
      print(f"  {f:14s} FAILED: {r['error']}")
      continue
    extra = f"  compile {r['compile']}" if "compile" in r else ""
    print(f"  {f:14s} {r['examples_per_s']:9.0f} examples/s (spread {r['spread']:4.0%})  test acc {r['test_accuracy']:.4f}  "
          f"MFU {r.get('mfu', float('nan')):5.1%}{extra}")
  for mine, prefix in (("dcmodel", ""), ("dcmodel-tuned", "tuned_")):
    if f"{prefix}vs_best_peer" in row:
      print(f"  {mine} = {row[f'{prefix}vs_best_peer']:.2f}x the best peer ({row['best_peer']}); "
            + ", ".join(f"{row[f'{prefix}vs_{f}']:.2f}x {f}" for f in PEERS if f"{prefix}vs_{f}" in row)
            + (f"; {row[f'{prefix}dcmodel_of_xla']:.0%} of the bare step (per round "
               f"{', '.join(f'{x:.0%}' for x in row[f'{prefix}dcmodel_of_xla_rounds'])})" if f"{prefix}dcmodel_of_xla" in row else ""),
            flush=True)


def plot(rows, suffix: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from benchmarks.common import RESULTS
  fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 4), squeeze=False)
  for ax, row in zip(axes[0], rows):
    names = [f for f in RUNNERS if "examples_per_s" in row.get(f, {})]
    med = [row[f]["examples_per_s"] for f in names]
    lo = [m - row[f]["examples_per_s_runs"][0] for m, f in zip(med, names)]
    hi = [row[f]["examples_per_s_runs"][-1] - m for m, f in zip(med, names)]
    colors = ["tab:blue" if f in ("dcmodel", "dcmodel-tuned", "xla") else "tab:orange" for f in names]
    bars = ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3, color=colors)
    for b, f in zip(bars, names):
      ax.annotate(f"{row[f]['test_accuracy']:.1%}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                  fontsize=7, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(names)), ["bare step" if f == "xla" else f for f in names], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="training examples/s", title=f"{row['model']}, batch {row['batch']} (test accuracy on bars)")
  fig.tight_layout()
  fig.savefig(RESULTS / f"peers{suffix}.png", dpi=110)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
