"""A trained model back from its workdir: the verified checkpoint restored straight into the
shardings of the configured mesh (the same rules as training), ready for predict or generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from dcmodel import config as config_lib
from dcmodel.checkpoint import Checkpointer
from dcmodel.config import Config
from dcmodel.errors import UserError
from dcmodel.mesh import build_mesh, rules_for
from dcmodel.train import state as state_lib


@dataclasses.dataclass
class Trained:
  cfg: Config
  mesh: object
  rules: tuple
  graphdef: object
  state: object          # model + optimizer state, sharded
  shardings: object
  step: int

  def model(self):
    return nnx.merge(self.graphdef, self.state)[0]

  def context(self):
    """The mesh and rules every sharded call must run under."""
    from contextlib import ExitStack
    stack = ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nnx.logical_axis_rules(self.rules))
    return stack


def load(cfg: Config, workdir: str | Path, step: int | None = None, devices=None) -> Trained:
  """Restore `cfg`'s model from `workdir` (its newest good checkpoint, or `step`)."""
  config_lib.validate(cfg)
  workdir = Path(workdir)
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    raise UserError(f"no checkpoints in {workdir}; train first (dcmodel train ... --workdir {workdir})")
  old = config_lib.saved_model(workdir)
  if old is not None and not config_lib.same_model(cfg, old):
    raise UserError(f"workdir {workdir} holds a different model ({old.get('name')}) than the experiment's "
                    f"({cfg.model.name}); pass the experiment and --set overrides it was trained with")
  mesh = build_mesh(cfg.mesh, devices)
  rules = rules_for(cfg.mesh, mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, target, shardings = state_lib.abstract_state(cfg, mesh)
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint)
    try:
      if step is None:
        step, state = ckpt.restore_latest(target, None)
        if state is None:
          raise UserError(f"no checkpoints in {ckpt_dir}; train first")
      else:
        state = ckpt.restore_step(step, target)
    finally:
      ckpt.manager.close()
  return Trained(cfg, mesh, rules, graphdef, state, shardings, step)
