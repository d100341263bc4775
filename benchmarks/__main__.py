"""The benchmark suite in one command: `dcmodel bench [--quick]` (or `python -m benchmarks`).

Each benchmark runs in its own process (its own simulated devices and memory) and writes its
JSON (and plots) under benchmarks/results/; this runner collects their exit codes and wall times
into results/summary.json. --quick is the CI-sized suite (< 3 minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dcmodel import hostenv

ROOT = Path(__file__).resolve().parents[1]
# (module, quick arguments or None to skip in quick mode, full arguments)
SUITE = [
    ("benchmarks.step_time", ["--quick"], []),
    ("benchmarks.published_runs", [], []),
    ("benchmarks.inference", ["--quick"], []),
    ("benchmarks.serve", None, []),
    ("benchmarks.dataflow", ["--quick"], []),
    ("benchmarks.compression", ["--quick"], []),
    ("benchmarks.interop", ["--quick"], []),
    ("benchmarks.peers", None, []),
    ("benchmarks.lm_peers", None, ["--variant", "gpt"]),      # each variant < 15 minutes here
    ("benchmarks.lm_peers", None, ["--variant", "llama"]),
    ("benchmarks.lm_decode", None, []),
    ("benchmarks.pipeline_bubble", None, []),
    ("benchmarks.roofline", None, []),
    ("benchmarks.soak", None, []),
]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="dcmodel bench")
  p.add_argument("--quick", action="store_true", help="the CI-sized suite")
  p.add_argument("--only", action="append", default=[], help="run only these benchmarks (e.g. step_time)")
  args = p.parse_args(argv)
  env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  results = []
  for module, quick, full in SUITE:
    name = module.split(".")[1]
    if (args.only and name not in args.only) or (args.quick and quick is None):
      continue
    t = time.perf_counter()
    print(f"== {name}", flush=True)
    code = subprocess.call([sys.executable, "-m", module, *(quick if args.quick else full)], cwd=ROOT, env=env)
    results.append({"benchmark": name, "exit_code": code, "wall_s": round(time.perf_counter() - t, 1)})
  out = ROOT / "benchmarks" / "results" / ("summary_quick.json" if args.quick else "summary.json")
  out.parent.mkdir(exist_ok=True)
  out.write_text(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "runs": results}, indent=2) + "\n")
  for r in results:
    print(f"{r['benchmark']:16s} {'ok' if r['exit_code'] == 0 else 'FAILED (exit %d)' % r['exit_code']:14s} {r['wall_s']:7.1f}s")
  return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
