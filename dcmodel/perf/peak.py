"""The peak a run's MFU is measured against, per device: the catalog's dense bf16 figure on a
TPU or GPU the catalog knows (`perf.hardware`, by jax's device_kind); anywhere else (CPU, an
unknown accelerator) this host's float32 matmul peak, measured by `perf.calibrate` once and
cached per host, so runs do not pay for it each time.

The cache is a JSON file under $DCMODEL_CACHE_DIR (default ~/.cache/dcmodel), named by host,
platform and local device count; delete it to measure again (e.g. after a calibration taken
while the machine was busy). Processes of one host calibrate one at a time (a lock beside
the file) and the later ones read the first one's figure.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import jax

from dcmodel.perf import calibrate, hardware

CALIBRATION_SIZES = (1024, 2048)   # square float32 matmuls, batched over the devices; the best counts
BANDWIDTH_MIB = 256                # the array x -> 2x streams through (perf.calibrate.memory_bandwidth)


@dataclasses.dataclass(frozen=True)
class Peak:
  flops_per_device: float
  source: str                      # what the figure is, for the log
  bandwidth_per_device: float = float("nan")   # memory bytes/s (the roofline's other side)

  def describe(self, devices: int) -> str:
    return f"{devices} x {self.flops_per_device / 1e9:,.1f} GFLOP/s ({self.source})"


def cache_dir() -> Path:
  return Path(os.environ.get("DCMODEL_CACHE_DIR") or Path.home() / ".cache" / "dcmodel")


def cache_file(devices) -> Path:
  d = devices[0]
  return cache_dir() / f"peak-{socket.gethostname()}-{d.platform}-{len(devices)}dev.json"


def _calibrated(devices) -> Peak:
  path = cache_file(devices)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)          # one calibration per host at a time; the rest read it
    try:
      cached = json.loads(path.read_text())
      flops, bandwidth, when = float(cached["flops_per_device"]), float(cached["bandwidth_per_device"]), cached["measured"]
    except (OSError, ValueError, KeyError, TypeError):
      flops = calibrate.matmul_peak(CALIBRATION_SIZES, devices=devices) / len(devices)
      bandwidth = calibrate.memory_bandwidth(BANDWIDTH_MIB, devices=devices) / len(devices)
      when = time.strftime("%Y-%m-%d %H:%M")
      tmp = path.with_suffix(f".tmp{os.getpid()}")
      tmp.write_text(json.dumps({"flops_per_device": flops, "bandwidth_per_device": bandwidth, "measured": when,
                                 "devices": len(devices), "platform": devices[0].platform,
                                 "sizes": list(CALIBRATION_SIZES)}) + "\n")
      tmp.replace(path)
  kind = "float32 matmul peak of this host" if devices[0].platform == "cpu" else f"float32 matmul peak of {devices[0].device_kind}"
  return Peak(flops, f"{kind}, calibrated {when}, cached in {path}", bandwidth)


def for_devices(devices=None) -> Peak:
  """The per-device peak of this process's devices (all of one kind)."""
  devices = list(jax.local_devices() if devices is None else devices)
  chip = hardware.for_device_kind(devices[0].device_kind) if devices[0].platform != "cpu" else None
  if chip is not None:
    return Peak(chip.bf16_flops, f"{chip.name} dense bf16 peak from the catalog: {chip.source}", chip.hbm_bw)
  return _calibrated(devices)
