"""The PyTorch GPT's train step (benchmarks/torch_gpt.py) on random token batches: tokens/s, and
optionally torch.profiler's per-op table.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.torch_step [--variant gpt] [--compile MODE] [--profile]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.experiments_gpt_speed.dc_step import build
from benchmarks.torch_gpt import GPT


def make_step(variant: str = "gpt", compile_mode: str | None = None, fused: bool = False, bf16: bool = False):
  """The PyTorch GPT's train step on one fixed random batch, 2 threads: a function of nothing."""
  torch.set_num_threads(2)
  model = GPT.from_config(build(variant).model)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, fused=fused or None)
  fwd = model if compile_mode is None else torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.integers(0, 256, (32, 128)).astype(np.int64))
  y = torch.from_numpy(rng.integers(0, 256, (32, 128)).astype(np.int64))

  def step():
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
      logits = fwd(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss
  step.model = model
  return step


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="gpt")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--compile", default=None, help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
  p.add_argument("--fused", action="store_true", help="AdamW(fused=True)")
  p.add_argument("--profile", action="store_true")
  p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
  args = p.parse_args()
  step = make_step(args.variant, args.compile, args.fused, args.bf16)
  print("params", sum(p.numel() for p in step.model.parameters()))
  for _ in range(2):
    step()
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  med = float(np.median(times))
  print(f"torch {args.variant} compile={args.compile} fused={args.fused}: step {med * 1e3:.0f} ms "
        f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}), {32 * 128 / med:.0f} tokens/s")
  if args.profile:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
      step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))


if __name__ == "__main__":
  main()
