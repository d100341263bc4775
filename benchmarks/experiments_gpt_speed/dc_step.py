"""dcmodel's own jitted GPT train step (make_train_step) on one device, on device-resident random
token batches: the number every prototype here is compared with. Prints tokens/s and MFU.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.dc_step [--variant gpt|llama] [--hlo FILE] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dcmodel import experiment  # noqa: E402
from dcmodel.perf import accounting  # noqa: E402
from dcmodel.train import state as state_lib  # noqa: E402
from dcmodel.train import tasks  # noqa: E402
from dcmodel.train.step import make_train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = ["model.d_model=512", "model.d_ff=2048", "model.num_heads=8", "model.num_layers=4", "model.max_len=128",
         "data.global_batch_size=32", "mesh.data=1"]
VARIANTS = {"gpt": ["model.mlp=gelu", "model.positions=learned"],
            "llama": ["model.mlp=swiglu", "model.positions=rope", "model.d_ff=1536", "model.tie_embeddings=false"]}


def build(variant: str, extra=()):
  return experiment.load(os.path.join(ROOT, "experiments", "stdlib_gpt.py"), SHAPE + VARIANTS[variant] + list(extra))


def random_batch(cfg, rng=None) -> dict:
  """A gpt batch of random tokens, one document per row (segment ids all 1, positions 0..T-1)."""
  b, t = cfg.data.global_batch_size, cfg.model.max_len
  rng = rng or np.random.default_rng(0)
  return {"x": rng.integers(0, 256, (b, t)).astype(np.int32), "y": rng.integers(0, 256, (b, t)).astype(np.int32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "weights": np.ones((b, t), np.float32), "target_bytes": np.ones((b, t), np.float32), "mask": np.ones((b,), np.float32)}


def step_and_batch(cfg, inputs=None, devices: int = 1):
  """dcmodel's jitted train step on `devices` devices (the config's mesh must fit them) and a
  device-resident batch. `inputs`: the model inputs the step passes (default the batch spec's:
  x, segment_ids, positions)."""
  placed = state_lib.place(cfg, jax.devices()[:devices])
  with placed.context():
    state = placed.init()
    data = placed.data_sharding
    step = make_train_step(placed.graphdef, tasks.get(cfg.model.task), placed.shardings, data,
                           inputs or cfg.model.batch_spec().inputs)
  batch = jax.device_put(random_batch(cfg), data)
  return placed.mesh, placed.rules, step, state, batch


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="gpt")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--hlo", help="write the optimized HLO here")
  p.add_argument("--set", action="append", default=[])
  args = p.parse_args()
  cfg = build(args.variant, args.set)
  mesh, rules, step, state, batch = step_and_batch(cfg)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    if args.hlo:
      with open(args.hlo, "w") as f:
        f.write(step.lower(state, batch).compile().as_text())
    for _ in range(2):
      state, sums = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
      t = time.perf_counter()
      state, sums = step(state, batch)
      jax.block_until_ready((state, sums))
      times.append(time.perf_counter() - t)
  flops = accounting.account(cfg).flops_per_step
  tokens = cfg.data.global_batch_size * cfg.model.max_len
  med = float(np.median(times))
  print(f"{args.variant}: step {med * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}), "
        f"{tokens / med:.0f} tokens/s, {flops / med / 1e9:.1f} GFLOP/s ({flops / 1e9:.1f} GFLOP/step)")


if __name__ == "__main__":
  main()
