"""A profiler trace of 5 steps of the default GPT (experiments/stdlib_gpt.py, 8 simulated devices),
and its top ops beside their roofline predictions: what `dcmodel train --profile-steps 1:6` and
`dcmodel bench --trace WORKDIR` show a user.

The trace starts after the first step (its compilation is not a step's time) and covers steps
2-6; ops are timed per step and device (perf.trace), each predicted from its FLOPs and bytes in the
compiled HLO at this host's calibrated peak and bandwidth per device (perf.peak).
Run: python -m benchmarks.trace [--experiment experiments/stdlib_gpt.py]. Writes results/trace_gpt.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dcmodel import hostenv

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--experiment", default=str(ROOT / "experiments" / "stdlib_gpt.py"))
  p.add_argument("--top", type=int, default=12)
  args = p.parse_args(argv)
  env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  with tempfile.TemporaryDirectory(prefix="dcmodel-trace-") as work:
    cli = [sys.executable, "-m", "dcmodel.cli"]
    subprocess.run([*cli, "train", args.experiment, "--workdir", work, "--set", "train.steps=6", "--set", "train.progress=false",
                    "--set", "train.final_eval=false", "--set", "checkpoint.enabled=false", "--profile-steps", "1:6"],
                   cwd=ROOT, env=env, check=True)
    shown = subprocess.run([*cli, "bench", "--trace", work, "--top", str(args.top)], cwd=ROOT, env=env, check=True,
                           capture_output=True, text=True).stdout
    report = json.loads(subprocess.run([*cli, "bench", "--trace", work, "--top", str(args.top), "--json"], cwd=ROOT, env=env,
                                       check=True, capture_output=True, text=True).stdout)
    files = sorted(str(f.relative_to(work)) for f in Path(work).rglob("*") if f.is_file() and "profile" in f.parts)
  print(shown)
  from benchmarks.common import write
  from dcmodel.perf.trace import median_ratio
  write("trace_gpt", {"experiment": os.path.relpath(args.experiment, ROOT), "files": files, **report,
                      "median_measured_over_predicted": median_ratio(report)})
  return 0


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
