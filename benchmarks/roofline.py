"""Roofline per major op: each distinct matmul/convolution of a model's step (perf.accounting.
matmul_ops, read from the model's own jaxpr), run alone on one device with the step's shapes and
parameters, placed on this host's roofline beside the whole train step.

- Roofline: the matmul peak and the fresh-buffer memory bandwidth, calibrated first on their own
  synthetic sizes (perf.calibrate), never on an op that is scored.
- Each op: FLOPs and bytes (both operands read, the result written) from the accounting; the
  predicted time is max(FLOPs / peak, bytes / bandwidth) (perf.roofline); measured is the
  median of 9 calls after warm-up, each blocked on.
- The whole step (forward + backward + optimizer, one device): accounting FLOPs over XLA's
  bytes accessed, at the measured step time.
Models: the benchmark GPT (d=512, as in step_time) and the documents' CNN at batch 32.
Writes results/roofline.{json,png}.
Run: python -m benchmarks.roofline
"""

from __future__ import annotations

import os
import re

# one device: an op and the peak it is compared with use the same cores
os.environ["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
                           + " --xla_force_host_platform_device_count=1").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import step_time  # noqa: E402
from benchmarks.common import RESULTS, time_fn, write  # noqa: E402
from dcmodel import hostenv  # noqa: E402
from dcmodel import experiment as experiment_lib  # noqa: E402
from dcmodel.perf import accounting, calibrate  # noqa: E402
from dcmodel.perf.roofline import Roofline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = 6   # ops per model, by share of the step's FLOPs


def models():
  cnn = experiment_lib.load(os.path.join(ROOT, "experiments", "digits_cnn.py"),
                                   ["data.global_batch_size=32", "mesh.data=1", "mesh.model=1"])
  return {"gpt-d512": step_time.build("gpt-d512", step_time.Layout(1, 1, 1)), "cnn-b32": cnn}


def time_op(op: accounting.MatmulOp) -> dict:
  rng = np.random.default_rng(0)
  args = [jax.device_put(rng.standard_normal(a.shape).astype(a.dtype)) for a in op.operands]
  return time_fn(jax.jit(op), *args, repeats=9, warmup=3)


def main() -> int:
  peak, bw = calibrate.matmul_peak(), calibrate.memory_bandwidth()
  print(f"calibrated: matmul peak {peak / 1e9:.0f} GFLOP/s, bandwidth {bw / 1e9:.1f} GB/s "
        f"(ridge at {peak / bw:.1f} FLOP/byte)")
  rows, steps = [], []
  for model, cfg in models().items():
    ops = accounting.matmul_ops(cfg)
    total = sum(o.step_flops for o in ops)
    for op in ops[:TOP]:
      roof = Roofline(op.flops, op.bytes, peak, bw)
      t = time_op(op)
      rows.append({"model": model, "op": op.label, "flops": op.flops, "bytes": op.bytes, "intensity": op.intensity,
                   "share_of_step_flops": op.step_flops / total, "bound": "compute" if roof.compute_bound else "memory",
                   "predicted_s": roof.time_s, "measured_s": t["median_s"], "spread": t["spread"],
                   "achieved_flops": op.flops / t["median_s"], "of_attainable": op.flops / t["median_s"] / roof.attainable_flops})
      r = rows[-1]
      print(f"{model:8s} {op.label:60s} {r['share_of_step_flops']:5.1%} of step  I={r['intensity']:6.1f}  {r['bound']:7s}  "
            f"predicted {r['predicted_s'] * 1e3:7.3f} ms  measured {r['measured_s'] * 1e3:7.3f} ms  "
            f"{r['achieved_flops'] / 1e9:6.1f} GFLOP/s = {r['of_attainable']:.0%} of the roof")
    acc = accounting.account(cfg)
    t = step_time.measure(cfg, repeats=5)
    traffic = step_time.one_device_bytes(cfg)
    steps.append({"model": model, "flops": acc.flops_per_step, "bytes": traffic, "intensity": acc.flops_per_step / traffic,
                  "measured_s": t["median_s"], "spread": t["spread"], "achieved_flops": acc.flops_per_step / t["median_s"],
                  "mfu": acc.flops_per_step / t["median_s"] / peak})
    s = steps[-1]
    print(f"{model:8s} whole train step: I={s['intensity']:.1f} FLOP/byte, {s['measured_s'] * 1e3:.1f} ms, "
          f"{s['achieved_flops'] / 1e9:.1f} GFLOP/s = MFU {s['mfu']:.1%}")
  errors = [abs(r["measured_s"] / r["predicted_s"] - 1) for r in rows]
  print(f"per-op |measured / predicted - 1|: median {np.median(errors):.1%}, worst {max(errors):.1%}")
  write("roofline", {"peak_flops": peak, "bandwidth": bw, "ops": rows, "steps": steps,
                     "median_error": float(np.median(errors)), "worst_error": float(max(errors))})
  plot(rows, steps, peak, bw)
  return 0


def plot(rows, steps, peak, bw) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  x = np.logspace(-1, 3.5, 200)
  ax.loglog(x, np.minimum(peak, x * bw), "k-", lw=1.5, label=f"roofline: {peak / 1e9:.0f} GFLOP/s, {bw / 1e9:.1f} GB/s")
  for model, marker in (("gpt-d512", "o"), ("cnn-b32", "s")):
    pts = [r for r in rows if r["model"] == model]
    ax.scatter([r["intensity"] for r in pts], [r["achieved_flops"] for r in pts], marker=marker, label=f"{model} ops (alone)")
    for r in pts:
      ax.annotate(r["op"].split(" ", 1)[1][:34], (r["intensity"], r["achieved_flops"]), fontsize=6, xytext=(3, -8),
                  textcoords="offset points")
  for s in steps:
    ax.scatter([s["intensity"]], [s["achieved_flops"]], marker="*", s=160, label=f"{s['model']} whole train step")
  ax.set(xlabel="arithmetic intensity (FLOP / byte)", ylabel="achieved FLOP/s",
         title="Roofline of this host, one device: major ops and whole steps")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(RESULTS / "roofline.png", dpi=110)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
