"""Where dcmodel's train loop loses against its own bare step on a small model (the documents'
MLP at batch 32, 32 steps per jitted call, one device), measured three ways in one process,
interleaved over rounds:

- bare: peers.run_xla's step (jax.jit + optax + lax.scan over device-resident batches);
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
    results = {"bare": [], "loop": [], "loop+hook": []}
    for _ in range(args.rounds):
      results["bare"].append(peers.run_xla(args.model, data, args.epochs)["examples_per_s"])
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
