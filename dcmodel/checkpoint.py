"""Checkpoints with Orbax (TensorStore / OCDBT underneath): train state + Grain iterator state.

Restores go straight into the target shardings of the abstract state, so the same checkpoint
loads onto any mesh. Saves are asynchronous: the device-to-host copy happens inside `save`,
so the train step may donate the state buffers right after.
"""

from __future__ import annotations

from pathlib import Path

import grain
import orbax.checkpoint as ocp

from dcmodel.config import CheckpointConfig


class Checkpointer:
  def __init__(self, directory: Path, cfg: CheckpointConfig):
    self.cfg = cfg
    self.manager = ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep, enable_async_checkpointing=cfg.async_save, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

  def restore(self, step: int, target_state, data_iterator):
    """Restore `step` into `target_state`'s shapes and shardings; the iterator is set in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
