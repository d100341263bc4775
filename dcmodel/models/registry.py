"""Models are named by string in configs: `get_config("cnn", ...)` -> that family's typed config.

A family registers its config dataclass; the config knows how to build its NNX module
(`make(rngs)`) and which task (loss and metrics) trains it.
"""

from __future__ import annotations

import difflib
from typing import ClassVar

from dcmodel.errors import UserError

_CONFIGS: dict[str, type] = {}


class ModelConfig:
  """What every family's config has beside its fields: the batch it declares (`batch_spec()`,
  defined by the family) and, from it, the shape of one input example."""

  # XLA:CPU compiler options for this family's train program (the loop's; train/step.on_leaves).
  # By default copy insertion that sees through the scan's loop, so a leaf's fused update may read
  # the old optimizer moments it also overwrites in place without copying each first (the
  # non-finite guard's selects otherwise cost the recommender 12 copies a step).
  CPU_COMPILER_OPTIONS: ClassVar[dict] = {"xla_cpu_copy_insertion_use_region_analysis": True}
  # Where one process drives several CPU devices (simulated ones sharing the host's cores), the
  # options that pay for one device may not: None means the same options.
  CPU_COMPILER_OPTIONS_SHARED_CORES: ClassVar[dict | None] = None

  def cpu_compiler_options(self, local_devices: int) -> dict:
    """The train program's XLA:CPU options when this process drives `local_devices` devices."""
    shared = self.CPU_COMPILER_OPTIONS_SHARED_CORES
    return dict(self.CPU_COMPILER_OPTIONS if local_devices == 1 or shared is None else shared)

  def input_shape(self) -> tuple[int, ...]:
    return self.batch_spec().fields["x"].shape


def register(name: str):
  def wrap(cls):
    cls.name = name
    _CONFIGS[name] = cls
    return cls
  return wrap


def names() -> list[str]:
  return sorted(_CONFIGS)


def get_config(name: str, **fields):
  if name not in _CONFIGS:
    close = difflib.get_close_matches(name, names(), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown model '{name}'; {hint}known models: {', '.join(names())}")
  return _CONFIGS[name](**fields)


def build(model_cfg, rngs):
  return model_cfg.make(rngs)
