"""`dcmodel plan`: for a model on a target system, the candidate meshes ranked by predicted step
time, each with its step split into compute, recompute, memory-bound work, exposed
communication and pipeline bubble (they sum to the step), memory per device, MFU, the
bottleneck and why; then the documents' two optimization models applied to the best layout:
its data-parallel replicas placed on hosts (resource allocation, MILP) and each step's input
routed from storage to the hosts (min-cost flow), with the utilization and transfer time they
achieve. `mesh` names one layout to evaluate instead of searching (e.g. a published run's).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dcmodel.config import Config
from dcmodel.errors import UserError
from dcmodel.perf import hardware, optimize
from dcmodel.perf.accounting import account, transformer_accounting, transformer_saved_bytes
from dcmodel.perf.layouts import AXES, Layout, candidate_layouts, comm_bound_thresholds, predict


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=256,model=12,stage=1' -> sizes (axes left out are 1)."""
  sizes = {a: 1 for a in AXES}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in sizes or not value.isdigit() or int(value) < 1:
      raise UserError(f"--mesh '{part}': expected AXIS=N with AXIS one of {', '.join(AXES)} and N >= 1")
    sizes[name] = int(value)
  return sizes


def named_layout(mesh: dict[str, int], chips: int, batch: int, microbatches: int | None, interleave: int) -> Layout:
  """The layout a user names; a pipelined one defaults to one sequence per microbatch."""
  layout = Layout(**mesh)
  if layout.devices != chips:
    raise UserError(f"--mesh uses {layout.devices} chips ({layout.name()}) but --chips is {chips}")
  if batch % layout.replicas:
    raise UserError(f"data.global_batch_size={batch} does not split over data x fsdp = {layout.replicas}")
  per_replica = batch // layout.replicas
  m = microbatches or (per_replica if layout.stage > 1 else 1)
  if per_replica % m:
    raise UserError(f"--microbatches {m} does not divide the {per_replica} sequences each data x fsdp replica gets")
  if interleave > 1 and (layout.stage == 1 or m % layout.stage):
    raise UserError(f"--interleave {interleave} needs a pipeline (stage > 1) and microbatches divisible by stage={layout.stage}")
  return Layout(layout.data, layout.fsdp, layout.model, layout.stage, m, interleave)


def accounting_for(cfg: Config):
  """Transformers from the closed forms (equal to the traced count, and instant at any size),
  with the activations jax.grad keeps traced on two layers of one sequence; every other model
  from its jaxpr."""
  if cfg.model.name in ("gpt", "bert"):
    acc = transformer_accounting(cfg.model, cfg.data.global_batch_size)
    return dataclasses.replace(acc, activation_bytes=transformer_saved_bytes(cfg))
  return account(cfg)


