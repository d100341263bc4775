"""Pipeline parallelism over the 'stage' mesh axis (GPipe, Huang et al. 2019, arXiv:1811.06965).

The layers are split into S stages, one per device along 'stage'. A global batch is cut into
M microbatches; at tick t stage 0 takes microbatch t, every stage applies its layers, and
`ppermute` hands each stage's output to the next. After M + S - 1 ticks the last stage has
every output. Differentiating through the loop gives GPipe's schedule: all forward ticks,
then all backward ticks (the transpose of ppermute sends gradients back a stage). Stage-ticks
with no microbatch are the bubble: S - 1 of every M + S - 1.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def run(stage_fn, mesh, stage_params, xs):
  """stage_fn(params_of_one_stage, x) -> x; stage_params have a leading stage axis (size S),
  xs is (M, microbatch, ...). Returns (M, microbatch, ...) from the last stage."""
  stages = mesh.shape["stage"]
  forward = [(i, i + 1) for i in range(stages - 1)]

  @partial(jax.shard_map, mesh=mesh, in_specs=(P("stage"), P()), out_specs=P(), check_vma=False)
  def pipelined(params, xs):
    params = jax.tree.map(lambda p: p[0], params)                 # this device's stage
    me = jax.lax.axis_index("stage")

    # Inputs go in and outputs come out as scanned sequences, one slice per tick: indexing a
    # closed-over (M, ...) array or carrying an (M, ...) output buffer makes every tick (and its
    # transpose in the backward pass) cost O(M), and the bubble could not be measured.
    def tick(held, fresh):
      y = stage_fn(params, jnp.where(me == 0, fresh, held))
      return jax.lax.ppermute(y, "stage", forward), y

    feed = jnp.concatenate([xs, jnp.zeros((stages - 1, *xs.shape[1:]), xs.dtype)])   # ticks = M + S - 1
    _, ys = jax.lax.scan(tick, jnp.zeros_like(xs[0]), feed)
    outs = ys[stages - 1:]                       # microbatch i leaves the last stage at tick i + S - 1
    return jax.lax.psum(jnp.where(me == stages - 1, outs, 0.0), "stage")   # share the last stage's outputs

  return pipelined(stage_params, xs)


def schedule_bubble(stages: int, microbatches: int) -> float:
  """Idle stage-ticks / all stage-ticks of the schedule `run` executes."""
  ticks = microbatches + stages - 1
  return 1 - stages * microbatches / (stages * ticks)
