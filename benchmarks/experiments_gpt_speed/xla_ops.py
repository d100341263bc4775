"""Per-op time of an XLA:CPU program, from a jax.profiler trace: every thunk (fusion, dot,
custom call, copy) the CPU runtime executes is a trace event when xla_cpu_enable_xprof_traceme
is on. `profile(fn, args)` runs fn `calls` times under the profiler and returns the events'
total wall time by name; `table` groups them by kind (the HLO op behind each name, read from
the compiled module's text) and prints the largest.

Also usable alone on dcmodel's GPT step:
  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.xla_ops [--variant gpt]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

flags = os.environ.get("XLA_FLAGS", "")
if "xla_cpu_enable_xprof_traceme" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_enable_xprof_traceme=true".strip()
os.environ["XLA_FLAGS"] += "" if "device_count" in flags else " --xla_force_host_platform_device_count=1"

import jax  # noqa: E402


def profile(fn, args, calls: int = 2, trace_dir: str | None = None) -> dict[str, float]:
  """{event name: seconds per call} of the XLA thunks run by `calls` calls of fn(*args)."""
  jax.block_until_ready(fn(*args))
  out = trace_dir or tempfile.mkdtemp(prefix="xla_ops_")
  with jax.profiler.trace(out, create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(fn(*args))
  path = sorted(glob.glob(f"{out}/**/*.trace.json.gz", recursive=True))[-1]
  events = json.load(gzip.open(path))["traceEvents"]
  per = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      per[e["name"]] += e["dur"] * 1e-6 / calls
  return dict(per)


def kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> what it is: 'dot', 'fusion:kLoop', 'custom-call:...', ... from HLO text."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? (\w[\w\-]*)\((.*)$", hlo_text, re.M):
    name, op, rest = m.groups()
    if op == "fusion":
      kind = re.search(r"kind=(\w+)", rest)
      calls = re.search(r"calls=%?([\w.\-]+)", rest)
      out[name] = f"fusion:{kind.group(1) if kind else '?'}:{calls.group(1) if calls else ''}"
    elif op == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', rest)
      out[name] = f"custom-call:{target.group(1) if target else '?'}"
    else:
      out[name] = op
  return out


def table(per: dict[str, float], hlo_text: str, top: int = 40) -> None:
  k = kinds(hlo_text)
  total = sum(v for n, v in per.items() if n in k)
  by_kind = collections.Counter()
  for n, v in per.items():
    if n in k:
      by_kind[k[n].split(":")[0] + (":" + k[n].split(":")[1] if k[n].startswith("fusion") else "")] += v
  print(f"thunks' total {total * 1e3:.1f} ms per call")
  for kind, v in by_kind.most_common():
    print(f"  {kind:28s} {v * 1e3:9.1f} ms {v / total:6.1%}")
  print("largest:")
  for n, v in sorted(((n, v) for n, v in per.items() if n in k), key=lambda nv: -nv[1])[:top]:
    print(f"  {n:40s} {k[n][:60]:60s} {v * 1e3:8.2f} ms")


def main():
  from flax import nnx
  from benchmarks.experiments_gpt_speed.dc_step import build, step_and_batch
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="gpt")
  p.add_argument("--set", action="append", default=[])
  p.add_argument("--top", type=int, default=40)
  args = p.parse_args()
  mesh, rules, step, state, batch = step_and_batch(build(args.variant, args.set))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    hlo = step.lower(state, batch).compile().as_text()
    holder = [state]

    def run(b):
      holder[0], sums = step(holder[0], b)
      return sums

    per = profile(run, (batch,), calls=2)
  table(per, hlo, args.top)


if __name__ == "__main__":
  main()
