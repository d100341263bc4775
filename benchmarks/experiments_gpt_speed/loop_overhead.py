"""Where dcmodel's train loop loses against its own bare step on a small model (the documents'
MLP at batch 32, 32 steps per jitted call, one device), measured three ways in one process,
interleaved over rounds:

- bare: peers.run_xla's step (jax.jit + optax + lax.scan over device-resident batches);
- step: dcmodel's own multi-step jitted call (make_train_step with 32 steps, as the loop builds
  it: metric sums, the non-finite guard) on device-resident batches, through on_leaves as the
  loop calls it, with no loop around it;
- loop: dcmodel.train.loop.train on the peers benchmark's config, timed from the metrics log
  (first window excluded), with no hook;
- loop+hook: the same with peers.py's timing hook (called for every step with its batch).

Then one loop run under cProfile, its host time by function (--profile).

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.loop_overhead [--epochs 40] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import peers  # noqa: E402
from dcmodel import config as config_lib  # noqa: E402
from dcmodel.train.loop import train  # noqa: E402
from dcmodel.train.metrics import read  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def loop_cfg(model: str, steps: int, per_call: int, log_every: int, extra=()):
  return config_lib.apply_overrides(config_lib.load_experiment(ROOT / "experiments" / f"{peers.MODELS[model][0]}.py"), [
      f"data.global_batch_size={peers.BATCH}", "data.eval_batch_size=128", f"train.steps={steps}", "train.eval_every=0",
      f"train.log_every={log_every}", f"train.steps_per_dispatch={per_call}", "train.progress=false", "train.final_eval=false",
      "checkpoint.enabled=false", "optimizer.name=adam", "optimizer.learning_rate=0.001", "optimizer.schedule=constant",
      "optimizer.weight_decay=0.0", "mesh.data=1", "mesh.model=1", *extra])


def run_loop(model: str, steps: int, per_call: int, hook: bool, log_every: int) -> float:
  """examples/s of the loop over all metric windows but the first (compilation, warm-up)."""
  cfg = loop_cfg(model, steps, per_call, log_every)
  stamps = {}
  hooks = ((lambda step, _b: stamps.setdefault(step, time.time())),) if hook else ()
  with tempfile.TemporaryDirectory() as work:
    train(cfg, work, hooks=hooks, devices=jax.devices()[:1])
    logs = [r for r in read(Path(work) / "metrics.jsonl") if r["split"] == "train"]
  return (logs[-1]["step"] - logs[0]["step"]) * peers.BATCH / (logs[-1]["time"] - logs[0]["time"])


def run_step(model: str, data: Path, epochs: int, per_call: int) -> float:
  """examples/s of dcmodel's jitted k-step call on device-resident batches (the peers' data)."""
  from flax import nnx
  from dcmodel.mesh import batch_sharding, build_mesh, rules_for
  from dcmodel.train import state as state_lib
  from dcmodel.train import tasks
  from dcmodel.train.step import make_train_step, on_leaves, stacked, zero_totals
  a = np.load(data)
  n = len(a["y_train"]) // peers.BATCH
  cfg = loop_cfg(model, 1000, per_call, per_call)
  mesh = build_mesh(cfg.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for(cfg.mesh, mesh)):
    graphdef, _, shardings = state_lib.abstract_state(cfg, mesh)
    state = state_lib.init_state(cfg, shardings)
    sharding = stacked(batch_sharding(mesh))
    step = make_train_step(graphdef, tasks.get(cfg.model.task), shardings, batch_sharding(mesh), ("x",), 1, per_call)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(a["y_train"]))[:n * peers.BATCH] for _ in range(epochs)])
    calls = len(order) // (peers.BATCH * per_call)
    order = order[:calls * peers.BATCH * per_call].reshape(calls, per_call, peers.BATCH)
    x = a["x_train"].reshape(len(a["y_train"]), -1)
    batches = [jax.device_put({"x": x[o], "y": a["y_train"][o], "mask": np.ones(o.shape, np.float32)}, sharding) for o in order]
    leaf_step = on_leaves(step, shardings, sharding)
    leaves, totals = jax.tree.leaves(state), zero_totals(step, state, batches[0])()
    first = -(-n // per_call)
    for i in range(first):
      leaves, totals = leaf_step(leaves, totals, batches[i])
    jax.block_until_ready(leaves)
    t = time.perf_counter()
    for i in range(first, calls):
      leaves, totals = leaf_step(leaves, totals, batches[i])
    jax.block_until_ready((leaves, totals))
    return (calls - first) * per_call * peers.BATCH / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="mlp")
  p.add_argument("--epochs", type=int, default=40)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--profile", action="store_true")
  args = p.parse_args()
  per_call = peers.DISPATCH[args.model][0]
  with tempfile.TemporaryDirectory() as tmp:
    data = Path(tmp) / "d.npz"
    peers.export(args.model, data)
    n = len(np.load(data)["y_train"])
    steps = (n // peers.BATCH * args.epochs) // (per_call * 8) * per_call * 8
    log_every = steps // 8
    results = {"bare": [], "step": [], "loop": [], "loop+hook": []}
    for _ in range(args.rounds):
      results["bare"].append(peers.run_xla(args.model, data, args.epochs)["examples_per_s"])
      results["step"].append(run_step(args.model, data, args.epochs, per_call))
      results["loop"].append(run_loop(args.model, steps, per_call, False, log_every))
      results["loop+hook"].append(run_loop(args.model, steps, per_call, True, log_every))
    best = {k: max(v) for k, v in results.items()}
    for k, v in results.items():
      print(f"{k:10s} best {best[k]:9.0f} examples/s  median {np.median(v):9.0f}  ({best[k] / best['bare']:.1%} of bare)  runs {[round(x) for x in v]}")
    if args.profile:
      cfg = loop_cfg(args.model, steps, per_call, log_every)
      prof = cProfile.Profile()
      with tempfile.TemporaryDirectory() as work:
        prof.enable()
        train(cfg, work, devices=jax.devices()[:1])
        prof.disable()
      out = io.StringIO()
      pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
      print(out.getvalue())


if __name__ == "__main__":
  main()
