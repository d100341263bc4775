"""A trained model back from its workdir: the verified checkpoint restored straight into the
shardings of the configured mesh (the same rules as training), ready for predict, generate or
serve, with the tokenizer it was trained with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dcmodel import config as config_lib
from dcmodel import resources
from dcmodel.checkpoint import Checkpointer
from dcmodel.config import Config
from dcmodel.data import pipeline, tokenizers
from dcmodel.data.types import InMemory
from dcmodel.errors import UserError
from dcmodel.train import state as state_lib


@dataclasses.dataclass
class Trained:
  placed: state_lib.Placed
  state: object          # model + optimizer state, sharded
  step: int
  tokenizer: object = None

  @property
  def cfg(self) -> Config:
    return self.placed.cfg

  def model(self):
    return self.placed.model(self.state)


def check_tokenizer(cfg: Config, workdir: Path):
  """The experiment's tokenizer, which must be the one the workdir was trained with."""
  tok = tokenizers.load(cfg.data.tokenizer)
  saved = config_lib.saved_tokenizer(workdir)
  if saved and saved != tok.sha256:
    raise UserError(f"workdir {workdir} was trained with another tokenizer (sha256 {saved[:12]}...) than "
                    f"data.tokenizer={cfg.data.tokenizer} (sha256 {tok.sha256[:12]}...); use the one it was trained with")
  return tok


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
                    f"({cfg.model.name}); pass the experiment and --set overrides it was trained with "
                    f"(or the workdir's config.json)")
  tok = check_tokenizer(cfg, workdir) if cfg.model.batch_spec().lm else None
  placed = state_lib.place(cfg, devices)
  resources.check_device_memory(placed.bytes_per_device(), 0, placed.local_devices(),
                                f"restoring {cfg.model.name} ({resources.gib(placed.bytes_per_device())} per device)",
                                "use a mesh that shards the state (mesh.fsdp, mesh.model) or a host with more memory")
  with placed.context():
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint)
    try:
      if step is None:
        step, state = ckpt.restore_latest(placed.target, None, placed.fresh_optimizer)
        if state is None:
          raise UserError(f"no checkpoints in {ckpt_dir}; train first")
      else:
        state = ckpt.restore_step(step, placed.target, placed.fresh_optimizer)
    finally:
      ckpt.manager.close()
  return Trained(placed, state, step, tok)


def init_workdir(cfg: Config, workdir: str | Path, state=None, devices=None) -> Path:
  """A workdir at step 0 without training: `cfg`'s config and a checkpoint of `state` (default:
  a fresh initialisation), loadable like a trained run's; serving and inference benchmarks
  need a model of the right shape, not good weights. The checkpoint's data position is step
  0's, so `dcmodel train` can go on from it."""
  config_lib.validate(cfg)
  workdir = Path(workdir)
  if (workdir / "checkpoints").exists():
    raise UserError(f"{workdir} already holds checkpoints; pick another workdir")
  tok = tokenizers.load(cfg.data.tokenizer) if cfg.model.batch_spec().lm else None
  placed = state_lib.place(cfg, devices)
  state = placed.init() if state is None else state
  workdir.mkdir(parents=True, exist_ok=True)
  config_lib.save(cfg, workdir, tok.sha256 if tok else None)
  position = pipeline.train_iterator(InMemory({"id": np.zeros(1, np.int64)}), None, None, 1, 0)
  with placed.context():
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    ckpt.save(0, state, position)
    ckpt.close()
  return workdir
