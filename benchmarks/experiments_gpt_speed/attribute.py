"""Op-by-op attribution of an XLA:CPU step's wall time from a jax.profiler trace.

The CPU runtime runs independent thunks concurrently, so summing event durations counts some
time twice. Here each instant of the step is split evenly between the thunks running then
(an op sharing the two cores with another gets half of that time), and the instants with no
thunk running (Eigen dots run asynchronously: their trace event ends when the work is handed
to the thread pool) are reported as "no thunk event". Every thunk is classed by what it
computes, read from the optimized HLO: matmul (with its operand forms: N = contracting dim
last on the lhs / first on the rhs, T otherwise), transposing copy, elementwise, reduction.

  python -m benchmarks.experiments_gpt_speed.attribute TRACE_DIR HLO_FILE [CALLS]
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys

from benchmarks.experiments_gpt_speed import xla_ops  # sets the traceme flag before jax loads


def _instructions(hlo: str):
  comps = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo, re.M | re.S)}
  # every non-fused computation's instructions: the entry's, and those of while/conditional bodies
  # (the non-finite guard's update branch), which run as thunks of their own
  bodies = [m.group(3) for m in re.finditer(r"^(ENTRY )?%([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo, re.M | re.S)
            if not m.group(2).startswith("fused_computation")]
  bodies.append(re.search(r"^ENTRY.*?\{\n(.*?)\n\}", hlo, re.M | re.S).group(1))
  out = {}
  for line in "\n".join(bodies).split("\n"):
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\((.*)", line)   # a shape, or a tuple of them
    if m:
      out[m.group(1)] = (m.group(2), m.group(3), m.group(4), comps)
  return out


def _dot_class(shape_lhs: str, shape_rhs: str, dnums: str, engine: str) -> str:
  lc = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dnums).group(1)
  rc = re.search(r"rhs_contracting_dims=\{([\d,]*)\}", dnums).group(1)
  batch = "lhs_batch_dims" in dnums
  rank_l = shape_lhs.count(",") + 1 if shape_lhs else 0
  form = ("N" if lc == str(rank_l - 1) else "T") + ("N" if rc == ("2" if batch else "0") else "T")
  kind = "attention (batched)" if batch else f"matmul {form}"
  return f"{engine} {kind}"


def classify(name: str, inst) -> str:
  shape, op, rest, comps = inst
  if op == "custom-call" and (target := re.search(r'custom_call_target="(\w+)"', rest)):
    return {"dcmodel_host_gemm": "host BLAS product", "dcmodel_host_attention_fwd": "fused attention (fwd)",
            "dcmodel_host_attention_bwd": "fused attention (bwd)"}.get(target.group(1), "custom-call")
  if op == "dot":
    shapes = re.findall(r"(f32|bf16)\[([\d,]*)\]", rest)
    return _dot_class("", "", rest, "eigen") if not shapes else _dot_class(shapes[0][1], "", rest, "eigen")
  if op == "fusion":
    body = comps.get(re.search(r"calls=%([\w.\-]+)", rest).group(1), "")
    ops = collections.Counter(re.findall(r"= \S+ ([a-z\-]+)\(", body))
    if "__ynn_fusion" in rest:
      d = re.search(r"= \S+ dot\(%([\w.\-]+), %([\w.\-]+)\), (.*?)(, metadata|$)", body, re.M)
      if d:
        shapes = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = \S+\[([\d,]*)\]", body)}
        return _dot_class(shapes.get(d.group(1), ""), shapes.get(d.group(2), ""), d.group(3), "ynn")
      return "ynn reduction/elementwise"
    if ops.get("transpose") or (ops.get("copy") and not ops.get("dynamic-update-slice")):
      return "transposing copy" + (" (+elementwise)" if sum(ops.values()) - ops.get("parameter", 0) > 4 else "")
    if ops.get("reduce"):
      return "loop reduction"
    return "elementwise" + (" (select/mask)" if ops.get("select") else "")
  return op


SCOPES = ("optimizer", "attn", "mlp", "norm", "head", "loss")


def _scope(rest: str) -> str:
  """The model part an op belongs to, from the named scopes in its metadata (bare_gpt sets
  them); forward or backward ("transpose(jvp(...))" is the backward pass)."""
  m = re.search(r'op_name="([^"]*)"', rest)
  name = m.group(1) if m else ""
  scope = next((s for s in SCOPES if f"/{s}/" in name or f"({s})" in name or name.endswith(f"/{s}") or f"{s}/" in name), "other")
  return scope + (" bwd" if "transpose(" in name and scope != "optimizer" else "")


def attribute(trace_dir: str, hlo: str, calls: int) -> dict:
  path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
  events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
  insts = _instructions(hlo)
  thunks = [e for e in events if e["name"] in insts]
  execute = [e for e in events if e["name"] == "ThunkExecutor::Execute"]
  edges = sorted([(e["ts"], 1, i) for i, e in enumerate(thunks)] + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(thunks)])
  share = collections.Counter()
  running: set = set()
  last = None
  idle = 0.0
  for t, delta, i in edges:
    if last is not None and t > last:
      if running:
        for j in running:
          share[j] += (t - last) / len(running)
      else:
        idle += t - last
    (running.add if delta > 0 else running.discard)(i)
    last = t
  by_class = collections.Counter()
  by_op = collections.Counter()
  by_scope = collections.Counter()
  for i, s in share.items():
    name = thunks[i]["name"]
    by_class[classify(name, insts[name])] += s
    by_op[name] += s
    by_scope[(_scope(insts[name][2]), classify(name, insts[name]))] += s
  # the step's wall time: the union of the executors' intervals (a conditional's branch runs a
  # nested executor inside the outer one)
  wall, end = 0.0, float("-inf")
  for e in sorted(execute, key=lambda e: e["ts"]):
    start, stop = max(e["ts"], end), e["ts"] + e["dur"]
    wall, end = wall + max(stop - start, 0.0), max(end, stop)
  # idle inside the step only: between the first and last thunk of each call
  by_class["no thunk event (async Eigen dots, waits)"] = idle
  return {"wall_ms": wall / 1e3 / calls, "by_class_ms": {k: v / 1e3 / calls for k, v in by_class.most_common()},
          "by_scope_ms": {f"{k[0]:10s} {k[1]}": v / 1e3 / calls for k, v in by_scope.most_common()},
          "top_ops_ms": {f"{k} [{classify(k, insts[k])}] {insts[k][0]}": v / 1e3 / calls for k, v in by_op.most_common(25)}}


def attribute_step(step, state, batch, hlo: str, name: str, raw: str = "benchmarks/results/raw", calls: int = 2) -> dict:
  """Profile `calls` calls of a jitted step (xla_ops.profile) and attribute them with its HLO;
  writes RAW/NAME.hlo and the trace under RAW/trace_NAME."""
  os.makedirs(raw, exist_ok=True)
  open(f"{raw}/{name}.hlo", "w").write(hlo)
  holder = [state]

  def run(b):
    holder[0], out = step(holder[0], b)
    return out

  xla_ops.profile(run, (batch,), calls=calls, trace_dir=f"{raw}/trace_{name}")
  return attribute(f"{raw}/trace_{name}", hlo, calls)


def report(out: dict, scope_min_ms: float = 2.0, top: int = 25) -> None:
  print(f"step wall (ThunkExecutor::Execute) {out['wall_ms']:.0f} ms per call")
  for k, v in out["by_class_ms"].items():
    print(f"  {k:45s} {v:8.1f} ms  {v / out['wall_ms']:6.1%}")
  print("by model part:")
  for k, v in out["by_scope_ms"].items():
    if v >= scope_min_ms:
      print(f"  {k:60s} {v:8.1f} ms")
  print("largest ops:")
  for k, v in list(out["top_ops_ms"].items())[:top]:
    print(f"  {k[:110]:110s} {v:7.1f} ms")


def main():
  trace_dir, hlo_file = sys.argv[1], sys.argv[2]
  calls = int(sys.argv[3]) if len(sys.argv) > 3 else 2
  report(attribute(trace_dir, open(hlo_file).read(), calls))


if __name__ == "__main__":
  main()
