"""The train state (model + optimizer as one NNX state tree) laid out on a mesh: the one place
that builds mesh, rules, abstract state and shardings, used by train, predict, generate, serve,
inspect, import-hf, the performance model, benchmarks and tests.

Shapes and shardings are worked out with `nnx.eval_shape` before anything is allocated; the real
state is then created (or restored) straight into the shardings the logical-axis rules give, so
no device ever holds a full copy it should not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
from flax import nnx

from dcmodel import models
from dcmodel.config import Config
from dcmodel.errors import UserError
from dcmodel.mesh import batch_sharding, build_mesh, rules_for
from dcmodel.train import optimizer


def make_optimizer(cfg: Config, model):
  return nnx.Optimizer(model, optimizer.build(cfg.optimizer, cfg.train.steps), wrt=nnx.Param)


def make_model_and_optimizer(cfg: Config):
  model = models.build(cfg.model, nnx.Rngs(cfg.train.seed))
  return model, make_optimizer(cfg, model)


@dataclasses.dataclass
class Placed:
  """A config's state on its mesh, not yet allocated: `target` holds ShapeDtypeStructs carrying
  the shardings (what a restore reads into), `init()` creates the state there."""
  cfg: Config
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: object
  target: object
  shardings: object
  model_graphdef: object = None

  @property
  def model_target(self):
    """The model's part of `target` (what a model-only checkpoint holds, what import-hf fills)."""
    return self.target[0]

  def context(self) -> contextlib.ExitStack:
    """The mesh and logical-axis rules every sharded computation of this state runs under."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nnx.logical_axis_rules(self.rules))
    return stack

  @property
  def data_sharding(self):
    """A batch's leading (example) axis over the batch axes of the mesh."""
    return batch_sharding(self.mesh)

  def init(self):
    """A fresh state, created directly in its shardings."""
    with self.context():
      return jax.jit(lambda: nnx.split(make_model_and_optimizer(self.cfg))[1], out_shardings=self.shardings)()

  def model(self, state):
    return nnx.merge(self.graphdef, state)[0]

  def bytes_per_device(self, params_only: bool = False) -> int:
    """Bytes of the state (or of its parameters) one device holds in these shardings."""
    tree = params(self.graphdef, self.target) if params_only else self.target
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))

  def local_devices(self) -> list:
    """This process's devices of the mesh."""
    return [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]

  def fresh_optimizer(self, model_state):
    """The train state from the model's state alone, with a new optimizer state (zero moments,
    step 0): what training from imported weights starts from. The model's arrays are donated."""
    def make(model_state):
      model = nnx.merge(self.model_graphdef, model_state)
      return nnx.split((model, make_optimizer(self.cfg, model)))[1]
    with self.context():
      return jax.jit(make, out_shardings=self.shardings, donate_argnums=0)(model_state)


def place(cfg: Config, devices=None) -> Placed:
  """Build `cfg`'s mesh (over `devices`, default all) and its abstract, sharded state. Every
  check that needs only shapes (a dimension that does not split over its mesh axes) fails here,
  before anything is allocated or compiled."""
  mesh = build_mesh(cfg.mesh, devices)
  rules = rules_for(cfg.mesh, mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abs_model, abs_opt = nnx.eval_shape(lambda: make_model_and_optimizer(cfg))
    graphdef, abs_state = nnx.split((abs_model, abs_opt))
    shardings = nnx.get_named_sharding(abs_state, mesh)
  check_divisible(abs_state, shardings, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  return Placed(cfg, mesh, rules, graphdef, target, shardings, nnx.graphdef(abs_model))


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


def abstract_batch(cfg: Config, sharding=None, steps: int = 1) -> dict:
  """ShapeDtypeStructs of one global training batch: the model's declared batch spec (with
  steps > 1, that many batches stacked on a leading axis, as one call of several steps takes)."""
  lead = (steps, cfg.data.global_batch_size) if steps > 1 else (cfg.data.global_batch_size,)
  return {k: jax.ShapeDtypeStruct((*lead, *f.shape), jax.numpy.dtype(f.dtype), sharding=sharding)
          for k, f in cfg.model.batch_spec().fields.items()}


def params(graphdef, state):
  model, _ = nnx.merge(graphdef, state)
  return nnx.state(model, nnx.Param)
