"""Every test sees this CPU as 8 devices; the flag must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def experiment(name: str, *overrides: str):
  """Load experiments/<name>.py with --set style overrides; quiet and fast by default."""
  from dcmodel import config as config_lib
  cfg = config_lib.load_experiment(EXPERIMENTS / f"{name}.py")
  return config_lib.apply_overrides(cfg, ["train.progress=false", *overrides])


@pytest.fixture
def exp():
  return experiment
