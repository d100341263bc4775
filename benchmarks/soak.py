"""Soak: the quickstart model for 2,000 steps, checkpointing every 100.

Pass criteria (issue 5): resident memory after warm-up grows < 5% (median RSS over the first
hundred steps after warm-up vs the last hundred); the median step time of the last hundred
steps is within 10% of the first hundred (after the compile step).
Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.soak [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from dcmodel import config as config_lib  # noqa: E402
from dcmodel.train.loop import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--every", type=int, default=100)
  p.add_argument("--warmup", type=int, default=200, help="steps before the memory baseline (a multiple of 100)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
  args = p.parse_args(argv)

  cfg = config_lib.apply_overrides(config_lib.load_experiment(ROOT / "experiments" / "digits_cnn.py"), [
      f"train.steps={args.steps}", f"checkpoint.every_steps={args.every}", "train.log_every=100",
      "checkpoint.max_to_keep=2", "train.progress=true", *args.set])
  proc = psutil.Process()
  stamps, rss = [], {}

  def record(step, _batch):
    stamps.append(time.perf_counter())
    if step % 10 == 0:
      rss[step] = proc.memory_info().rss

  with tempfile.TemporaryDirectory() as work:
    result = train(cfg, work, hooks=(record,))
  dt = np.diff(stamps)       # dt[k]: step k+1 to k+2, dispatch to dispatch (the final save/eval excluded)
  first, last = dt[1:100], dt[-100:]
  # Growth compares the median RSS of the first hundred steps after warm-up with that of the
  # last hundred (samples every 10 steps), so one sample taken mid-save does not decide it.
  window = lambda lo: float(np.median([v for k, v in rss.items() if lo <= k < lo + 100]))
  base, end = window(args.warmup), window(args.steps - 100)
  peak = max(v for k, v in rss.items() if k >= args.warmup)
  report = {
      "steps": args.steps, "checkpoint_every": args.every, "final_eval": result.final_eval,
      "rss_mib_after_warmup": base / 2**20, "rss_mib_last_100": end / 2**20,
      "rss_growth": end / base - 1, "rss_peak_growth": peak / base - 1,
      "rss_mib_by_step": {k: round(v / 2**20, 1) for k, v in sorted(rss.items()) if k % 100 == 0},
      "step_ms_median_first_100": 1e3 * float(np.median(first)),
      "step_ms_median_last_100": 1e3 * float(np.median(last)),
      "step_ms_p90_first_100": 1e3 * float(np.percentile(first, 90)),
      "step_ms_p90_last_100": 1e3 * float(np.percentile(last, 90)),
      "step_time_drift": float(np.median(last) / np.median(first) - 1),
      "step_ms_median_by_hundred": [round(1e3 * float(np.median(dt[i:i + 100])), 2) for i in range(0, len(dt), 100)],
      "wall_s": result.wall_s, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
  }
  report["pass"] = bool(report["rss_growth"] < 0.05 and abs(report["step_time_drift"]) <= 0.10)
  Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps({k: v for k, v in report.items() if k != "rss_mib_by_step"}, indent=2))
  return 0 if report["pass"] else 1


if __name__ == "__main__":
  raise SystemExit(main())
