"""Predicted vs measured train-step time over model sizes x layouts x mesh shapes (8 devices).

1. Calibrate this host (matmul peak, elementwise-fusion bandwidth, collective alpha-beta) on synthetic
   arrays of its own sizes: nothing a scored configuration runs.
2. For each configuration: the analytic accounting (FLOPs, matmul bytes), XLA's memory
   traffic for the step compiled on one device, and the host prediction
   (dcmodel.perf.layouts.predict_on_host: the step model the catalog chips use, on this host's
   calibration); then the real jitted train step on the 8-device
   mesh, timed (warm-up excluded, blocked on, median of repeats).
Writes benchmarks/results/step_time.json and PNG plots (scatter, step time by layout).
Run: python -m benchmarks.step_time [--quick | --replay]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.common import RESULTS, time_fn, write  # noqa: E402
from dcmodel import hostenv  # noqa: E402
from dcmodel import experiment as experiment_lib  # noqa: E402
from dcmodel.inspect import describe  # noqa: E402
from dcmodel.perf import calibrate as calibrate_lib  # noqa: E402
from dcmodel.perf.accounting import account  # noqa: E402
from dcmodel.perf.layouts import Layout, predict_on_host  # noqa: E402
from dcmodel.train import state as state_lib  # noqa: E402
from dcmodel.train import tasks  # noqa: E402
from dcmodel.train.step import make_train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = [Layout(8, 1, 1), Layout(1, 8, 1), Layout(4, 1, 2), Layout(2, 1, 4), Layout(1, 4, 2), Layout(1, 2, 4)]
SIZES = {"gpt-d256": ["model.d_model=256", "model.d_ff=1024", "model.num_heads=4", "data.global_batch_size=64"],
         "gpt-d512": ["model.d_model=512", "model.d_ff=2048", "model.num_heads=8", "data.global_batch_size=32"]}


def configs(quick: bool):
  if quick:
    return [("gpt-d256", Layout(8, 1, 1)), ("gpt-d256", Layout(4, 1, 2)), ("gpt-d256", Layout(1, 8, 1))]
  return [(size, layout) for size in SIZES for layout in LAYOUTS]


def build(size: str, layout: Layout):
  sets = SIZES[size] + [f"mesh.data={layout.data}", f"mesh.fsdp={layout.fsdp}", f"mesh.model={layout.model}"]
  return experiment_lib.load(os.path.join(ROOT, "experiments", "stdlib_gpt.py"), sets)


def one_device_bytes(cfg) -> float:
  """XLA's bytes accessed by the train step compiled for one device: the layout-free traffic."""
  one = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1, fsdp=1, model=1))
  return describe(one, compile=True, devices=jax.devices()[:1])["compiled"]["bytes_accessed_per_device"]


def measure(cfg, repeats: int) -> dict:
  """Timing of the real train step on the configured mesh."""
  placed = state_lib.place(cfg)
  with placed.context():
    state, data, spec = placed.init(), placed.data_sharding, cfg.model.batch_spec()
    step = make_train_step(placed.graphdef, tasks.get(cfg.model.task), placed.shardings, data, spec.inputs)
    batch = jax.device_put(spec.random(cfg.data.global_batch_size), data)
    holder = [state]

    def run():
      holder[0], sums = step(holder[0], batch)
      return sums

    return time_fn(run, repeats=repeats, warmup=3)


