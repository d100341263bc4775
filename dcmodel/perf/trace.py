"""Where a step's time goes: the top ops of a `jax.profiler` trace (`train --profile-steps A:B`),
each beside its roofline prediction (perf.roofline).

A trace's device events name the compiled step's HLO ops (`hlo_op`); the train step's HLO text,
saved beside the trace, says what each op is. An op's FLOPs are its matmuls' and convolutions'
(inside a fusion too; elementwise work is left out, the convention of perf.accounting), its bytes
the operands it reads and the result it writes; the prediction is max(FLOPs / peak, bytes /
bandwidth) per device, with the peak and bandwidth of perf.peak (this host's calibration, or the
catalog's chip). Collectives and control flow get no prediction: the roofline does not model them.
Measured times are per step and per device: summed over the traced steps and devices, divided by both.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
from jax.profiler import ProfileData

from dcmodel.errors import UserError
from dcmodel.perf.roofline import Roofline

HLO_FILE, INFO_FILE = "train_step.hlo.txt", "trace.json"
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\b([a-z][a-z0-9_\-]*)\(")
_COMPUTATION = re.compile(r"^%([\w.\-]+)\s*\(")
NO_PREDICTION = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "conditional",
                 "while", "call", "custom-call", "send", "recv", "infeed", "outfeed")


@dataclasses.dataclass
class HloOp:
  name: str
  opcode: str
  shape: str                     # result shape text
  operands: list[str]
  attrs: str
  computation: str

  @property
  def fused(self) -> str | None:
    m = re.search(r"calls=%([\w.\-]+)", self.attrs)
    return m.group(1) if m else None

  @property
  def source(self) -> str:
    """The jax operation it came from (metadata op_name, without the jit(...) prefixes)."""
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return re.sub(r"^(jit\([^)]*\)/)+", "", m.group(1)) if m else ""


def shape_bytes(text: str) -> int:
  return sum(DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _SHAPE.findall(text))


def _dims(text: str) -> list[int]:
  m = _SHAPE.search(text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def parse_hlo(text: str) -> dict[str, HloOp]:
  """Every instruction of a compiled module's text, by name."""
  ops, computation = {}, ""
  for line in text.splitlines():
    head = _COMPUTATION.match(line) or re.match(r"^ENTRY\s+%([\w.\-]+)", line)
    if head:
      computation = head.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, rest = m.groups()
    op = _OPCODE.search(rest)
    if not op:
      continue
    shape = rest[:op.start()].strip()
    args_start = op.end()
    depth, i = 1, args_start
    while i < len(rest) and depth:
      depth += {"(": 1, ")": -1}.get(rest[i], 0)
      i += 1
    operands = re.findall(r"%([\w.\-]+)", rest[args_start:i - 1])
    ops[name] = HloOp(name, op.group(1), shape, operands, rest[i:], computation)
  return ops


def matmul_flops(op: HloOp, ops: dict[str, HloOp]) -> int:
  """2 x multiply-adds of a dot or convolution instruction."""
  out = math.prod(_dims(op.shape))
  if op.opcode == "dot":
    lhs = _dims(ops[op.operands[0]].shape)
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", op.attrs)
    contracted = [int(d) for d in m.group(1).split(",") if d] if m else []
    return 2 * out * math.prod(lhs[d] for d in contracted)
  if op.opcode == "convolution":
    rhs = _dims(ops[op.operands[1]].shape)
    m = re.search(r"dim_labels=\w+_(\w+)->", op.attrs)
    kernel = m.group(1) if m else ""
    out_feature = rhs[kernel.index("o")] if "o" in kernel else 1
    groups = re.search(r"feature_group_count=(\d+)", op.attrs)
    return 2 * out * math.prod(rhs) // max(out_feature, 1) // (int(groups.group(1)) if groups else 1)
  return 0


def op_flops(op: HloOp, ops: dict[str, HloOp]) -> int:
  if op.opcode in ("dot", "convolution"):
    return matmul_flops(op, ops)
  if op.fused:
    return sum(matmul_flops(o, ops) for o in ops.values() if o.computation == op.fused and o.opcode in ("dot", "convolution"))
  return 0


def op_bytes(op: HloOp, ops: dict[str, HloOp]) -> int:
  return shape_bytes(op.shape) + sum(shape_bytes(ops[o].shape) for o in op.operands if o in ops)


