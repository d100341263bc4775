"""Pipeline bubble, measured: 4 stages, 4/8/16 microbatches, against (p-1)/(m+p-1).

The pipelined step (forward + backward, GPipe schedule: `parallel.pipeline.run`) is timed
against the same work without the schedule: every stage device runs its own layers over the
same m microbatches (forward + backward, the same scan), with no fill/drain ticks and no
`ppermute`. That reference is the stages' busy time; the measured bubble is
1 - busy(m) / T(m): the share of the pipelined step spent on anything but a stage's own work
(idle ticks, and the hand-offs). Both are timed at the same m, so the backward stash, which
grows with m and decides the cache behaviour on this CPU, is the same in both.

A first version calibrated one tick as the slope of T(m) between m = 24 and 32; on this CPU a
tick costs more at larger m (the stash outgrows the cache), which made the measured bubble
come out negative. The slope is still reported, as a cross-check.

Every round times each program once, in turn, so the shared host's load drifts over all of
them alike; medians over the rounds. On simulated CPU devices the 4 stages share 2 cores.
Run: python -m benchmarks.pipeline_bubble
"""

from __future__ import annotations

import os
from functools import partial

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import statistics  # noqa: E402

from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks.common import write  # noqa: E402
from dcmodel import hostenv  # noqa: E402
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


def busy_fn(mesh):
  """Each stage device runs its own layers over all m microbatches: the pipeline's work
  without its schedule (no idle ticks, no hand-offs)."""
  @partial(jax.shard_map, mesh=mesh, in_specs=(P("stage"), P()), out_specs=P(), check_vma=False)
  def each_stage_alone(params, xs):
    params = jax.tree.map(lambda p: p[0], params)
    ys = jax.lax.scan(lambda c, x: (c, layers(params, x)), None, xs)[1]
    return jax.lax.pmean(jnp.mean(ys ** 2), "stage")
  return jax.jit(jax.grad(each_stage_alone))


def main():
  mesh = build_mesh(MeshConfig(data=1, stage=STAGES), jax.devices()[:STAGES])
  params = {"w": jax.random.normal(jax.random.key(0), (STAGES, LAYERS_PER_STAGE, WIDTH, WIDTH)) / np.sqrt(WIDTH)}
  calls = {}
  for m in (4, 8, 16, 24, 32):
    xs = jax.random.normal(jax.random.key(m), (m, MICRO, WIDTH))
    for name, f in ((m, step_fn(mesh, m)), (f"busy{m}", busy_fn(mesh))):
      if m in (24, 32) and name != m:
        continue
      timed_calls(f, params, xs, repeats=1, warmup=2)                    # compile + warm-up
      calls[name] = (f, xs)
  rounds = {m: [] for m in calls}
  for _ in range(ROUNDS):
    for m, (f, xs) in calls.items():
      rounds[m] += timed_calls(f, params, xs, repeats=1, warmup=0)
  timings = {m: {"median_s": statistics.median(t), "spread": (max(t) - min(t)) / statistics.median(t)}
             for m, t in rounds.items()}
  tick = (timings[32]["median_s"] - timings[24]["median_s"]) / 8       # the old calibration, a cross-check
  rows = []
  for m in (4, 8, 16):
    # per round: the pipelined step and its busy reference were timed back to back
    per_round = [1 - b / t for b, t in zip(rounds[f"busy{m}"], rounds[m])]
    measured = statistics.median(per_round)
    rows.append({"stages": STAGES, "microbatches": m, "predicted_bubble": bubble_fraction(STAGES, m),
                 "measured_bubble": measured, "measured_q25_q75": [float(np.percentile(per_round, 25)), float(np.percentile(per_round, 75))],
                 "step_s": timings[m]["median_s"], "busy_s": timings[f"busy{m}"]["median_s"], "spread": timings[m]["spread"],
                 "slope_bubble": 1 - m * tick / timings[m]["median_s"]})
    # what is left once the p - 1 idle ticks (each a busy tick, busy / m) are taken out: the hand-offs
    t, b = timings[m]["median_s"], timings[f"busy{m}"]["median_s"]
    rows[-1]["other_s_per_tick"] = (t - b - (STAGES - 1) * b / m) / (m + STAGES - 1)
    print(f"p={STAGES} m={m:2d}: measured bubble {measured:.3f} (rounds' quartiles {rows[-1]['measured_q25_q75'][0]:.3f}.."
          f"{rows[-1]['measured_q25_q75'][1]:.3f}), (p-1)/(m+p-1) = {bubble_fraction(STAGES, m):.3f}; "
          f"step {timings[m]['median_s'] * 1e3:.1f} ms vs busy {timings[f'busy{m}']['median_s'] * 1e3:.1f} ms "
          f"(spread {timings[m]['spread']:.0%}); beyond the idle ticks {rows[-1]['other_s_per_tick'] * 1e3:.2f} ms per tick")
  print(f"cross-check, tick as the slope between m=24 and m=32: {tick * 1e3:.2f} ms -> bubbles "
        + " / ".join(f"{r['slope_bubble']:.3f}" for r in rows))
  write("pipeline_bubble", {"reference": "each stage's own layers over the same m microbatches, no schedule",
                            "tick_s_slope_24_32": tick, "rounds": ROUNDS, "layer_width": WIDTH, "microbatch": MICRO,
                            "rows": rows})
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
              yerr=np.abs(np.array([r["measured_q25_q75"] for r in rows]).T - [r["measured_bubble"] for r in rows]),
              fmt="o", label="measured: 1 - busy / step (quartiles over rounds)")
  ax.set(xlabel="microbatches m", ylabel="bubble fraction", title="GPipe bubble over 4 stages (shared 2-core CPU)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(RESULTS / "pipeline_bubble.png", dpi=110)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  main()