def replay() -> int:
  """The stored sweep's measurements (results/step_time.json, results/calibration.json) against
  today's step model: a model change checked without timing anything on a busy machine."""
  stored = json.loads((RESULTS / "step_time.json").read_text())
  cal = calibrate_lib.HostCalibration.load(RESULTS / "calibration.json")
  errors = []
  for r in stored["rows"]:
    layout = Layout(*r["mesh"])
    cfg = build(r["model"], layout)
    pred = predict_on_host(account(cfg), cfg.model, layout, cal, r["one_device_bytes_accessed"])
    errors.append(pred.step_s / r["measured_s"] - 1)
    print(f"{r['model']:10s} {layout.name():14s} predicted {pred.step_s:6.3f}s (stored {r['predicted_s']:6.3f}s) "
          f"measured {r['measured_s']:6.3f}s {errors[-1]:+6.1%}")
  e = np.abs(errors)
  print(f"replayed: median |error| {np.median(e):.1%}, worst {e.max():.1%} over {len(e)} configs")
  return 0 if np.median(e) <= 0.15 and e.max() <= 0.35 else 1


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--replay", action="store_true", help="re-predict the stored measurements with today's model; time nothing")
  args = p.parse_args(argv)
  if args.replay:
    return replay()
  t0 = time.perf_counter()
  cal = calibrate_lib.calibrate(quick=args.quick)
  cal.save(RESULTS / ("calibration_quick.json" if args.quick else "calibration.json"))
  rows = []
  for size, layout in tqdm(configs(args.quick), desc="step-time sweep", unit="config"):
    cfg = build(size, layout)
    acc = account(cfg)
    bytes_accessed = one_device_bytes(cfg)
    timing = measure(cfg, repeats=3 if args.quick else 5)
    pred = predict_on_host(acc, cfg.model, layout, cal, bytes_accessed)
    measured = timing["median_s"]
    rows.append({"model": size, "layout": layout.name(), "mesh": [layout.data, layout.fsdp, layout.model],
                 "params": acc.params, "flops_per_step": acc.flops_per_step, "one_device_bytes_accessed": bytes_accessed,
                 "predicted_s": pred.step_s, "measured_s": measured, "spread": timing["spread"],
                 "error": pred.step_s / measured - 1, "bottleneck": pred.bottleneck,
                 "predicted_terms_s": {"compute": pred.compute_s, "recompute": pred.recompute_s, "memory": pred.memory_s,
                                           "bubble": pred.bubble_s, **pred.comm_s},
                 "mfu_measured": acc.flops_per_step / (measured * cal.matmul_flops)})
  errors = np.abs([r["error"] for r in rows])
  summary = {"configs": len(rows), "median_abs_error": float(np.median(errors)), "max_abs_error": float(np.max(errors)),
             "pass": bool(np.median(errors) <= 0.15 and np.max(errors) <= 0.35),
             "calibration": {"matmul_flops": cal.matmul_flops, "mem_bw": cal.mem_bw}, "wall_s": time.perf_counter() - t0}
  write("step_time" + ("_quick" if args.quick else ""), {"summary": summary, "rows": rows})
  plot(rows, "_quick" if args.quick else "")
  print(f"{'model':10s} {'layout':14s} {'predicted':>10s} {'measured':>10s} {'error':>7s} {'MFU':>5s}  bottleneck")
  for r in rows:
    print(f"{r['model']:10s} {r['layout']:14s} {r['predicted_s']:9.3f}s {r['measured_s']:9.3f}s {r['error']:+6.1%} "
          f"{r['mfu_measured']:5.0%}  {r['bottleneck']}")
  print(f"median |error| {summary['median_abs_error']:.1%}, worst {summary['max_abs_error']:.1%} over {len(rows)} configs "
        f"(calibrated peak {cal.matmul_flops / 1e9:.0f} GFLOP/s, {cal.mem_bw / 1e9:.1f} GB/s)")
  return 0 if summary["pass"] else 1


def plot(rows, suffix: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
  for model in sorted({r["model"] for r in rows}):
    sel = [r for r in rows if r["model"] == model]
    ax[0].scatter([r["measured_s"] for r in sel], [r["predicted_s"] for r in sel], label=model)
  lim = [0, 1.1 * max(max(r["measured_s"], r["predicted_s"]) for r in rows)]
  ax[0].plot(lim, lim, "k--", lw=1, label="exact")
  ax[0].fill_between(lim, [0.85 * v for v in lim], [1.15 * v for v in lim], color="gray", alpha=0.15, label="±15%")
  ax[0].set(xlabel="measured step (s)", ylabel="predicted step (s)", title="train step: predicted vs measured", xlim=lim, ylim=lim)
  ax[0].legend()
  labels = [f"{r['model']}\n{r['layout']}" for r in rows]
  x = np.arange(len(rows))
  ax[1].bar(x - 0.2, [r["measured_s"] for r in rows], 0.4, label="measured")
  ax[1].bar(x + 0.2, [r["predicted_s"] for r in rows], 0.4, label="predicted")
  ax[1].set_xticks(x, labels, rotation=70, fontsize=7)
  ax[1].set(ylabel="step (s)", title="step time by layout (8 simulated devices)")
  ax[1].legend()
  fig.tight_layout()
  fig.savefig(RESULTS / f"step_time{suffix}.png", dpi=110)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
