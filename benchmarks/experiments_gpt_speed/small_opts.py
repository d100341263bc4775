"""Would the transformers' CPU compiler option (TransformerConfig.CPU_COMPILER_OPTIONS: YNNPACK
fuses dots only) slow the documents' small models? (It did the CNN, 0.81x, so it is the
transformers' only.) The peers benchmark's bare step (peers.run_xla) for
the MLP, CNN and recommender, each run in a fresh process with and without the option in
XLA_FLAGS, alternating over rounds.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.small_opts [--models mlp,cnn,rec] [--rounds 3]
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
from dcmodel.models.transformer import TransformerConfig

CPU_COMPILER_OPTIONS = TransformerConfig.CPU_COMPILER_OPTIONS

CHILD = ("import json, sys; from pathlib import Path; from benchmarks import peers; "
         "m, d = sys.argv[1], Path(sys.argv[2]); print(json.dumps(peers.run_xla(m, d, peers.MODELS[m][1])['examples_per_s']))")


def run(model: str, data: Path, with_option: bool) -> float:
  flags = "--xla_force_host_platform_device_count=1"
  if with_option:
    flags += "".join(f" --{k}={v}" for k, v in CPU_COMPILER_OPTIONS.items())
  out = subprocess.run([sys.executable, "-c", CHILD, model, str(data)], env={**os.environ, "XLA_FLAGS": flags},
                       capture_output=True, text=True, check=True)
  return float(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="mlp,cnn,rec")
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    for model in args.models.split(","):
      data = Path(tmp) / f"{model}.npz"
      peers.export(model, data)
      runs = {"default": [], "option": []}
      for _ in range(args.rounds):
        for name in runs:
          runs[name].append(run(model, data, name == "option"))
      ratios = [b / a for a, b in zip(runs["default"], runs["option"])]
      print(json.dumps({"model": model, "examples_per_s": runs, "option_over_default_paired_median": float(np.median(ratios))}),
            flush=True)


if __name__ == "__main__":
  main()