def plan(cfg: Config, hardware_name: str, chips: int, chips_per_host: int | None = None, compression: str = "none",
         mesh: dict[str, int] | None = None, microbatches: int | None = None, interleave: int = 1,
         attention: str = "dense") -> dict:
  chip = hardware.get(hardware_name)
  if chips < 1:
    raise UserError(f"--chips must be >= 1, got {chips}")
  acc = accounting_for(cfg)
  batch = cfg.data.global_batch_size
  layouts = ([named_layout(mesh, chips, batch, microbatches, interleave)] if mesh
             else candidate_layouts(chips, cfg.model, batch))
  rows = []
  for layout in layouts:
    p = predict(acc, cfg.model, layout, chip, compression=compression, attention=attention)
    rows.append({**p.as_dict(), "fits": p.memory_per_device_bytes <= chip.hbm_bytes,
                 "predicted_step_s": p.step_s, "memory_per_device_bytes": p.memory_per_device_bytes})
  if not rows:
    raise UserError(f"no mesh of {chips} chips fits this model and batch: data x fsdp must divide data.global_batch_size={batch}, "
                    f"model the heads and d_ff, stage at most the layers; change --chips or the batch")
  rows.sort(key=lambda r: (not r["fits"], r["predicted_step_s"]))
  best = rows[0]
  out = {"model": cfg.model.name, "hardware": chip.name, "hardware_source": chip.source, "chips": chips,
         "params": acc.params, "flops_per_step": acc.flops_per_step, "flops_recompute": acc.flops_recompute,
         "tokens_per_step": acc.tokens_per_step, "global_batch_size": batch, "gradient_compression": compression,
         "attention": attention, "best": best["layout"], "memory_per_device_bytes": best["memory_per_device_bytes"],
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
  replica_chips = best["mesh"]["fsdp"] * best["mesh"]["model"] * best["mesh"]["stage"]
  replicas = best["mesh"]["data"]
  demand = np.full(replicas, best["memory_per_device_bytes"] * replica_chips)
  capacity = np.full(hosts, chip.hbm_bytes * per_host)
  if replica_chips > per_host:   # a replica spans hosts: allocate per host-sized piece
    pieces = replica_chips // per_host
    demand = np.full(replicas * pieces, best["memory_per_device_bytes"] * per_host)
  # Hosts are alike and so are the pieces: the placement of one block of hosts/k hosts and
  # pieces/k pieces, repeated k times, is optimal for the whole; k keeps the MILP small
  # (thousands of hosts would need a dense matrix of hosts x pieces x hosts).
  k = _block_count(len(capacity), len(demand))
  block = optimize.allocate(capacity[: len(capacity) // k], demand[: len(demand) // k], integral=True)
  alloc = optimize.Allocation(np.tile(block.x, (k, 1)), block.allocated * k, np.tile(block.utilization, k),
                              np.tile(block.placed, k))
  input_bytes = acc.examples_per_step * int(np.prod(cfg.model.input_shape())) * 4
  # nodes: 0 storage, 1-2 spines, 3.. hosts
  n = 3 + hosts
  edges, cost, cap = [], [], []
  for s in (1, 2):
    edges.append((0, s)), cost.append(1.0), cap.append(chip.dcn_bw * chips / 2)
    for h in range(hosts):
      edges.append((s, 3 + h)), cost.append(1.0 + (h % 2 != s - 1)), cap.append(chip.dcn_bw * per_host)
  rate = float(input_bytes)                                  # bytes per step, routed as a rate per second
  # solved in units of the whole rate, no link above it (none can carry more): link capacities
  # of 1e13 B/s beside per-host flows of 1e4 B/s are beyond the LP solver's tolerances
  supply = np.zeros(n)
  supply[0] = 1.0
  supply[3:] = -1.0 / hosts
  cap = np.asarray(cap)
  flow = optimize.min_cost_flow(n, edges, cost, np.minimum(cap / rate, 1.0), supply)
  busiest = float(np.max(flow.flow * rate / cap))
  return {"hosts": hosts, "chips_per_host": per_host, "replicas_placed": int((alloc.placed >= 0).sum()),
          "replicas": int(len(demand)), "host_hbm_utilization": alloc.utilization.round(3).tolist(),
          "input_bytes_per_step": input_bytes,
          "input_transfer_s": optimize.transfer_time_s(input_bytes, rate / busiest) if busiest > 0 else 0.0,
          "input_link_utilization": busiest}


def _block_count(hosts: int, pieces: int, limit: int = 4096) -> int:
  """The fewest equal blocks that split both hosts and pieces with at most `limit` host x piece pairs each."""
  common = math.gcd(hosts, pieces)
  for k in range(1, common + 1):
    if common % k == 0 and (hosts // k) * (pieces // k) <= limit:
      return k
  return common


def _seconds(x: float) -> str:
  return f"{x:.3f}s" if x >= 1 else f"{1e3 * x:.2f}ms" if x >= 1e-3 else f"{1e6 * x:.1f}us"


def render(out: dict) -> str:
  gib = lambda b: f"{b / 2**30:.1f} GiB"
  lines = [f"{out['model']}: {out['params']:,} params, {out['flops_per_step']:.3e} FLOPs/step "
           f"({out['tokens_per_step']:,} tokens; remat recomputes {out['flops_recompute']:.3e} more), "
           f"on {out['chips']} x {out['hardware']}, attention {out['attention']}",
           "step = compute + recompute + memory-bound + exposed comm + bubble",
           f"{'mesh':34s} {'step':>9s} {'MFU':>5s} {'compute':>9s} {'recomp':>9s} {'memory':>9s} {'comm':>9s} {'bubble':>9s} "
           f"{'mem/device':>11s} fits  bottleneck: why"]
  for r in out["candidates"][:12]:
    parts = " ".join(f"{_seconds(r[k]):>9s}" for k in ("compute_s", "recompute_s", "memory_s", "exposed_comm_s", "bubble_s"))
    lines.append(f"{r['layout']:34s} {_seconds(r['predicted_step_s']):>9s} {r['mfu']:5.0%} {parts} "
                 f"{gib(r['memory_per_device_bytes']):>11s} {'yes ' if r['fits'] else 'NO  '}  {r['bottleneck']}: {r['why']}")
  if len(out["candidates"]) > 12:
    lines.append(f"... {len(out['candidates']) - 12} more (--json for all)")
  best = out["candidates"][0]
  shown = {k: v for k, v in best["exposed_s"].items() if best["comm_s"][k]}
  if shown:
    lines.append("best layout's collectives, exposed / total: " + ", ".join(
        f"{k} {1e3 * v:.1f}/{1e3 * best['comm_s'][k]:.1f} ms" for k, v in shown.items()))
  pl = out["placement"]
  lines.append(f"placement: {pl['replicas_placed']}/{pl['replicas']} replica pieces on {pl['hosts']} hosts "
               f"(HBM use per host {min(pl['host_hbm_utilization']):.0%}-{max(pl['host_hbm_utilization']):.0%}); "
               f"input {pl['input_bytes_per_step'] / 2**20:.1f} MiB/step routed in {1e6 * pl['input_transfer_s']:.1f} us "
               f"(busiest link {pl['input_link_utilization']:.0%})")
  th = out["thresholds"]
  lines.append(f"comm-bound below {th['min_tokens_per_device_dp_fsdp']:.0f} tokens/device for DP/FSDP; "
               f"TP stays compute-bound up to model={th['max_model_axis_tp']}")
  return "\n".join(lines)
