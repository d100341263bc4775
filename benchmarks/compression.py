"""Compressed gradient all-reduce (the documents' gradient compression): bytes per step and
convergence of bf16 and int8 (with error feedback) against float32, same data and steps.
Run: python -m benchmarks.compression [--steps 100]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402

from benchmarks.common import write  # noqa: E402
from dcmodel import hostenv  # noqa: E402
from dcmodel import experiment as experiment_lib  # noqa: E402
from dcmodel.parallel import data_parallel  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--experiment", default="digits_mlp")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--quick", action="store_true", help="30 steps, results to compression_quick.json")
  args = p.parse_args(argv)
  if args.quick:
    args.steps = 30
  cfg = experiment_lib.load(ROOT / "experiments" / f"{args.experiment}.py",
                                   ["mesh.model=1", f"train.steps={args.steps}", "checkpoint.enabled=false"])
  runs = {mode: data_parallel.train(cfg, mode) for mode in ("none", "bf16", "int8")}
  base = runs["none"]
  rows = []
  for mode, r in runs.items():
    train_loss = float(np.mean(r.losses[-20:]))
    rows.append({"compression": mode, "bytes_per_step_per_device": r.bytes_per_step,
                 "bytes_reduction": base.bytes_per_step / r.bytes_per_step,
                 "train_loss_last20": train_loss, "test_loss": r.final_eval["loss"],
                 "test_accuracy": r.final_eval.get("accuracy"),
                 "test_loss_vs_float32": r.final_eval["loss"] / base.final_eval["loss"] - 1,
                 "train_loss_vs_float32": train_loss / float(np.mean(base.losses[-20:])) - 1})
    print(f"{mode:5s}: {r.bytes_per_step / 1e3:8.1f} kB/step/device ({base.bytes_per_step / r.bytes_per_step:.0f}x less), "
          f"test loss {r.final_eval['loss']:.4f} ({rows[-1]['test_loss_vs_float32']:+.2%}), "
          f"train loss {train_loss:.4f} ({rows[-1]['train_loss_vs_float32']:+.2%})")
  write("compression_quick" if args.quick else "compression", {"experiment": args.experiment, "steps": args.steps, "devices": 8, "rows": rows})


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  main()
