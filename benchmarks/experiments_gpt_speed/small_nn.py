"""Does the NN weight gradient (layers.matmul) also speed up the documents' small models? The peers
benchmark's bare step (peers.run_xla) for the MLP and the recommender, against the same step with
every dense layer's `x @ w` through layers.matmul, in one process, interleaved over rounds.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.small_nn [--models mlp,rec]
"""

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import peers  # noqa: E402
from dcmodel.models import layers  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="mlp,rec")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    for model in args.models.split(","):
      data = Path(tmp) / f"{model}.npz"
      peers.export(model, data)
      runs = {"xla": [], "nn": []}
      for _ in range(args.rounds):
        for name, mm in (("xla", jnp.matmul), ("nn", layers.matmul)):
          runs[name].append(peers.run_xla(model, data, peers.MODELS[model][1], matmul=mm)["examples_per_s"])
      for name, v in runs.items():
        print(f"{model} {name:4s} best {max(v):9.0f} median {np.median(v):9.0f} examples/s  (x{max(v) / max(runs['xla']):.3f} best, "
              f"x{np.median(v) / np.median(runs['xla']):.3f} median)", flush=True)


if __name__ == "__main__":
  main()
