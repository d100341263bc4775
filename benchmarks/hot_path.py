"""The hot path, before and after: this tree's train loop (TensorBoard sink, learning rate and
gradient norm in the step's sums, MFU, the preemption check, the profiler hook idle) against the
commit before it, in the same run, interleaved.

- quickstart: `experiments/digits_cnn.py` as `make quickstart` runs it (8 simulated devices,
  400 steps, metrics every 50, a checkpoint at 200): steps/s;
- peers: the documents' MLP, CNN and recommender at batch 32 on one device, as
  benchmarks/peers.py runs dcmodel (32, 32 and 64 steps per jitted call, no checkpoints):
  examples/s.

Each measurement is its own process, with the tree on PYTHONPATH; rate = steps between the first
and the last train record of metrics.jsonl over the time between them (compilation and the first
window excluded, both trees write the same records' times). Rounds alternate which tree goes first.

Run: python -m benchmarks.hot_path [--rounds 5] [--base COMMIT]   (default base: the commit
before the runtime work, b336ce7). Writes results/hot_path.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import sys
import tempfile
from pathlib import Path

from dcmodel import hostenv

ROOT = Path(__file__).resolve().parents[1]
BASE = "b336ce7"
# name -> (experiment, devices, overrides)
CASES = {
    "quickstart": ("digits_cnn", 8, []),
    "peer-mlp": ("digits_mlp", 1, ["train.steps=640", "train.steps_per_dispatch=32", "train.log_every=64"]),
    "peer-cnn": ("digits_cnn", 1, ["train.steps=640", "train.steps_per_dispatch=32", "train.log_every=64"]),
    "peer-rec": ("recommender_mlp", 1, ["train.steps=1536", "train.steps_per_dispatch=64", "train.log_every=128"]),
}
PEER = ["data.global_batch_size=32", "data.eval_batch_size=128", "train.eval_every=0", "checkpoint.enabled=false",
        "optimizer.name=adam", "optimizer.learning_rate=0.001", "optimizer.schedule=constant", "optimizer.weight_decay=0.0",
        "mesh.data=1", "mesh.model=1"]


def child(case: str) -> dict:
  """In a fresh process whose PYTHONPATH names the tree under test."""
  experiment_name, devices, overrides = CASES[case]
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  import jax
  from dcmodel import experiment
  from dcmodel.train.loop import train
  sets = ["train.progress=false", *(PEER if case.startswith("peer") else []), *overrides]
  cfg = experiment.load(Path.cwd() / "experiments" / f"{experiment_name}.py", sets)
  # CPU seconds of this process per step, from the first metrics window to the last call: less
  # moved than wall time by other work on a shared machine (it counts what this run did).
  first, last = cfg.train.log_every, cfg.train.steps - cfg.train.steps_per_dispatch
  cpu = {}
  mark = lambda step, batch: cpu.setdefault(step, time.process_time()) if step in (first, last) else None
  with tempfile.TemporaryDirectory() as work:
    train(cfg, work, batch_hooks=(mark,), devices=jax.devices()[:devices])
    records = [json.loads(line) for line in (Path(work) / "metrics.jsonl").read_text().splitlines() if line.strip()]
  logs = [r for r in records if r.get("split") == "train"]
  steps = logs[-1]["step"] - logs[0]["step"]
  seconds = logs[-1]["time"] - logs[0]["time"]
  return {"steps_per_s": steps / seconds, "examples_per_s": steps * cfg.data.global_batch_size / seconds,
          "cpu_us_per_step": (cpu[last] - cpu[first]) / (last - first) * 1e6,
          "dcmodel": str(Path(sys.modules["dcmodel"].__file__).parent)}


def measure(tree: Path, case: str, cache: str) -> dict:
  env = {**os.environ, "PYTHONPATH": str(tree), "DCMODEL_CACHE_DIR": cache}
  env.pop("XLA_FLAGS", None)
  # -P: not this folder first on sys.path (its compression.py would shadow the zstd module jax imports)
  out = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), "--one", case], cwd=tree, env=env,
                       capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{case} in {tree} failed:\n{out.stderr[-3000:]}")
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["dcmodel"].startswith(str(tree)), f"{got['dcmodel']} is not the tree under test {tree}"
  return got


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--base", default=BASE, help="the commit to compare with")
  p.add_argument("--only", action="append", default=[], help="only these cases (quickstart, peer-mlp, peer-cnn, peer-rec)")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    print(json.dumps(child(args.one)))
    return 0
  cases = [c for c in CASES if not args.only or c in args.only]
  with tempfile.TemporaryDirectory(prefix="dcmodel-hot-path-") as tmp:
    base = Path(tmp) / "base"
    base.mkdir()
    archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    trees = {"base": base, "this": ROOT}
    cache = str(Path(tmp) / "cache")
    for case in cases:           # untimed: the calibration this tree caches once per host, and a warm start
      measure(ROOT, case, cache)
    runs = {c: {t: [] for t in trees} for c in cases}
    cpu = {c: {t: [] for t in trees} for c in cases}
    for r in range(args.rounds):
      for case in cases:
        for name in (["base", "this"] if r % 2 == 0 else ["this", "base"]):
          got = measure(trees[name], case, cache)
          key = "steps_per_s" if case == "quickstart" else "examples_per_s"
          runs[case][name].append(got[key])
          cpu[case][name].append(got["cpu_us_per_step"])
          print(f"round {r + 1} {case:10s} {name:4s} {key} {got[key]:10.1f}  CPU {got['cpu_us_per_step']:8.1f} us/step", flush=True)
  rows = {}
  for case in cases:
    b, t = runs[case]["base"], runs[case]["this"]
    ratios = [x / y for x, y in zip(t, b)]
    rows[case] = {"metric": "steps_per_s" if case == "quickstart" else "examples_per_s", "base": b, "this": t,
                  "base_median": statistics.median(b), "this_median": statistics.median(t),
                  "ratio_of_medians": statistics.median(t) / statistics.median(b), "round_ratios": ratios,
                  "base_spread": (max(b) - min(b)) / statistics.median(b), "this_spread": (max(t) - min(t)) / statistics.median(t),
                  "cpu_us_per_step": cpu[case], "cpu_ratio_of_medians": statistics.median(cpu[case]["this"]) / statistics.median(cpu[case]["base"])}
    print(f"{case:10s} {rows[case]['metric']}: base {rows[case]['base_median']:.1f} (spread {rows[case]['base_spread']:.0%}), "
          f"this {rows[case]['this_median']:.1f} (spread {rows[case]['this_spread']:.0%}): "
          f"ratio {rows[case]['ratio_of_medians']:.3f}, per round {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"CPU per step this/base {rows[case]['cpu_ratio_of_medians']:.3f}", flush=True)
  from benchmarks.common import write
  write("hot_path", {"base_commit": args.base, "rounds": args.rounds, "cases": rows})
  return 0


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
