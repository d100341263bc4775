"""The device mesh and the logical-axis rules that map model axes onto it.

Axes are ('stage', 'data', 'fsdp', 'model'); size-1 axes cost nothing, so every layout
(DP, FSDP, TP, PP and their products) is the same mesh with different sizes and rules.
The mesh uses Auto axis types: Flax's logical-rule sharding is written for GSPMD.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dcmodel.config import MeshConfig
from dcmodel.errors import UserError

AXES = ("stage", "data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # a global batch is split over these
# Every logical axis a model may name; those without a rule are replicated.
# Parameters and activations have separate names (as in MaxText), so FSDP can split a weight's
# embed dimension while the activations' embed dimension stays whole.
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "conv_in",
                "conv_out", "classes", "table_rows", "table_dim", "layers", "stage",
                "act_length", "act_embed", "act_mlp", "act_heads", "act_kv_heads", "act_vocab")


def axis_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Resolve -1 and check the mesh fits the devices; an error here comes before any compile."""
  sizes = {a: getattr(cfg, a) for a in AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  fill = [a for a, s in sizes.items() if s == -1]
  if fill:
    if num_devices % fixed:
      raise UserError(f"mesh {_show(sizes)}: the fixed axes use {fixed} devices, which does not divide the {num_devices} available")
    sizes[fill[0]] = num_devices // fixed
  total = math.prod(sizes.values())
  if total > num_devices:
    raise UserError(f"mesh {_show(sizes)} needs {total} devices but only {num_devices} are available "
                    f"(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N or pass --host-devices N)")
  if total < num_devices and fill:
    raise UserError(f"mesh {_show(sizes)} uses {total} of {num_devices} devices")
  return sizes


def _show(sizes: dict[str, int]) -> str:
  return "x".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "1 device"


def build_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = axis_sizes(cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  used = devices[: math.prod(shape)]
  try:  # topology-aware device order on TPU/GPU; plain order elsewhere
    grid = mesh_utils.create_device_mesh(shape, devices=used)
  except Exception:
    grid = np.asarray(used).reshape(shape)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch_size: int, mesh: Mesh, what: str = "data.global_batch_size") -> None:
  n = batch_divisor(mesh)
  if global_batch_size % n:
    raise UserError(f"{what}={global_batch_size} does not divide the batch axes data x fsdp = {n}; "
                    f"use a multiple of {n}")
  if global_batch_size % jax.process_count():
    raise UserError(f"{what}={global_batch_size} does not divide the {jax.process_count()} processes")


def rules_for(cfg: MeshConfig, mesh: Mesh) -> tuple[tuple[str, object], ...]:
  """The logical-axis rules, with mesh axes of size 1 dropped so specs stay minimal."""
  def keep(target):
    if target is None:
      return None
    names = (target,) if isinstance(target, str) else tuple(target)
    for n in names:
      if n not in mesh.shape:
        raise UserError(f"mesh.rules maps to unknown mesh axis '{n}'; mesh axes are {AXES}")
    names = tuple(n for n in names if mesh.shape[n] > 1)
    return None if not names else names[0] if len(names) == 1 else names
  given = dict(cfg.rules)
  unknown = sorted(set(given) - set(LOGICAL_AXES))
  if unknown:
    raise UserError(f"mesh.rules names unknown logical axes {unknown}; known: {', '.join(LOGICAL_AXES)}")
  return tuple((logical, keep(given.get(logical))) for logical in LOGICAL_AXES)


def logical_spec(logical_axes: tuple) -> P:
  """The PartitionSpec that logical axes take under the active rules."""
  return P(*spmd.apply_rules(logical_axes, None))


def spec_axes(entry) -> tuple:
  """The mesh axes one PartitionSpec entry names (None, an axis, or a tuple of axes)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def constrain(x, logical_axes: tuple):
  """Pin an activation's layout by logical axes (under the active rules and mesh); a no-op
  outside a mesh, so models also run unsharded."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(logical_axes))
