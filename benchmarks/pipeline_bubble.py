"""Pipeline bubble, measured: 4 stages, 4/8/16 microbatches, against (p-1)/(m+p-1).

The pipelined step (forward + backward, GPipe schedule) takes one tick per microbatch plus
p - 1 fill/drain ticks: T(m) = (m + p - 1) * tick + fixed. The tick is calibrated as the slope
of T between m = 24 and m = 32 (disjoint from the scored points; the slope cancels the fixed
cost), and the measured bubble is 1 - m * tick / T(m). Every round times each m once, in
turn, so the shared host's load drifts over all of them alike; medians over the rounds.
On simulated CPU devices the 4 stages share 2 cores, so a tick is the time all four take
together; the fraction of ticks that carry no microbatch is what is measured.
Run: python -m benchmarks.pipeline_bubble
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import statistics  # noqa: E402

from benchmarks.common import write  # noqa: E402
from dcmodel.perf.calibrate import timed_calls  # noqa: E402
from dcmodel.config import MeshConfig  # noqa: E402
from dcmodel.mesh import build_mesh  # noqa: E402
from dcmodel.parallel import pipeline  # noqa: E402
from dcmodel.perf.pipeline import bubble_fraction  # noqa: E402

STAGES, WIDTH, LAYERS_PER_STAGE, MICRO, ROUNDS = 4, 512, 2, 64, 15


def layers(params, x):
  return jax.lax.scan(lambda x, p: (x + jnp.tanh(x @ p["w"]), None), x, params)[0]


def step_fn(mesh, m):
  def loss(p, xs):
    return jnp.mean(pipeline.run(layers, mesh, p, xs) ** 2)
  return jax.jit(jax.grad(loss))


def main():
  mesh = build_mesh(MeshConfig(data=1, stage=STAGES), jax.devices()[:STAGES])
  params = {"w": jax.random.normal(jax.random.key(0), (STAGES, LAYERS_PER_STAGE, WIDTH, WIDTH)) / np.sqrt(WIDTH)}
  calls = {}
  for m in (4, 8, 16, 24, 32):
    xs = jax.random.normal(jax.random.key(m), (m, MICRO, WIDTH))
    f = step_fn(mesh, m)
    timed_calls(f, params, xs, repeats=1, warmup=2)                      # compile + warm-up
    calls[m] = (f, xs)
  rounds = {m: [] for m in calls}
  for _ in range(ROUNDS):
    for m, (f, xs) in calls.items():
      rounds[m] += timed_calls(f, params, xs, repeats=1, warmup=0)
  timings = {m: {"median_s": statistics.median(t), "spread": (max(t) - min(t)) / statistics.median(t)}
             for m, t in rounds.items()}
  tick = (timings[32]["median_s"] - timings[24]["median_s"]) / 8       # calibration, not scored
  rows = []
  for m in (4, 8, 16):
    measured = 1 - m * tick / timings[m]["median_s"]
    rows.append({"stages": STAGES, "microbatches": m, "predicted_bubble": bubble_fraction(STAGES, m),
                 "measured_bubble": measured, "step_s": timings[m]["median_s"], "spread": timings[m]["spread"]})
    print(f"p={STAGES} m={m:2d}: measured bubble {measured:.3f}, (p-1)/(m+p-1) = {bubble_fraction(STAGES, m):.3f}, "
          f"step {timings[m]['median_s'] * 1e3:.1f} ms (spread {timings[m]['spread']:.0%})")
  print(f"calibrated as the slope between m=24 and m=32: tick {tick * 1e3:.2f} ms")
  write("pipeline_bubble", {"tick_s": tick, "calibration": "slope of T(m) between m=24 and m=32", "rounds": ROUNDS,
                            "layer_width": WIDTH, "microbatch": MICRO, "rows": rows})
  plot(rows)


def plot(rows) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from benchmarks.common import RESULTS
  m = np.arange(1, 33)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(m, [bubble_fraction(STAGES, int(k)) for k in m], "k-", label=f"(p-1)/(m+p-1), p={STAGES}")
  ax.errorbar([r["microbatches"] for r in rows], [r["measured_bubble"] for r in rows],
              yerr=[abs(r["spread"] * r["measured_bubble"]) for r in rows], fmt="o", label="measured (spread as error bar)")
  ax.set(xlabel="microbatches m", ylabel="bubble fraction", title="GPipe bubble over 4 stages (shared 2-core CPU)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(RESULTS / "pipeline_bubble.png", dpi=110)


if __name__ == "__main__":
  main()
