"""Greedy decoding speed of a 25M-parameter GPT on this CPU: dcmodel's KV-cache generation
(dcmodel.infer.generate.Generator, prefill then one token per step in a jitted lax.scan) against
the same model in PyTorch (benchmarks/torch_gpt.py) decoding with a straightforward KV cache
under torch.inference_mode, eager and torch.compile'd, both against the memory-bound prediction.
dcmodel runs as it is configured (dense products on host BLAS on CPU) and as
`dcmodel+model.matmul=xla`, with them on XLA's dots.

Model: the lm_peers gpt variant made deeper and longer (d_model 512, 8 layers, 8 heads, GELU
2048, learned positions, tied, vocab 256, max_len 256): 25.4M parameters, freshly initialised
(speed does not depend on the weights). Each prompt is 32 tokens, followed by 224 greedy tokens
(the whole 256 context); decode tokens/s counts the 223 tokens after the first, at batch 1
and 8, one device (all cores), median of repeats after a warm-up call, blocked on.

Prediction: dcmodel.perf.accounting.decode_step_s: every float32 weight and the KV cache (at
the mean context length) read once per generated token, at the read bandwidth calibrated in
the same run (dcmodel.perf.calibrate.read_bandwidth, its own 256 MiB array), or the matmuls at
the calibrated peak if they take longer. Every contender runs in its own process, interleaved
over rounds. Writes results/lm_decode.{json,png}.

Run: python -m benchmarks.lm_decode [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dcmodel import hostenv

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.num_layers=8", "model.max_len=256"]
PROMPT, NEW = 32, 224
BATCHES = (1, 8)
# PyTorch with all cores as intra-op threads and with one: a decode step is many small ops,
# where OpenMP's fork/join per op can cost more than the second core gives
# config overrides after '+', as lm_peers names them (lm_peers.sets_of): dcmodel with its dense
# products on XLA's dots, not host BLAS
CONTENDERS = ["dcmodel", "dcmodel+model.matmul=xla", "torch-eager", "torch-eager-1thread", "torch-compile"]


def config(sets=()):
  from benchmarks.lm_peers import config as lm_config
  return lm_config("gpt", 1, 1, MODEL + list(sets))


def prompts(batch: int) -> np.ndarray:
  return (np.arange(batch)[:, None] * 7 + np.arange(PROMPT)[None, :] * 13) % 256


def run_dcmodel(repeats: int, sets=()) -> dict:
  import jax
  from dcmodel.infer.generate import Generator, Sampling
  from dcmodel.perf import accounting
  from dcmodel.train import state as state_lib
  cfg = config(sets)
  placed = state_lib.place(cfg, jax.devices()[:1])
  gen = Generator(placed, placed.init())
  out = {"params": accounting.transformer_params(cfg.model)}
  for batch in BATCHES:
    texts = [bytes(row.tolist()) for row in prompts(batch)]
    sampling = Sampling(max_new_tokens=NEW)
    gen(texts, sampling)   # compile prefill and decode
    runs = [gen(texts, sampling) for _ in range(repeats)]
    out[str(batch)] = {"decode_tokens_per_s": [r.decode_tokens_per_s for r in runs], "prefill_s": [r.prefill_s for r in runs],
                       "tokens": runs[0].tokens[:, :8].tolist()}
  return out


def run_torch(compiled: bool, repeats: int, threads: int | None = None) -> dict:
  """Prefill the prompt into the caches, then one token per step, greedy, in inference mode.
  Eager: the cache is sliced to the filled length each step (no wasted work). Compiled: the
  same code under torch.compile(dynamic=True), so the growing length is one symbolic size
  rather than a recompilation per step (recompilations are counted)."""
  import torch
  from benchmarks.torch_gpt import GPT, dynamo_stats
  torch.manual_seed(0)
  torch.set_num_threads(threads or os.cpu_count() or 1)
  model = GPT.from_config(config().model).eval()
  forward = torch.compile(model, dynamic=True) if compiled else model
  out = {"params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}

  @torch.inference_mode()
  def generate(tokens):
    caches = model.new_caches(tokens.shape[0], PROMPT + NEW)
    t0 = time.perf_counter()
    nxt = forward(tokens, caches, 0)[:, -1].argmax(-1)
    t1 = time.perf_counter()
    got = [nxt]
    for i in range(NEW - 1):
      nxt = forward(nxt[:, None], caches, PROMPT + i)[:, -1].argmax(-1)
      got.append(nxt)
    t2 = time.perf_counter()
    return torch.stack(got, 1), t1 - t0, t2 - t1

  recompiles_timed = 0
  for batch in BATCHES:
    tokens = torch.from_numpy(prompts(batch)).long()
    generate(tokens)   # warm-up (and compilation)
    warm = dynamo_stats()
    runs = [generate(tokens) for _ in range(repeats)]
    recompiles_timed += dynamo_stats()["frames_compiled"] - warm["frames_compiled"]
    out[str(batch)] = {"decode_tokens_per_s": [batch * (NEW - 1) / r[2] for r in runs], "prefill_s": [r[1] for r in runs],
                       "tokens": runs[0][0][:, :8].tolist()}
  if compiled:
    out["compile"] = {**dynamo_stats(), "recompiles_timed": recompiles_timed}
  return out


def run_calibration() -> dict:
  from dcmodel.perf import calibrate
  return {"read_bw": calibrate.read_bandwidth(256), "peak_flops": calibrate.matmul_peak((512, 1024))}


def run_one(contender: str, repeats: int) -> dict:
  if contender == "calibrate":
    return run_calibration()
  if contender.split("+")[0] == "dcmodel":
    from benchmarks.lm_peers import sets_of
    return run_dcmodel(repeats, sets_of(contender))
  return run_torch(contender == "torch-compile", repeats, 1 if contender.endswith("1thread") else None)


def child(contender: str, repeats: int) -> dict:
  env = {**os.environ, "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": (re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
                       + " --xla_force_host_platform_device_count=1").strip()}
  out = subprocess.run([sys.executable, "-m", "benchmarks.lm_decode", "--one", contender, str(repeats)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  if out.returncode:
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}",
            "stderr_tail": out.stderr[-2000:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def predict(batch: int, read_bw: float, peak: float) -> dict:
  from dcmodel.perf import accounting
  m = config().model
  params = accounting.transformer_params(m)
  kv = accounting.kv_cache_bytes(m, batch, PROMPT + NEW // 2)
  step = accounting.decode_step_s(4 * params, kv, read_bw, 2 * batch * params, peak)
  return {"decode_step_s": step, "decode_tokens_per_s": batch / step, "param_bytes": 4 * params, "kv_cache_bytes": kv}


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3, help="timed generations per batch size in each run")
  p.add_argument("--quick", action="store_true", help="1 round, 2 repeats")
  p.add_argument("--one", nargs=2, metavar=("CONTENDER", "REPEATS"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    print(json.dumps(run_one(args.one[0], int(args.one[1]))))
    return 0
  if args.quick:
    args.rounds, args.repeats = 1, 2
  runs = {c: [] for c in CONTENDERS}
  cal = []
  for r in range(args.rounds):
    cal.append(child("calibrate", 1))
    for c in CONTENDERS:
      t = time.perf_counter()
      runs[c].append(child(c, args.repeats))
      print(f"[round {r + 1}] {c}: {json.dumps({k: v for k, v in runs[c][-1].items() if k != 'stderr_tail'})[:400]} "
            f"({time.perf_counter() - t:.0f} s)", flush=True)
  read_bw = statistics.median(c["read_bw"] for c in cal)
  peak = statistics.median(c["peak_flops"] for c in cal)
  rows = []
  for batch in BATCHES:
    pred = predict(batch, read_bw, peak)
    row = {"batch": batch, "predicted": pred, "contenders": {}}
    for c, rs in runs.items():
      ok = [r for r in rs if str(batch) in r]
      if not ok:
        row["contenders"][c] = {"error": rs[0].get("error", "not run"), "stderr_tail": rs[0].get("stderr_tail", "")}
        continue
      rates = sorted(v for r in ok for v in r[str(batch)]["decode_tokens_per_s"])
      med = statistics.median(rates)
      row["contenders"][c] = {"decode_tokens_per_s": med, "runs": rates, "spread": (rates[-1] - rates[0]) / med,
                              "of_prediction": med / pred["decode_tokens_per_s"],
                              "prefill_s": statistics.median(v for r in ok for v in r[str(batch)]["prefill_s"]),
                              "first_tokens": ok[0][str(batch)]["tokens"], **({"compile": ok[0]["compile"]} if "compile" in ok[0] else {})}
    torch_best = max((c for c in row["contenders"] if c.startswith("torch") and "decode_tokens_per_s" in row["contenders"][c]),
                     key=lambda c: row["contenders"][c]["decode_tokens_per_s"], default=None)
    row["best_torch"] = torch_best
    if torch_best and "decode_tokens_per_s" in row["contenders"].get("dcmodel", {}):
      row["dcmodel_vs_best_torch"] = row["contenders"]["dcmodel"]["decode_tokens_per_s"] / row["contenders"][torch_best]["decode_tokens_per_s"]
    rows.append(row)
  params = {c: next((r["params"] for r in rs if "params" in r), None) for c, rs in runs.items()}
  from benchmarks.common import write
  result = {"model": "gpt d512 x 8 layers, vocab 256, max_len 256", "params": params, "prompt_tokens": PROMPT, "new_tokens": NEW,
            "calibration": {"read_bw": read_bw, "peak_flops": peak, "runs": cal}, "rounds": args.rounds, "rows": rows}
  write("lm_decode" + ("_quick" if args.quick else ""), result)
  print(f"\nparams {params}; read bandwidth {read_bw / 1e9:.1f} GB/s, peak {peak / 1e9:.0f} GFLOP/s")
  for row in rows:
    print(f"batch {row['batch']}: memory-bound prediction {row['predicted']['decode_tokens_per_s']:.0f} tokens/s")
    for c, r in row["contenders"].items():
      if "error" in r:
        print(f"  {c:14s} FAILED: {r['error']}")
      else:
        print(f"  {c:14s} {r['decode_tokens_per_s']:7.0f} tokens/s (spread {r['spread']:4.0%}) = {r['of_prediction']:.0%} of the "
              f"prediction; prefill {r['prefill_s'] * 1e3:.0f} ms{'  compile: ' + str(r['compile']) if 'compile' in r else ''}")
    if "dcmodel_vs_best_torch" in row:
      print(f"  dcmodel / best torch ({row['best_torch']}): {row['dcmodel_vs_best_torch']:.2f}x")
  plot(result, "_quick" if args.quick else "")
  return 0


def plot(result: dict, suffix: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from benchmarks.common import RESULTS
  fig, axes = plt.subplots(1, len(result["rows"]), figsize=(5 * len(result["rows"]), 4), squeeze=False)
  for ax, row in zip(axes[0], result["rows"]):
    names = [c for c, r in row["contenders"].items() if "decode_tokens_per_s" in r]
    rates = [row["contenders"][c]["decode_tokens_per_s"] for c in names]
    ax.bar(range(len(names)), rates, color=["tab:blue" if c.startswith("dcmodel") else "tab:orange" for c in names])
    ax.axhline(row["predicted"]["decode_tokens_per_s"], color="k", ls="--", lw=1, label="memory-bound prediction")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")   # the long contender names overlap flat
    ax.set(ylabel="decode tokens/s", title=f"greedy decode, batch {row['batch']} (25M params)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(RESULTS / f"lm_decode{suffix}.png", dpi=110)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
