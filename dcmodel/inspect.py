"""Look at a configuration without training it: parameter count and bytes per device from the
abstract state (any size, nothing allocated), and XLA's ahead-of-time view of the train step
on the configured mesh (per-device memory, FLOPs), so a layout that cannot fit is caught
before any step runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dcmodel.config import Config
from dcmodel.mesh import batch_sharding, build_mesh, rules_for
from dcmodel.train import state as state_lib
from dcmodel.train import tasks
from dcmodel.train.step import make_train_step


def abstract_batch(cfg: Config, sharding) -> dict:
  """ShapeDtypeStructs of one global training batch, from the model config alone."""
  m, b = cfg.model, cfg.data.global_batch_size
  shape = tuple(m.input_shape())
  tokens = hasattr(m, "vocab_size")
  spec = lambda s, d: jax.ShapeDtypeStruct((b, *s), d, sharding=sharding)
  batch = {"x": spec(shape, jnp.int32 if tokens else jnp.float32), "mask": spec((), jnp.float32)}
  batch["y"] = spec(shape, jnp.int32) if m.task == "lm" else spec((), jnp.int32)
  if "cat" in getattr(m, "inputs", ()):
    batch["cat"] = spec((len(m.table_sizes),), jnp.int32)
  return batch


def describe(cfg: Config, compile: bool = False, devices=None) -> dict:
  mesh = build_mesh(cfg.mesh, devices)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for(cfg.mesh, mesh)):
    graphdef, target, shardings = state_lib.abstract_state(cfg, mesh)
    model_abs, _ = nnx.merge(graphdef, target)
    params = nnx.state(model_abs, nnx.Param)
    count = int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
    per_device = lambda tree: int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                      for x in jax.tree.leaves(tree)))
    out = {"model": cfg.model.name, "mesh": dict(mesh.shape), "params": count,
           "param_bytes_total": int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))),
           "param_bytes_per_device": per_device(params), "state_bytes_per_device": per_device(target)}
    if compile:
      data = batch_sharding(mesh)
      step = make_train_step(graphdef, tasks.get(cfg.model.task), shardings, data,
                             getattr(cfg.model, "inputs", ("x",)), cfg.train.grad_accum_steps)
      compiled = step.lower(target, abstract_batch(cfg, data)).compile()
      mem = compiled.memory_analysis()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      out["compiled"] = {
          "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes), "generated_code_bytes": int(mem.generated_code_size_in_bytes),
          "flops_per_device": float(cost.get("flops", float("nan"))) if cost else float("nan"),
          "bytes_accessed_per_device": float(cost.get("bytes accessed", float("nan"))) if cost else float("nan")}
  return out
