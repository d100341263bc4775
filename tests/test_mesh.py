import jax
import pytest

from dcmodel.config import MeshConfig
from dcmodel.errors import UserError
from dcmodel.mesh import build_mesh, check_batch, rules_for


def test_fill_axis_and_shapes():
  assert dict(build_mesh(MeshConfig(data=-1, model=2)).shape) == {"stage": 1, "data": 4, "fsdp": 1, "model": 2}
  assert build_mesh(MeshConfig(data=1), jax.devices()[:1]).size == 1


def test_mesh_larger_than_devices():
  with pytest.raises(UserError, match="needs 16 devices but only 8 are available"):
    build_mesh(MeshConfig(data=4, model=4))


def test_batch_must_divide_batch_axes():
  mesh = build_mesh(MeshConfig(data=4, fsdp=2))
  check_batch(64, mesh)
  with pytest.raises(UserError, match="does not divide the batch axes data x fsdp = 8; use a multiple of 8"):
    check_batch(100, mesh)


def test_rules_drop_size_one_axes_and_reject_unknown():
  mesh = build_mesh(MeshConfig(data=8))
  rules = dict(rules_for(MeshConfig(data=8), mesh))
  assert rules["mlp"] is None and rules["batch"] == "data"
  with pytest.raises(UserError, match="unknown logical axes"):
    rules_for(MeshConfig(rules=(("bogus", "data"),)), mesh)
