"""Language-model peers: dcmodel's `gpt` training against the same GPT written plainly in
PyTorch (benchmarks/torch_gpt.py: nanoGPT style, F.scaled_dot_product_attention), eager and
torch.compile'd, on the same token batches, on this CPU.

The model is dcmodel's benchmark shape (d_model 512, 4 layers, 8 heads, T=128, batch 32,
vocab 256, RMSNorm, no biases) in two variants:
- gpt:   GELU (tanh) MLP of 2048, learned positions, tied unembedding;
- llama: SwiGLU MLP of 1536 (Llama's 2/3 * 4d rounded up to 256), RoPE, untied unembedding.
Both frameworks build it from the same dcmodel config, and the parameter counts are printed and
checked equal. Training is the stdlib_gpt experiment's: AdamW (b2 0.95, weight decay 0.01),
global-norm clipping at 1.0, warmup-cosine learning rate over the run's steps.

Contenders, each in its own process (its own simulated devices and threads):
- dcmodel-1 / dcmodel-8 / dcmodel-fsdp8: `dcmodel.train.loop.train` on the experiment config, 1
  device, 8 simulated devices data parallel, or 8 sharded FSDP (the batch split 8 ways as in data
  parallel, the parameters and AdamW state sharded: each device updates an eighth of them, where data
  parallel repeats the whole update on all 8, sharing 2 cores), checkpoints and
  evaluation off. Timed as benchmarks/peers.py does: from the first step after the warm-up's metrics
  read (a host sync) to the final metrics read, so compilation and warm-up are excluded and the
  result is blocked on. A contender named after Layout.name() (dcmodel-fsdp4xmodel2) runs that mesh,
  and config overrides after '+' apply to it (dcmodel-fsdp8+model.matmul=xla: the dense products on
  XLA's dots instead of host BLAS).
- xla-1 / xla-fsdp8: the bare jitted step: dcmodel's own `make_train_step` called on batches already
  on the devices (no input pipeline, no metrics, no loop), so the loop's cost is visible.
- torch-eager, torch-compile (mode "default" and "max-autotune-no-cudagraphs"): the PyTorch GPT,
  all cores as intra-op threads, AdamW with the fastest of its CPU implementations (fused), the
  same clipping and schedule. Compilation time and recompilations are reported, not hidden.
With DCMODEL_HOST_MALLOC=mimalloc or hugetlb (dcmodel/hostenv.py: the allocator that serves
large blocks) every contender runs with it: both frameworks' compiled steps gain from it
(torch.compile's 2.4-2.7 s with glibc's defaults, 1.9-2.1 s with mimalloc,
`experiments_gpt_speed/torch_step`).
Every contender trains on the same token batches, read by dcmodel's own pipeline from the
Python standard library text (the first batch's hash is checked in dcmodel's run). dcmodel's
rows are packed documents: it masks attention and the loss at document boundaries (segment ids);
the PyTorch peer attends causally across them (SDPA's is_causal fast path, its best case). The
mask costs dcmodel nothing measurable here (the step with and without segment ids: 0.98x,
experiments_gpt_speed/dc_patched.py "noseg").

Each round runs every contender once, interleaved (the shared host's load drifts over all of
them alike), after a calibration of the matmul peak in its own 1-device process
(dcmodel.perf.calibrate.matmul_peak; the highest of the rounds' is the peak: a shared host's load
only lowers it); the median over rounds is reported with the spread.
MFU = model FLOPs per step / step time / peak, with dcmodel.perf.accounting's convention:
matmul FLOPs only (a multiply-add is 2), forward + backward (2x forward), attention's full
T x T, remat not counted. Writes results/lm_peers_VARIANT.{json,png}, one per variant.

Run: python -m benchmarks.lm_peers [--variant gpt|llama|both] [--rounds N] [--quick]
(one variant with the default 2 rounds takes ~12 minutes on a quiet 2-core host)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dcmodel import hostenv
from dcmodel.perf.layouts import Layout

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["model.d_model=512", "model.num_layers=4", "model.num_heads=8", "model.max_len=128", "model.vocab_size=256",
         "model.norm=rmsnorm", "model.use_bias=false", "model.dtype=float32", "data.global_batch_size=32"]
VARIANTS = {"gpt": ["model.mlp=gelu", "model.d_ff=2048", "model.positions=learned", "model.tie_embeddings=true"],
            "llama": ["model.mlp=swiglu", "model.d_ff=1536", "model.positions=rope", "model.tie_embeddings=false"]}
CONTENDERS = ["dcmodel-1", "dcmodel-8", "dcmodel-fsdp8", "xla-1", "xla-fsdp8", "torch-eager", "torch-compile", "torch-compile-max-autotune"]
TORCH_MODES = {"torch-eager": None, "torch-compile": "default", "torch-compile-max-autotune": "max-autotune-no-cudagraphs"}
WARMUP = 2   # untimed steps: compilation (XLA and Inductor) and the first run of every kernel


def config(variant: str, mesh: int | Layout, steps: int, extra=()):
  """The stdlib_gpt experiment at the benchmark shape, `steps` long, on `mesh`: a device count
  (data parallel) or a Layout."""
  from dcmodel import experiment
  mesh = mesh if isinstance(mesh, Layout) else Layout(data=mesh)
  return experiment.load(ROOT / "experiments" / "stdlib_gpt.py", [
      *SHAPE, *VARIANTS[variant], f"mesh.data={mesh.data}", f"mesh.fsdp={mesh.fsdp}", f"mesh.model={mesh.model}", f"train.steps={steps}", f"train.log_every={WARMUP}",
      "train.eval_every=0", "train.final_eval=false", "train.progress=false", "checkpoint.enabled=false", *extra])


def export_batches(variant: str, steps: int, path: Path) -> None:
  """The batches dcmodel's train loop will see for `steps` steps, from its own pipeline (every
  field of the gpt batch: tokens, targets, segment ids, positions, weights, target bytes, mask)."""
  from dcmodel.data.dataset import Dataset
  cfg = config(variant, 1, steps)
  spec = cfg.model.batch_spec()
  it = Dataset.load(cfg.data, spec).train_iterator(cfg.data.global_batch_size, cfg.data.shuffle_seed, cfg.data.read_threads,
                                                   cfg.data.prefetch)
  batches = [next(it) for _ in range(steps)]
  np.savez(path, **{k: np.stack([b[k] for b in batches]).astype(f.dtype) for k, f in spec.fields.items()})


def _digest(a) -> str:
  return hashlib.sha256(np.ascontiguousarray(a, np.int32).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- dcmodel's train loop
def mesh_of(contender: str) -> Layout:
  """The mesh a dcmodel-/xla- contender runs on, from its name: 'dcmodel-8' is 8 devices data
  parallel, 'dcmodel-fsdp4xmodel2' that mesh as Layout.name() spells it. Config overrides may
  follow, each after a '+' (`sets_of`)."""
  framework, _, spec = contender.split("+")[0].partition("-")
  if framework not in ("dcmodel", "xla") or not re.fullmatch(r"\d+|(?:data|fsdp|model)\d+(?:x(?:data|fsdp|model)\d+)*", spec):
    raise ValueError(f"unknown contender {contender!r}: expected one of {', '.join(CONTENDERS)}, or dcmodel-/xla- with a "
                     "mesh as Layout.name() spells it (dcmodel-fsdp4xmodel2)")
  return Layout(data=int(spec)) if spec.isdigit() else Layout(**{a: int(n) for a, n in re.findall(r"(data|fsdp|model)(\d+)", spec)})


def sets_of(contender: str) -> list[str]:
  """The config overrides a dcmodel-/xla- contender names: 'dcmodel-1+model.matmul=xla'."""
  return contender.split("+")[1:]


def run_dcmodel(variant: str, mesh: Layout, data: Path, steps: int, sets=()) -> dict:
  import jax
  from dcmodel.perf import accounting
  from dcmodel.train.loop import train
  from dcmodel.train.metrics import read
  cfg = config(variant, mesh, steps, sets)
  stamps, first = {}, {}

  def hook(step, batch):   # the wall clock at each step's dispatch, and the first batch, for the same-data check
    stamps.setdefault(step, time.time())
    if step == 0:
      first["x"] = _digest(batch["x"])

  with tempfile.TemporaryDirectory() as work:
    train(cfg, work, batch_hooks=(hook,), devices=jax.devices()[:mesh.devices])
    logs = [r for r in read(Path(work) / "metrics.jsonl") if r["split"] == "train"]
  timed = [r for r in logs if r["step"] > WARMUP]   # windows of the timed steps: their mean loss, weighted by tokens
  loss = sum(r["loss"] * r["examples"] for r in timed) / sum(r["examples"] for r in timed)
  acc = accounting.account(cfg)
  return {"step_s": (logs[-1]["time"] - stamps[WARMUP]) / (steps - WARMUP), "loss": float(loss),
          "first_batch": first["x"], "params": acc.params, "flops_per_step": acc.flops_per_step,
          "tokens_per_step": acc.tokens_per_step}


# ---------------------------------------------------------------- the bare jitted step
def run_xla(variant: str, mesh: Layout, data: Path, steps: int, sets=()) -> dict:
  """dcmodel's own make_train_step, called on device-resident batches: no pipeline, no loop."""
  import jax
  from dcmodel.perf import accounting
  from dcmodel.train import state as state_lib
  from dcmodel.train import tasks
  from dcmodel.train.step import make_train_step
  cfg = config(variant, mesh, steps, sets)
  placed = state_lib.place(cfg, jax.devices()[:mesh.devices])
  a = np.load(data)
  with placed.context():
    state = placed.init()
    sharding = placed.data_sharding
    step = make_train_step(placed.graphdef, tasks.get(cfg.model.task), placed.shardings, sharding, cfg.model.batch_spec().inputs)
    batches = [jax.device_put({k: a[k][i] for k in a.files}, sharding) for i in range(steps)]
    jax.block_until_ready(batches)
    losses = []
    for i in range(WARMUP):
      state, sums = step(state, batches[i])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(WARMUP, steps):
      state, sums = step(state, batches[i])
      losses.append(sums)
    jax.block_until_ready((state, losses))
    seconds = time.perf_counter() - start
  acc = accounting.account(cfg)   # what the row's rates are per step, when no dcmodel- contender ran
  return {"step_s": seconds / (steps - WARMUP), "loss": float(np.mean([s["loss_sum"] / s["count"] for s in jax.device_get(losses)])),
          "params": acc.params, "flops_per_step": acc.flops_per_step, "tokens_per_step": acc.tokens_per_step}


