"""Which PyTorch configuration runs the peers benchmark's models fastest on this host: intra-op
threads 1 or all, eager (fused Adam) or torch.compile in each CPU mode. Each configuration in its
own process (benchmarks.peers --one ... --threads --mode), interleaved over rounds, started only
when the shared host is quiet; the best round is reported (the least disturbed), with the median.
The compile mode that wins is peers.TORCH_COMPILE_MODE; threads 1 and 2 both run in the benchmark.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.torch_peer_configs [--models mlp,cnn,rec]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import peers
from benchmarks.experiments_gpt_speed import quiet

CONFIGS = [(None, 1), (None, 2), ("default", 1), ("default", 2), ("max-autotune-no-cudagraphs", 1)]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="mlp,cnn,rec")
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  env = {**os.environ, "PYTHONPATH": str(peers.ROOT)}
  with tempfile.TemporaryDirectory() as tmp:
    for model in args.models.split(","):
      data = Path(tmp) / f"{model}.npz"
      peers.export(model, data)
      runs = {c: [] for c in CONFIGS}
      for _ in range(args.rounds):
        for mode, threads in CONFIGS:
          quiet.wait()
          cmd = [sys.executable, "-m", "benchmarks.peers", "--one", "torch-eager", model, str(data), "--epochs",
                 str(peers.MODELS[model][1]), "--threads", str(threads)] + (["--mode", mode] if mode else [])
          out = subprocess.run(cmd, env=env, capture_output=True, text=True)
          r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}
          runs[(mode, threads)].append(r)
      for (mode, threads), rs in runs.items():
        ok = [r["examples_per_s"] for r in rs if "examples_per_s" in r]
        info = rs[0].get("compile", rs[0].get("error", ""))
        print(f"{model} mode={mode or 'eager':28s} threads={threads}: best {max(ok) if ok else float('nan'):8.0f} "
              f"median {np.median(ok) if ok else float('nan'):8.0f} examples/s  first epoch {rs[0].get('first_epoch_s', float('nan')):.1f} s  {info}",
              flush=True)


if __name__ == "__main__":
  main()
