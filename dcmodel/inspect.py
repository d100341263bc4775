"""Look at a configuration without training it: parameter count and bytes per device from the
abstract state (any size, nothing allocated), and XLA's ahead-of-time view of the train step
on the configured mesh (per-device memory, FLOPs), so a layout that cannot fit is caught
before any step runs.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from dcmodel.config import Config
from dcmodel.perf import calibrate
from dcmodel.train import state as state_lib
from dcmodel.train import tasks
from dcmodel.train.step import make_train_step


def describe(cfg: Config, compile: bool = False, devices=None) -> dict:
  placed = state_lib.place(cfg, devices)
  mesh, graphdef, target, shardings = placed.mesh, placed.graphdef, placed.target, placed.shardings
  with placed.context():
    model_abs, _ = nnx.merge(graphdef, target)
    params = nnx.state(model_abs, nnx.Param)
    count = int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
    per_device = lambda tree: int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                      for x in jax.tree.leaves(tree)))
    out = {"model": cfg.model.name, "mesh": dict(mesh.shape), "params": count,
           "param_bytes_total": int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))),
           "param_bytes_per_device": per_device(params), "state_bytes_per_device": per_device(target)}
    if compile:
      data = placed.data_sharding
      step = make_train_step(graphdef, tasks.get(cfg.model.task), shardings, data,
                             cfg.model.batch_spec().inputs, cfg.train.grad_accum_steps)
      compiled = step.lower(target, state_lib.abstract_batch(cfg, data)).compile()
      mem = compiled.memory_analysis()
      cost = calibrate.compiled_cost(compiled)
      out["compiled"] = {
          "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes), "generated_code_bytes": int(mem.generated_code_size_in_bytes),
          "flops_per_device": cost["flops"], "bytes_accessed_per_device": cost["bytes accessed"]}
  return out
