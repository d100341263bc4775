"""Timing done right: warm-up excluded, results blocked on, median and spread of repeats."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax

from dcmodel import hostenv
from dcmodel.perf.calibrate import timed_calls

RESULTS = Path(__file__).resolve().parent / "results"


def time_fn(fn, *args, repeats: int = 7, warmup: int = 2) -> dict:
  times = timed_calls(fn, *args, repeats=repeats, warmup=warmup)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "spread": (max(times) - min(times)) / statistics.median(times), "repeats": repeats}


def paired_speedup(base_times, times) -> dict:
  """Rounds run interleaved, so each round's base/candidate ratio is one paired sample: their
  median and quartiles."""
  ratios = [b / t for b, t in zip(base_times, times)]
  q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
  return {"median": statistics.median(ratios), "quartiles": [q1, q3]}


def machine() -> str:
  return f"{platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} {jax.devices()[0].platform} devices"


def write(name: str, payload: dict) -> Path:
  RESULTS.mkdir(exist_ok=True)
  path = RESULTS / f"{name}.json"
  path.write_text(json.dumps({"machine": machine(), "host_malloc": hostenv.active(), "time": time.strftime("%Y-%m-%d %H:%M"),
                              **payload}, indent=2) + "\n")
  return path
