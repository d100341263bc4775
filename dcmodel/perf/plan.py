"""`dcmodel plan`: for a model on a target system, the candidate meshes ranked by predicted step
time, with memory per device, MFU, the bottleneck and why; then the documents' two
optimization models applied to the best layout: its data-parallel replicas placed on hosts
(resource allocation, MILP) and each step's input routed from storage to the hosts (min-cost
flow), with the utilization and transfer time they achieve.
"""

from __future__ import annotations

import numpy as np

from dcmodel.config import Config
from dcmodel.errors import UserError
from dcmodel.perf import hardware, optimize
from dcmodel.perf.accounting import account
from dcmodel.perf.layouts import candidate_layouts, comm_bound_thresholds, predict_on_chip


def plan(cfg: Config, hardware_name: str, chips: int, chips_per_host: int | None = None, compression: str = "none") -> dict:
  chip = hardware.get(hardware_name)
  if chips < 1:
    raise UserError(f"--chips must be >= 1, got {chips}")
  acc = account(cfg)
  batch = cfg.data.global_batch_size
  rows = []
  for layout in candidate_layouts(chips, cfg.model):
    if batch % (layout.data * layout.fsdp):
      continue
    p = predict_on_chip(acc, cfg.model, layout, chip, compression=compression)
    rows.append({**p.as_dict(), "fits": p.memory_per_device_bytes <= chip.hbm_bytes,
                 "predicted_step_s": p.step_s, "memory_per_device_bytes": p.memory_per_device_bytes})
  if not rows:
    raise UserError(f"no mesh of {chips} chips splits data.global_batch_size={batch}; use a batch divisible by the data axes")
  rows.sort(key=lambda r: (not r["fits"], r["predicted_step_s"]))
  best = rows[0]
  out = {"model": cfg.model.name, "hardware": chip.name, "hardware_source": chip.source, "chips": chips,
         "params": acc.params, "flops_per_step": acc.flops_per_step, "tokens_per_step": acc.tokens_per_step,
         "global_batch_size": batch, "gradient_compression": compression, "best": best["layout"], "memory_per_device_bytes": best["memory_per_device_bytes"],
         "predicted_step_s": best["predicted_step_s"], "mfu": best["mfu"], "bottleneck": best["bottleneck"],
         "fits": best["fits"], "thresholds": comm_bound_thresholds(chip, cfg.model), "candidates": rows}
  out["placement"] = _place_and_route(acc, best, chip, chips, chips_per_host or (4 if chip.name.startswith("tpu") else 8), cfg)
  return out


def _place_and_route(acc, best: dict, chip, chips: int, per_host: int, cfg: Config) -> dict:
  """Resource allocation: each data-parallel replica (fsdp x model chips, with its memory) is a
  job; hosts are nodes with per_host chips of HBM; the MILP places whole replicas.
  Data transfer: each step's input batch flows from a storage node through two spine switches
  to the hosts over data-center-network links (capacity = the chips' DCN bandwidth, cost =
  hops); the min-cost flow routes it and gives the time per step."""
  hosts = max(chips // per_host, 1)
  replica_chips = best["mesh"]["fsdp"] * best["mesh"]["model"]
  replicas = best["mesh"]["data"]
  demand = np.full(replicas, best["memory_per_device_bytes"] * replica_chips)
  capacity = np.full(hosts, chip.hbm_bytes * per_host)
  if replica_chips > per_host:   # a replica spans hosts: allocate per host-sized piece
    pieces = replica_chips // per_host
    demand = np.full(replicas * pieces, best["memory_per_device_bytes"] * per_host)
  alloc = optimize.allocate(capacity, demand, integral=True)
  input_bytes = acc.examples_per_step * int(np.prod(cfg.model.input_shape())) * 4
  # nodes: 0 storage, 1-2 spines, 3.. hosts
  n = 3 + hosts
  edges, cost, cap = [], [], []
  for s in (1, 2):
    edges.append((0, s)), cost.append(1.0), cap.append(chip.dcn_bw * chips / 2)
    for h in range(hosts):
      edges.append((s, 3 + h)), cost.append(1.0 + (h % 2 != s - 1)), cap.append(chip.dcn_bw * per_host)
  rate = float(input_bytes)                                  # bytes per step, routed as a rate per second
  supply = np.zeros(n)
  supply[0] = rate
  supply[3:] = -rate / hosts
  flow = optimize.min_cost_flow(n, edges, cost, cap, supply)
  return {"hosts": hosts, "chips_per_host": per_host, "replicas_placed": int((alloc.placed >= 0).sum()),
          "replicas": int(len(demand)), "host_hbm_utilization": alloc.utilization.round(3).tolist(),
          "input_bytes_per_step": input_bytes,
          "input_transfer_s": optimize.transfer_time_s(input_bytes, rate / flow.bottleneck_utilization)
          if flow.bottleneck_utilization > 0 else 0.0,
          "input_link_utilization": flow.bottleneck_utilization}


def render(out: dict) -> str:
  gib = lambda b: f"{b / 2**30:.1f} GiB"
  lines = [f"{out['model']}: {out['params']:,} params, {out['flops_per_step']:.3e} FLOPs/step "
           f"({out['tokens_per_step']:,} tokens), on {out['chips']} x {out['hardware']}",
           f"{'mesh':24s} {'step':>9s} {'MFU':>5s} {'mem/device':>11s} fits  bottleneck: why"]
  for r in out["candidates"][:12]:
    lines.append(f"{r['layout']:24s} {r['predicted_step_s']:8.3f}s {r['mfu']:5.0%} {gib(r['memory_per_device_bytes']):>11s} "
                 f"{'yes ' if r['fits'] else 'NO  '}  {r['bottleneck']}: {r['why']}")
  if len(out["candidates"]) > 12:
    lines.append(f"... {len(out['candidates']) - 12} more (--json for all)")
  pl = out["placement"]
  lines.append(f"placement: {pl['replicas_placed']}/{pl['replicas']} replica pieces on {pl['hosts']} hosts "
               f"(HBM use per host {min(pl['host_hbm_utilization']):.0%}-{max(pl['host_hbm_utilization']):.0%}); "
               f"input {pl['input_bytes_per_step'] / 2**20:.1f} MiB/step routed in {1e6 * pl['input_transfer_s']:.1f} us "
               f"(busiest link {pl['input_link_utilization']:.0%})")
  th = out["thresholds"]
  lines.append(f"comm-bound below {th['min_tokens_per_device_dp_fsdp']:.0f} tokens/device for DP/FSDP; "
               f"TP stays compute-bound up to model={th['max_model_axis_tp']}")
  return "\n".join(lines)

