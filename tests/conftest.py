"""Every test sees this CPU as 8 devices; the flag must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, fresh for each test session (made by the controller,
# inherited by xdist workers and by the `dcmodel` subprocesses tests start): many tests compile
# the same small programs again (every kill/relaunch, every restore), and a warm compile takes
# ~2.5 s instead of ~10 s here. Nothing survives the session, so a clean machine's time is honest.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="dcmodel-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  atexit.register(shutil.rmtree, _cache, True)

# The peak MFU is measured against (dcmodel/perf/peak.py) is calibrated once per host and cached;
# the tests use a session cache seeded with a fixed figure, so no test pays for a calibration or
# depends on one taken while the machine was busy (tests/test_runtime.py calibrates on its own).
if "DCMODEL_CACHE_DIR" not in os.environ:
  import atexit
  import json
  import shutil
  import socket
  import tempfile
  os.environ["DCMODEL_CACHE_DIR"] = tempfile.mkdtemp(prefix="dcmodel-test-cache-")
  for n in range(1, 9):
    with open(os.path.join(os.environ["DCMODEL_CACHE_DIR"], f"peak-{socket.gethostname()}-cpu-{n}dev.json"), "w") as f:
      json.dump({"flops_per_device": 2e10, "bandwidth_per_device": 1e9, "measured": "seeded by tests/conftest.py"}, f)
  atexit.register(shutil.rmtree, os.environ["DCMODEL_CACHE_DIR"], True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def experiment(name: str, *overrides: str):
  """Load experiments/<name>.py with --set style overrides; quiet and fast by default."""
  from dcmodel import experiment as experiment_lib
  return experiment_lib.load(EXPERIMENTS / f"{name}.py", ["train.progress=false", *overrides])


@pytest.fixture
def exp():
  return experiment
