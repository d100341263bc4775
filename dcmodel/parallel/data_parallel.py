"""Data parallelism with its collective written out: shard_map over the 'data' axis, each
device computes gradients on its shard, and one explicit all-reduce (plain `pmean`, or a
compressed one from allreduce.py with error feedback) makes them global.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dcmodel.config import Config
from dcmodel.data import pipeline
from dcmodel.data.dataset import Dataset
from dcmodel.errors import UserError
from dcmodel.parallel import allreduce
from dcmodel.train import state as state_lib
from dcmodel.train import tasks
from dcmodel.train.evaluate import bound_in_flight, evaluate
from dcmodel.train.step import make_eval_step


def make_step(graphdef, task_fn, mesh, compression: str, inputs=("x",)):
  """(state, residual, batch) -> (state, residual, metric sums); state replicated, batch and
  residual split over 'data' (the residual is each device's own quantization error)."""

  # check_vma=False: gradients stay per-device (no implicit psum from JAX's varying-type
  # tracking), so the all-reduce below is the only one and is the one under study.
  @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P("data"), P()),
           check_vma=False)
  def step(state, residual, batch):
    model, opt = nnx.merge(graphdef, state)
    (_, sums), grads = nnx.value_and_grad(lambda m: task_fn(m(**{k: batch[k] for k in inputs}), batch), has_aux=True)(model)
    local_residual = jax.tree.map(lambda r: r[0], residual) if compression != "none" else None
    grads, local_residual = allreduce.tree_mean(grads, "data", compression, local_residual)   # the one collective
    opt.update(model, grads)
    sums = {k: jax.lax.psum(v, "data") for k, v in sums.items() if k not in tasks.PER_EXAMPLE}
    new_residual = jax.tree.map(lambda r: r[None], local_residual) if compression != "none" else residual
    return nnx.state((model, opt)), new_residual, sums

  return jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass
class DPRun:
  losses: np.ndarray            # per step, training loss
  final_eval: dict
  bytes_per_step: float         # all-reduce bytes each device sends per step
  params: object


def train(cfg: Config, compression: str = "none", devices=None, steps: int | None = None) -> DPRun:
  if compression not in allreduce.PAYLOAD_BYTES:
    raise UserError(f"compression must be one of {', '.join(allreduce.PAYLOAD_BYTES)}, got '{compression}'")
  if (cfg.mesh.fsdp, cfg.mesh.model, cfg.mesh.stage) != (1, 1, 1):
    raise UserError("explicit data parallelism uses a data-only mesh (mesh.fsdp = mesh.model = mesh.stage = 1)")
  steps = steps or cfg.train.steps
  placed = state_lib.place(cfg, devices)
  mesh, graphdef = placed.mesh, placed.graphdef
  n = mesh.shape["data"]
  spec = cfg.model.batch_spec()
  dataset = Dataset.load(cfg.data, spec)
  task_fn = tasks.get(cfg.model.task)
  inputs = spec.inputs
  data_sharding = NamedSharding(mesh, P("data"))
  with placed.context():
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), placed.target)    # every device holds the whole state
    state = jax.device_put(placed.init(), replicated)
    params = state_lib.params(graphdef, state)
    residual = jax.tree.map(lambda p: jnp.zeros((n, *p.shape), p.dtype, device=data_sharding), params)
    step = make_step(graphdef, task_fn, mesh, compression, inputs)
    it = dataset.train_iterator(cfg.data.global_batch_size, cfg.data.shuffle_seed)
    losses = []
    for _ in range(steps):
      state, residual, sums = step(state, residual, pipeline.to_device(next(it), data_sharding, dataset.device_keys))
      losses.append(sums)
      bound_in_flight(losses)
    losses = np.array([float(s["loss_sum"]) / float(s["count"]) for s in jax.device_get(losses)])
    eval_step = make_eval_step(graphdef, task_fn, replicated, data_sharding, inputs)
    final = evaluate(eval_step, state, dataset, "test", cfg.data.eval_batch_size, data_sharding, cfg.model.task)
  bytes_per_step = allreduce.bytes_sent_per_device(allreduce.tree_size(params), n, compression)
  return DPRun(losses, final, bytes_per_step, jax.device_get(state_lib.params(graphdef, state)))