# ---------------------------------------------------------------- PyTorch
def run_torch(variant: str, mode: str | None, data: Path, steps: int) -> dict:
  """The PyTorch GPT at its best on this CPU: all cores as intra-op threads, fused AdamW, and
  (mode given) torch.compile of the model; the optimizer step stays eager (fused already)."""
  import torch
  import torch.nn.functional as F
  from benchmarks.torch_gpt import GPT, dynamo_stats, warmup_cosine
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = config(variant, 1, steps)
  o = cfg.optimizer
  model = GPT.from_config(cfg.model)
  opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), weight_decay=o.weight_decay, fused=True)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 1.0, o.warmup_steps, max(steps, o.warmup_steps + 1),
                                                                         o.min_learning_rate_ratio))
  forward = model if mode is None else torch.compile(model, mode=None if mode == "default" else mode)
  a = np.load(data)
  xs, ys = torch.from_numpy(a["x"]).long(), torch.from_numpy(a["y"]).long()

  def step(i):
    logits = forward(xs[i])
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), ys[i].view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    opt.step()
    sched.step()
    return loss.detach()

  t = time.perf_counter()
  for i in range(WARMUP):
    step(i)
  warm_s = time.perf_counter() - t
  warm = dynamo_stats()
  losses = []
  start = time.perf_counter()
  for i in range(WARMUP, steps):
    losses.append(step(i))
  seconds = time.perf_counter() - start
  out = {"step_s": seconds / (steps - WARMUP), "loss": float(torch.stack(losses).mean()), "warmup_s": warm_s,
         "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}
  if mode is not None:   # what torch.compile did, and whether it compiled again inside the timed steps
    end = dynamo_stats()
    out["compile"] = {**end, "recompiles_timed": end["frames_compiled"] - warm["frames_compiled"]}
  return out


def run_one(contender: str, variant: str, data: Path, steps: int) -> dict:
  if contender.startswith("dcmodel"):
    return run_dcmodel(variant, mesh_of(contender), data, steps, sets_of(contender))
  if contender.startswith("xla"):
    return run_xla(variant, mesh_of(contender), data, steps, sets_of(contender))
  if contender == "calibrate":
    from dcmodel.perf import calibrate
    return {"peak_flops": calibrate.matmul_peak()}
  return run_torch(variant, TORCH_MODES[contender], data, steps)


def child(contender: str, variant: str, data: Path, steps: int) -> dict:
  """One contender in its own process; the simulated device count is set before jax loads."""
  devices = mesh_of(contender).devices if contender.split("-")[0] in ("dcmodel", "xla") else 1
  env = {**os.environ, "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": (re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
                       + f" --xla_force_host_platform_device_count={devices}").strip()}
  out = subprocess.run([sys.executable, "-m", "benchmarks.lm_peers", "--one", contender, variant, str(data), str(steps)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
  if out.returncode:
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}",
            "stderr_tail": out.stderr[-2000:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="both", choices=["gpt", "llama", "both"])
  p.add_argument("--rounds", type=int, default=2, help="interleaved runs of every contender (median reported)")
  p.add_argument("--steps", type=int, default=10, help="steps per run, the first 2 untimed")
  p.add_argument("--contenders", default=",".join(CONTENDERS))
  p.add_argument("--quick", action="store_true", help="1 round of 5 steps, gpt only, without max-autotune")
  p.add_argument("--one", nargs=4, metavar=("CONTENDER", "VARIANT", "DATA", "STEPS"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    contender, variant, data, steps = args.one
    print(json.dumps(run_one(contender, variant, Path(data), int(steps))))
    return 0
  if args.quick:
    args.rounds, args.steps, args.variant = 1, 5, "gpt"
    args.contenders = ",".join(c for c in args.contenders.split(",") if c != "torch-compile-max-autotune")
  contenders = args.contenders.split(",")
  for c in (c for c in contenders if c not in TORCH_MODES):
    try:
      mesh_of(c)
    except ValueError as e:
      p.error(str(e))
  variants = ["gpt", "llama"] if args.variant == "both" else [args.variant]
  rows, peaks = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for variant in variants:
      data = Path(tmp) / f"{variant}.npz"
      export_batches(variant, args.steps, data)
      runs = {c: [] for c in contenders}
      for r in range(args.rounds):
        peaks.append(child("calibrate", variant, data, args.steps)["peak_flops"])
        for c in contenders:
          t = time.perf_counter()
          runs[c].append(child(c, variant, data, args.steps))
          print(f"[{variant} round {r + 1}] {c}: {json.dumps(runs[c][-1])[:300]} ({time.perf_counter() - t:.0f} s)", flush=True)
      rows.append(summarize(variant, runs, _digest(np.load(data)["x"][0])))
  # the least disturbed calibration: load from other processes only ever lowers a matmul's rate
  peak = float(max(peaks))
  for row in rows:
    for c, r in row["contenders"].items():
      if "tokens_per_s" in r:
        r["mfu"] = r["flops_per_s"] / peak
  for row in rows:
    torch_rates = {c: r["tokens_per_s"] for c, r in row["contenders"].items() if c.startswith("torch") and "tokens_per_s" in r}
    best = max(torch_rates, key=torch_rates.get) if torch_rates else None
    row["best_torch"] = best
    for c, r in row["contenders"].items():
      if best and "tokens_per_s" in r:
        r["vs_best_torch"] = r["tokens_per_s"] / torch_rates[best]
    for c in row["contenders"]:   # the loop against its bare step on the same mesh (dcmodel-1 / xla-1, ...)
      mesh = c.split("-", 1)[1]
      if c.startswith("dcmodel-") and f"xla-{mesh}" in row["contenders"]:
        row[f"dcmodel_of_bare_step_{mesh}"] = (row["contenders"][c].get("tokens_per_s", float("nan"))
                                               / row["contenders"][f"xla-{mesh}"].get("tokens_per_s", float("nan")))
  from benchmarks.common import write
  common = {"peak_flops": peak, "peak_flops_runs": peaks, "rounds": args.rounds, "steps_timed": args.steps - WARMUP,
            "flop_convention": "dcmodel.perf.accounting: matmul FLOPs (multiply-add = 2), forward + backward, full T x T attention, remat not counted"}
  report({**common, "rows": rows})
  for row in rows:   # one file per variant, whichever --variant ran them (results/lm_peers_gpt.json, ...)
    name = f"lm_peers_{row['variant']}" + ("_quick" if args.quick else "")
    write(name, {**common, "rows": [row]})
    plot({**common, "rows": [row]}, name)
  return 0


def summarize(variant: str, runs: dict, first_batch: str) -> dict:
  meta = next((r for c in runs if c.startswith(("dcmodel", "xla")) for r in runs[c] if "params" in r), None)
  row = {"variant": variant, "params_dcmodel": meta and meta["params"], "flops_per_step": meta and meta["flops_per_step"],
         "tokens_per_step": meta and meta["tokens_per_step"], "contenders": {}}
  torch_params = next((r["params"] for c in runs if c.startswith("torch") for r in runs[c] if "params" in r), None)
  row["params_torch"] = torch_params
  row["same_batches"] = all(r.get("first_batch") == first_batch for c in runs if c.startswith("dcmodel") for r in runs[c] if "first_batch" in r)
  for c, rs in runs.items():
    ok = [r for r in rs if "step_s" in r]
    if not ok:
      row["contenders"][c] = {"error": rs[0].get("error") if rs else "not run", "stderr_tail": rs[0].get("stderr_tail", "") if rs else ""}
      continue
    steps = sorted(r["step_s"] for r in ok)
    med = float(np.median(steps))
    entry = {"step_s": med, "step_s_runs": steps, "spread": (steps[-1] - steps[0]) / med, "tokens_per_s": row["tokens_per_step"] / med,
             "flops_per_s": row["flops_per_step"] / med, "loss": float(np.median([r["loss"] for r in ok])), "failed_runs": len(rs) - len(ok)}
    for key in ("warmup_s", "compile", "threads"):
      if key in ok[0]:
        entry[key] = ok[0][key] if key != "warmup_s" else float(np.median([r[key] for r in ok]))
    row["contenders"][c] = entry
  return row


def report(result: dict) -> None:
  print(f"\nmatmul peak {result['peak_flops'] / 1e9:.0f} GFLOP/s (highest of {len(result['peak_flops_runs'])} calibrations); "
        f"{result['steps_timed']} timed steps per run, median of {result['rounds']} interleaved rounds")
  for row in result["rows"]:
    print(f"{row['variant']}: params dcmodel {row['params_dcmodel'] or 0:,} / torch {row['params_torch'] or 0:,}"
          f"{'' if row['params_torch'] is None or row['params_dcmodel'] == row['params_torch'] else '  (DIFFERENT)'}; "
          f"{row['flops_per_step'] / 1e9:.1f} GFLOP/step; "
          f"same batches: {row['same_batches']}")
    for c, r in row["contenders"].items():
      if "error" in r:
        print(f"  {c:28s} FAILED: {r['error']}")
        continue
      extra = f"  compile: {r['compile']}" if "compile" in r else ""
      print(f"  {c:28s} {r['tokens_per_s']:7.0f} tokens/s  {r['step_s'] * 1e3:6.0f} ms/step (spread {r['spread']:4.0%})  "
            f"MFU {r['mfu']:5.1%}  {r.get('vs_best_torch', float('nan')):.2f}x best torch  loss {r['loss']:.3f}{extra}")


def plot(result: dict, name: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from benchmarks.common import RESULTS
  rows = result["rows"]
  fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4.2), squeeze=False)
  for ax, row in zip(axes[0], rows):
    names = [c for c, r in row["contenders"].items() if "tokens_per_s" in r]
    rates = [row["contenders"][c]["tokens_per_s"] for c in names]
    errs = [[row["contenders"][c]["tokens_per_s"] - row["tokens_per_step"] / max(row["contenders"][c]["step_s_runs"]) for c in names],
            [row["tokens_per_step"] / min(row["contenders"][c]["step_s_runs"]) - row["contenders"][c]["tokens_per_s"] for c in names]]
    colors = ["tab:blue" if c.startswith(("dcmodel", "xla")) else "tab:orange" for c in names]
    bars = ax.bar(range(len(names)), rates, yerr=errs, color=colors, capsize=3)
    for b, c in zip(bars, names):
      ax.annotate(f"{row['contenders'][c]['mfu']:.0%}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                  va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    peak_rate = result["peak_flops"] / row["flops_per_step"] * row["tokens_per_step"]
    ax.axhline(peak_rate, color="k", ls="--", lw=1, label=f"calibrated peak ({result['peak_flops'] / 1e9:.0f} GFLOP/s)")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="training tokens/s", title=f"{row['variant']} (d512, 4 layers, T=128, batch 32): tokens/s, MFU on bars")
    ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