def find(workdir: str | Path) -> Path:
  """The newest trace directory under WORKDIR/profile/ (a workdir, its profile/, or a trace directory)."""
  p = Path(workdir)
  if list(p.glob("*.xplane.pb")):
    return p
  runs = sorted(p.glob("plugins/profile/*")) + sorted(p.glob("profile/plugins/profile/*"))
  runs = [r for r in runs if list(r.glob("*.xplane.pb"))]
  if not runs:
    raise UserError(f"no profiler trace under {p}; make one with dcmodel train ... --profile-steps A:B --workdir {p}")
  return max(runs, key=lambda r: r.stat().st_mtime)


def measured(xplane: Path, module: str | None = None) -> dict[str, tuple[float, int]]:
  """Per HLO op of `module` (default: the one with most time): (total ns, events), all devices."""
  data = ProfileData.from_file(str(xplane))
  by_module: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        if "hlo_op" in stats:
          slot = by_module[stats.get("hlo_module", "")][stats["hlo_op"]]
          slot[0] += ev.duration_ns
          slot[1] += 1
  if not by_module:
    raise UserError(f"{xplane} holds no device ops")
  module = module or max(by_module, key=lambda m: sum(t for t, _ in by_module[m].values()))
  return {k: (t, n) for k, (t, n) in by_module[module].items()}


def top_ops(trace_dir: Path, peak_flops: float, bandwidth: float, top: int = 10) -> dict:
  """The `top` ops by measured time, per step and device, beside their roofline predictions."""
  info = json.loads((trace_dir / INFO_FILE).read_text()) if (trace_dir / INFO_FILE).exists() else {}
  steps, devices = max(info.get("steps", 1), 1), max(info.get("devices", 1), 1)
  hlo = parse_hlo((trace_dir / HLO_FILE).read_text()) if (trace_dir / HLO_FILE).exists() else {}
  times = {}
  for xplane in trace_dir.glob("*.xplane.pb"):       # one file per host
    for name, (ns, n) in measured(xplane).items():
      t, c = times.get(name, (0.0, 0))
      times[name] = (t + ns, c + n)
  total = sum(t for t, _ in times.values())
  rows = []
  for name, (ns, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
    op = hlo.get(name)
    row = {"op": name, "kind": op.opcode if op else "?", "from": op.source if op else "",
           "share": ns / total, "measured_s": ns / 1e9 / steps / devices, "calls_per_step": n / steps / devices}
    if op is not None and op.opcode not in NO_PREDICTION and not any(op.opcode.startswith(c) for c in NO_PREDICTION):
      flops, nbytes = op_flops(op, hlo), op_bytes(op, hlo)
      roof = Roofline(flops, max(nbytes, 1), peak_flops, bandwidth)
      row.update(flops=flops, bytes=nbytes, bound="compute" if flops and roof.compute_bound else "memory",
                 predicted_s=roof.time_s * row["calls_per_step"])
    rows.append(row)
  return {"trace": str(trace_dir), "steps": steps, "devices": devices, "peak_flops_per_device": peak_flops,
          "bandwidth_per_device": bandwidth, "measured_s_per_step": total / 1e9 / steps / devices, "ops": rows}


def render(report: dict) -> str:
  lines = [f"top ops of {report['trace']} ({report['steps']} steps x {report['devices']} devices; per step and device: "
           f"{report['measured_s_per_step'] * 1e3:.2f} ms of ops; roofline at {report['peak_flops_per_device'] / 1e9:.1f} "
           f"GFLOP/s and {report['bandwidth_per_device'] / 1e9:.2f} GB/s per device)",
           f"{'op':28s} {'kind':14s} {'share':>6s} {'measured':>10s} {'predicted':>10s} {'bound':8s} from"]
  for r in report["ops"]:
    pred = f"{r['predicted_s'] * 1e6:8.1f}us" if "predicted_s" in r else f"{'-':>10s}"
    lines.append(f"{r['op'][:28]:28s} {r['kind'][:14]:14s} {r['share']:6.1%} {r['measured_s'] * 1e6:8.1f}us {pred} "
                 f"{r.get('bound', '-'):8s} {r['from'][:60]}")
  return "\n".join(lines)


def median_ratio(report: dict) -> float:
  """Median of measured / predicted over the ops with a prediction."""
  ratios = [r["measured_s"] / r["predicted_s"] for r in report["ops"] if r.get("predicted_s")]
  return float(np.median(ratios)) if ratios else float("nan")
