"""Layouts: predicted step time, memory per device and communication for a model on a mesh
(data x fsdp x model), on a catalog chip or on this host as calibrated.

Communication per step (SB training.md:626-637, in the ring forms of `collectives`):
- data: one all-reduce of the gradients over the data axis;
- fsdp: all-gather of the parameters in the forward and again in the backward, and a
  reduce-scatter of the gradients, over the fsdp axis (ZeRO-3: 3 x the parameter bytes);
- model (Megatron): per layer, an all-reduce of the block's activations after attention and
  after the MLP, forward and backward (4 per layer), of local batch x length x d_model.

Gradient compression (the documents'; `parallel.allreduce`): the data-parallel all-reduce can
carry bf16 (2 bytes per element) or int8 (1 byte) instead of the compute dtype; FSDP and
tensor-parallel collectives are not compressed.

Overlap assumption, explicit: on an accelerator, data/fsdp collectives overlap the compute of
other layers (T = max(compute, comm)), tensor-parallel all-reduces sit on the critical path and
add. On a CPU host the devices share the cores and nothing overlaps, so every term adds.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from dcmodel.errors import UserError
from dcmodel.perf import collectives
from dcmodel.perf.accounting import Accounting
from dcmodel.perf.hardware import Chip


@dataclasses.dataclass(frozen=True)
class Layout:
  data: int = 1
  fsdp: int = 1
  model: int = 1

  @property
  def devices(self) -> int:
    return self.data * self.fsdp * self.model

  def name(self) -> str:
    parts = [f"{k}{v}" for k, v in dataclasses.asdict(self).items() if v > 1]
    return "x".join(parts) or "single"


def compute_bytes(model_cfg) -> int:
  """Bytes per element of what the collectives move: parameters are gathered, and gradients
  reduced, in the compute dtype (float32 parameters cast to bfloat16 before use)."""
  return 2 if getattr(model_cfg, "dtype", "float32") == "bfloat16" else 4


COMPRESSED_BYTES = {"none": None, "bf16": 2, "int8": 1}   # bytes per gradient element on the wire


def comm_bytes(acc: Accounting, model_cfg, layout: Layout, compression: str = "none") -> dict[str, float]:
  """Array bytes (full size S) moved by each kind of collective in one step."""
  if compression not in COMPRESSED_BYTES:
    raise UserError(f"compression '{compression}' is not one of {', '.join(COMPRESSED_BYTES)}")
  bytes_per_el = compute_bytes(model_cfg)
  p = acc.param_bytes * bytes_per_el / 4
  grads = acc.param_bytes * (COMPRESSED_BYTES[compression] or bytes_per_el) / 4
  out = {"data_all_reduce": grads if layout.data > 1 else 0.0,
         "fsdp_all_gather": 2 * p if layout.fsdp > 1 else 0.0,
         "fsdp_reduce_scatter": p if layout.fsdp > 1 else 0.0,
         "model_all_reduce": 0.0}
  if layout.model > 1 and hasattr(model_cfg, "num_layers"):
    local_tokens = acc.tokens_per_step / (layout.data * layout.fsdp)
    if model_cfg.task != "lm":
      local_tokens *= model_cfg.input_shape()[0]
    out["model_all_reduce"] = 4 * model_cfg.num_layers * local_tokens * model_cfg.d_model * bytes_per_el
  return out


def comm_time_s(acc: Accounting, model_cfg, layout: Layout, bw: float | dict, alpha: float | dict = 0.0,
                compression: str = "none") -> dict[str, float]:
  """Seconds per collective kind; `bw`/`alpha` one figure or per collective (from calibration)."""
  pick = lambda v, k: v[k] if isinstance(v, dict) else v
  b = comm_bytes(acc, model_cfg, layout, compression)
  layers = getattr(model_cfg, "num_layers", 1)
  return {
      "data_all_reduce": collectives.all_reduce(b["data_all_reduce"], layout.data, pick(bw, "all_reduce"), pick(alpha, "all_reduce")),
      "fsdp_all_gather": 2 * layers * collectives.all_gather(b["fsdp_all_gather"] / 2 / layers, layout.fsdp,
                                                             pick(bw, "all_gather"), pick(alpha, "all_gather")),
      "fsdp_reduce_scatter": layers * collectives.reduce_scatter(b["fsdp_reduce_scatter"] / layers, layout.fsdp,
                                                                 pick(bw, "reduce_scatter"), pick(alpha, "reduce_scatter")),
      "model_all_reduce": 4 * layers * collectives.all_reduce(b["model_all_reduce"] / 4 / layers, layout.model,
                                                              pick(bw, "all_reduce"), pick(alpha, "all_reduce")),
  }


def memory_per_device(acc: Accounting, layout: Layout) -> dict[str, float]:
  """Bytes per device: parameters, gradients and optimizer state split over fsdp x model (the
  rules shard every large weight over both), activations split over the batch axes (and the
  MLP/attention part over model; counted whole here, an upper bound)."""
  shard = layout.fsdp * layout.model
  out = {"params": acc.param_bytes / shard, "grads": acc.grad_bytes / shard,
         "optimizer": acc.optimizer_bytes / shard, "activations": acc.activation_bytes / (layout.data * layout.fsdp)}
  out["total"] = sum(out.values())
  return out


@dataclasses.dataclass(frozen=True)
class Prediction:
  layout: Layout
  step_s: float
  compute_s: float
  memory_s: float
  comm_s: dict
  memory_per_device_bytes: float
  mfu: float
  bottleneck: str
  why: str

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["layout"] = self.layout.name()
    d["mesh"] = dataclasses.asdict(self.layout)
    return d


def _explain(bottleneck: str, layout: Layout, comm: dict) -> str:
  if bottleneck == "compute":
    return "matmul FLOPs at peak dominate"
  if bottleneck == "memory":
    return "memory traffic dominates (small matmuls or elementwise work)"
  kind = max(comm, key=comm.get)
  return {"data_all_reduce": f"gradient all-reduce over data={layout.data}: per-device batch below C/W",
          "fsdp_all_gather": f"parameter all-gathers over fsdp={layout.fsdp}: per-device batch below C/W",
          "fsdp_reduce_scatter": f"gradient reduce-scatter over fsdp={layout.fsdp}",
          "model_all_reduce": f"activation all-reduces over model={layout.model}: d_ff too small for Y x C/W"}[kind]


def predict_on_chip(acc: Accounting, model_cfg, layout: Layout, chip: Chip, hbm_bytes_per_step: float | None = None,
                    compression: str = "none") -> Prediction:
  """Accelerator step time: roofline of the per-device work (matmuls at the chip's achievable
  share of peak), plus exposed communication. MFU is against the full catalog peak."""
  n = layout.devices
  compute = acc.flops_per_step / (n * chip.bf16_flops * chip.achievable)
  traffic = hbm_bytes_per_step if hbm_bytes_per_step is not None else acc.matmul_bytes / 2   # bf16 operands
  memory = traffic / (n * chip.hbm_bw)
  # rings over ICI / NVLink use both directions of a link: bidirectional bandwidth = 2 x one-way (SB sharding.md:326-336)
  comm = comm_time_s(acc, model_cfg, layout, 2 * chip.link_bw, 1e-6, compression)
  overlapped = comm["data_all_reduce"] + comm["fsdp_all_gather"] + comm["fsdp_reduce_scatter"]
  core = max(compute, memory)
  step = max(core, overlapped) + comm["model_all_reduce"]
  terms = {"compute": compute, "memory": memory, "communication": overlapped + comm["model_all_reduce"]}
  bottleneck = max(terms, key=terms.get)
  mem = memory_per_device(acc, layout)["total"]
  return Prediction(layout, step, compute, memory, comm, mem, acc.flops_per_step / (step * n * chip.bf16_flops),
                    bottleneck, _explain(bottleneck, layout, comm))


ADAM_UPDATE_BYTES_PER_PARAM = 28   # read param, grad, m, v and write param, m, v, float32


def predict_on_host(acc: Accounting, model_cfg, layout: Layout, cal, one_device_bytes: float) -> Prediction:
  """This host as calibrated. The step's memory traffic is XLA's bytes accessed for the step
  compiled on one device (layout-free), minus the matmul operands (which stream from cache and
  are timed by the matmul peak), at the measured bandwidth; each extra data-parallel replica
  repeats the optimizer update over its parameters; collectives cost their fitted alpha-beta.
  The simulated devices share the cores, so nothing overlaps and the terms add."""
  compute = acc.flops_per_step / cal.matmul_flops
  params = acc.param_bytes / 4
  traffic = max(one_device_bytes - acc.matmul_bytes, 0.0) + (layout.data - 1) * ADAM_UPDATE_BYTES_PER_PARAM * params
  memory = traffic / cal.mem_bw
  coll = cal.collectives
  comm = comm_time_s(acc, model_cfg, layout, {k: v["bw"] for k, v in coll.items()}, {k: v["alpha_s"] for k, v in coll.items()})
  step = compute + memory + sum(comm.values())
  terms = {"compute": compute, "memory": memory, "communication": sum(comm.values())}
  bottleneck = max(terms, key=terms.get)
  return Prediction(layout, step, compute, memory, comm, memory_per_device(acc, layout)["total"],
                    acc.flops_per_step / (step * cal.matmul_flops), bottleneck, _explain(bottleneck, layout, comm))


def candidate_layouts(chips: int, model_cfg) -> list[Layout]:
  """Every data x fsdp x model factorization of `chips` whose model axis divides the heads
  and d_ff (powers of two up to 64-way tensor parallelism)."""
  out = []
  for model, fsdp in itertools.product([1, 2, 4, 8, 16, 32, 64], repeat=2):
    if chips % (model * fsdp):
      continue
    heads = getattr(model_cfg, "num_heads", None)
    if model > 1 and (heads is None or heads % model or model_cfg.d_ff % model):
      continue
    out.append(Layout(chips // (model * fsdp), fsdp, model))
  return out


def comm_bound_thresholds(chip: Chip, model_cfg) -> dict[str, float]:
  """SB training.md:204-373: DP/FSDP need per-device batch tokens above C/W; TP needs
  d_ff > Y x C/W. Returns the thresholds for this chip (one-way link bandwidth, x2 bidirectional)."""
  alpha = chip.bf16_flops / (2 * chip.link_bw)
  return {"min_tokens_per_device_dp_fsdp": alpha,
          "max_model_axis_tp": math.floor(getattr(model_cfg, "d_ff", 0) / alpha) if alpha else 0}
