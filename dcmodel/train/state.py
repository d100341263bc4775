"""The train state (model + optimizer as one NNX state tree), built abstractly, then sharded.

Shapes and shardings are worked out with `nnx.eval_shape` before anything is allocated;
the real state is then created by a jit whose out_shardings put every array where the
logical-axis rules say, so no device ever holds a full copy it should not.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from dcmodel import models
from dcmodel.config import Config
from dcmodel.errors import UserError
from dcmodel.train import optimizer


def make_model_and_optimizer(cfg: Config):
  model = models.build(cfg.model, nnx.Rngs(cfg.train.seed))
  return model, nnx.Optimizer(model, optimizer.build(cfg.optimizer, cfg.train.steps), wrt=nnx.Param)


def abstract_state(cfg: Config, mesh):
  """(graphdef, abstract state of ShapeDtypeStructs with target shardings, shardings).

  Call inside `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)`.
  """
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: make_model_and_optimizer(cfg)))
  shardings = nnx.get_named_sharding(abs_state, mesh)
  check_divisible(abs_state, shardings, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  return graphdef, target, shardings


def check_divisible(abs_state, shardings, mesh) -> None:
  """Every sharded dimension must split evenly: say which parameter and rule break it, before any compile."""
  leaves = jax.tree_util.tree_flatten_with_path(abs_state)[0]
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      if axes is None:
        continue
      names = (axes,) if isinstance(axes, str) else tuple(axes)
      parts = math.prod(mesh.shape[a] for a in names)
      if size % parts:
        raise UserError(f"parameter {jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)}: dimension {dim} "
                        f"({size}) does not split over mesh axes {'x'.join(names)} = {parts}; change the mesh "
                        f"or map that logical axis to None in mesh.rules")


def init_state(cfg: Config, shardings):
  """Create the state directly in its shardings (inside the mesh and rules contexts)."""
  return jax.jit(lambda: nnx.split(make_model_and_optimizer(cfg))[1], out_shardings=shardings)()


def params(graphdef, state):
  model, _ = nnx.merge(graphdef, state)
  return nnx.state(model, nnx.Param)
