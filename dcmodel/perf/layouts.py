"""Layouts: predicted step time, memory per device and communication for a model on a mesh
(data x fsdp x model x stage, with microbatches), on a catalog chip or on this host as
calibrated. One step model serves both: the host is a `Chip` built from its calibration.

The step, per device, is a sum of five parts (kernels run one after another; only
collectives run beside them):
- compute: every matmul of the forward and backward passes at the chip's efficiency for its
  shape (`Chip.matmul_efficiency`), or at its operand traffic if that takes longer (roofline);
- recompute: the forward matmuls remat recomputes in the backward pass (MFU leaves them out);
- memory: the non-matmul work, bound by HBM bandwidth: norms, residual adds, activations,
  rotary, dropout, softmax over the T x T scores when attention is not fused (flash/splash
  kernels keep them on chip), the cross-entropy over the vocabulary, the optimizer update;
- exposed communication, per collective (SB training.md:626-637, in the ring forms of
  `collectives`): data-axis gradient all-reduce (overlaps the last microbatch's backward);
  FSDP all-gathers of the parameters, forward and backward, and the gradient reduce-scatter,
  once per microbatch (prefetched under compute: only the first layer's and any excess show);
  Megatron tensor-parallel all-reduces of the activations, 4 per layer per microbatch and 2
  more for a recomputed forward (on the critical path: fully exposed); pipeline sends between
  stages (exposed). On a host whose devices share the cores nothing overlaps;
- bubble: a pipeline of p stages and m microbatches idles (p-1)/(v m) of its busy time
  (1F1B, Megatron arXiv:2104.04473 s2.2; v model chunks per stage when interleaved).

Axes are placed innermost first: model, fsdp, data, stage (Megatron's order; MaxText puts the
data axis across slices). An axis that stays inside the chip's fast domain (a GPU node, a TPU
slice) runs at ICI/NVLink bandwidth; one that leaves it crosses the data-center network.

Gradient compression (the documents'; `parallel.allreduce`): the data-parallel all-reduce can
carry bf16 (2 bytes per element) or int8 (1 byte) instead of the compute dtype; FSDP and
tensor-parallel collectives are not compressed.
"""

from __future__ import annotations

import dataclasses
import math

from dcmodel.errors import UserError
from dcmodel.perf import collectives
from dcmodel.perf.accounting import Accounting
from dcmodel.perf.hardware import Chip, from_calibration

AXES = ("data", "fsdp", "model", "stage")


@dataclasses.dataclass(frozen=True)
class Layout:
  data: int = 1
  fsdp: int = 1
  model: int = 1
  stage: int = 1
  microbatches: int = 1       # per step and data replica: gradient accumulation, or the pipeline's microbatches
  interleave: int = 1         # model chunks per pipeline stage (Megatron's interleaved 1F1B)

  @property
  def devices(self) -> int:
    return self.data * self.fsdp * self.model * self.stage

  @property
  def replicas(self) -> int:
    """Ways the batch is split (data x fsdp)."""
    return self.data * self.fsdp

  def name(self) -> str:
    parts = [f"{a}{getattr(self, a)}" for a in AXES if getattr(self, a) > 1]
    extra = (f" m{self.microbatches}" if self.microbatches > 1 else "") + (f" v{self.interleave}" if self.interleave > 1 else "")
    return ("x".join(parts) or "single") + extra


def compute_bytes(model_cfg) -> int:
  """Bytes per element of what the collectives move: parameters are gathered, and gradients
  reduced, in the compute dtype (float32 parameters cast to bfloat16 before use)."""
  return 2 if getattr(model_cfg, "dtype", "float32") == "bfloat16" else 4


COMPRESSED_BYTES = {"none": None, "bf16": 2, "int8": 1}   # bytes per gradient element on the wire
ADAM_UPDATE_BYTES_PER_PARAM = 28   # read param, grad, m, v and write param, m, v, float32
ATTENTION = ("dense", "dense-dropout", "flash")


def _is_transformer(model_cfg) -> bool:
  return hasattr(model_cfg, "num_heads") and hasattr(model_cfg, "d_ff")


def _layers(model_cfg) -> int:
  return getattr(model_cfg, "num_layers", 1)


def _remat(model_cfg) -> str:
  return getattr(model_cfg, "remat", "none")


def comm_bytes(acc: Accounting, model_cfg, layout: Layout, compression: str = "none") -> dict[str, float]:
  """Array bytes (full size S) moved by each kind of collective in one step, as one device
  sees them. Data and fsdp collectives carry the device's slice of the parameters (1/model of
  a layer, 1/stage of the layers); FSDP gathers and reduce-scatters once per microbatch; a
  recomputed forward repeats its 2 tensor-parallel all-reduces."""
  if compression not in COMPRESSED_BYTES:
    raise UserError(f"compression '{compression}' is not one of {', '.join(COMPRESSED_BYTES)}")
  bytes_per_el = compute_bytes(model_cfg)
  shard = layout.model * layout.stage                 # what one fsdp group gathers: its model and stage slice
  p = acc.param_bytes * bytes_per_el / 4 / shard
  # the data axis reduces what is left after the fsdp reduce-scatter
  grads = acc.param_bytes * (COMPRESSED_BYTES[compression] or bytes_per_el) / 4 / (shard * layout.fsdp)
  m = layout.microbatches
  out = {"data_all_reduce": grads if layout.data > 1 else 0.0,
         "fsdp_all_gather": 2 * m * p if layout.fsdp > 1 else 0.0,
         "fsdp_reduce_scatter": m * p if layout.fsdp > 1 else 0.0,
         "model_all_reduce": 0.0, "stage_send": 0.0}
  if hasattr(model_cfg, "num_layers"):
    local_tokens = acc.tokens_per_step / layout.replicas
    if model_cfg.task != "lm":
      local_tokens *= model_cfg.input_shape()[0]
    per_layer = 4 + (2 if _remat(model_cfg) == "block" else 0)
    if layout.model > 1:
      out["model_all_reduce"] = per_layer * _stage_layers(model_cfg, layout) * local_tokens * model_cfg.d_model * bytes_per_el
    if layout.stage > 1:   # activations forward and their gradients back, split over the model axis (scatter/gather)
      out["stage_send"] = 2 * layout.interleave * local_tokens * model_cfg.d_model * bytes_per_el / layout.model
  return out


def _stage_layers(model_cfg, layout: Layout) -> int:
  """Layers on the busiest stage (an uneven split runs at the pace of the larger stages)."""
  return math.ceil(_layers(model_cfg) / layout.stage)


def axis_bandwidths(chip: Chip, layout: Layout) -> dict[str, float]:
  """One-way bytes/s per device along each mesh axis, the axes placed innermost first
  model, fsdp, data, stage."""
  out, inner = {}, 1
  for axis in ("model", "fsdp", "data", "stage"):
    size = getattr(layout, axis)
    out[axis] = chip.axis_bandwidth(size, inner)
    inner *= size
  return out


def comm_time_s(acc: Accounting, model_cfg, layout: Layout, bw: float | dict, alpha: float | dict = 0.0,
                compression: str = "none") -> dict[str, float]:
  """Seconds per collective kind. `bw`/`alpha`: one figure, or a dict keyed by collective (a
  host's fitted alpha-beta) or by mesh axis (a chip's axis bandwidths, `axis_bandwidths`)."""
  def pick(v, coll, axis):
    if not isinstance(v, dict):
      return v
    return v[coll] if coll in v else v[axis]
  b = comm_bytes(acc, model_cfg, layout, compression)
  layers = _stage_layers(model_cfg, layout)
  m = layout.microbatches
  per_layer = 4 + (2 if _remat(model_cfg) == "block" else 0)
  n_ag, n_ar = 2 * m * layers, per_layer * m * layers
  return {
      "data_all_reduce": collectives.all_reduce(b["data_all_reduce"], layout.data, pick(bw, "all_reduce", "data"),
                                                pick(alpha, "all_reduce", "data")),
      "fsdp_all_gather": n_ag * collectives.all_gather(b["fsdp_all_gather"] / n_ag, layout.fsdp, pick(bw, "all_gather", "fsdp"),
                                                       pick(alpha, "all_gather", "fsdp")),
      "fsdp_reduce_scatter": m * layers * collectives.reduce_scatter(b["fsdp_reduce_scatter"] / (m * layers), layout.fsdp,
                                                                     pick(bw, "reduce_scatter", "fsdp"), pick(alpha, "reduce_scatter", "fsdp")),
      "model_all_reduce": n_ar * collectives.all_reduce(b["model_all_reduce"] / n_ar, layout.model, pick(bw, "all_reduce", "model"),
                                                        pick(alpha, "all_reduce", "model")),
      "stage_send": (2 * m * layout.interleave * collectives.ppermute(b["stage_send"] / (2 * m * layout.interleave),
                                                                      pick(bw, "ppermute", "stage"), pick(alpha, "ppermute", "stage"))
                     if layout.stage > 1 else 0.0),
  }


def memory_per_device(acc: Accounting, layout: Layout) -> dict[str, float]:
  """Bytes per device: parameters, gradients and optimizer state split over fsdp x model x
  stage; activations over the batch axes and the stages, of the microbatches in flight
  (1F1B keeps at most `stage` of them; the MLP/attention part is counted whole over model,
  an upper bound)."""
  shard = layout.fsdp * layout.model * layout.stage
  in_flight = min(layout.stage, layout.microbatches) / layout.microbatches
  out = {"params": acc.param_bytes / shard, "grads": acc.grad_bytes / shard, "optimizer": acc.optimizer_bytes / shard,
         "activations": acc.activation_bytes / (layout.replicas * layout.stage) * in_flight}
  out["total"] = sum(out.values())
  return out


@dataclasses.dataclass(frozen=True)
class Prediction:
  layout: Layout
  step_s: float                 # = compute_s + recompute_s + memory_s + sum(exposed_s) + bubble_s
  compute_s: float
  memory_s: float
  comm_s: dict                  # each collective's full time
  memory_per_device_bytes: float
  mfu: float
  bottleneck: str
  why: str
  recompute_s: float = 0.0
  bubble_s: float = 0.0
  exposed_s: dict = dataclasses.field(default_factory=dict)   # the part of each collective not hidden under compute
  hardware_flops_per_s: float = 0.0                            # per device, model FLOPs + recompute over the step

  @property
  def exposed_comm_s(self) -> float:
    return sum(self.exposed_s.values())

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["layout"] = self.layout.name()
    d["mesh"] = {a: getattr(self.layout, a) for a in AXES}
    d["microbatches"], d["interleave"] = self.layout.microbatches, self.layout.interleave
    d["exposed_comm_s"] = self.exposed_comm_s
    return d


def _explain(bottleneck: str, layout: Layout, exposed: dict) -> str:
  if bottleneck == "compute":
    return "matmul FLOPs dominate"
  if bottleneck == "recompute":
    return "remat's recomputed forward is the largest extra"
  if bottleneck == "memory":
    return "non-matmul memory traffic dominates (elementwise work, unfused attention, small matmuls)"
  if bottleneck == "bubble":
    return f"pipeline bubble: {layout.stage} stages over {layout.microbatches} microbatches"
  kind = max(exposed, key=exposed.get)
  return {"data_all_reduce": f"gradient all-reduce over data={layout.data}: per-device batch below C/W",
          "fsdp_all_gather": f"parameter all-gathers over fsdp={layout.fsdp}: per-device batch below C/W",
          "fsdp_reduce_scatter": f"gradient reduce-scatter over fsdp={layout.fsdp}",
          "model_all_reduce": f"activation all-reduces over model={layout.model}: d_ff too small for Y x C/W",
          "stage_send": f"activations sent between {layout.stage} stages"}[kind]


def _matmul_s(chip: Chip, m: float, k: float, n: float, e: int) -> float:
  """One (m x k) @ (k x n) matmul: its FLOPs at the efficiency for its shape, or its operand
  and result bytes at the operand bandwidth if that takes longer (roofline)."""
  flops_s = 2 * m * k * n / (chip.bf16_flops * chip.matmul_efficiency(min(m, n)))
  bw = chip.operand_bw or chip.hbm_bw * chip.hbm_efficiency
  return max(flops_s, e * (m * k + k * n + m * n) / bw)


def transformer_work(model_cfg, layout: Layout, chip: Chip, global_batch: int, params: int, attention: str = "dense") -> dict:
  """Per-device seconds of one step's matmuls (forward, backward, recomputed) and bytes of its
  non-matmul traffic, for `gpt`/`bert`, from the layer shapes.

  Matmuls per layer and microbatch (M tokens, model axis t): QKV M x d x (n+2k)h/t, out
  M x nh/t x d, MLP in M x d x (2)f/t, MLP out M x f/t x d, and per sequence and local head
  QK^T s x h x s and AV s x s x h (fused into one kernel by flash attention: no s x s bytes);
  the head M x d x V/t once. The backward runs two matmuls of each forward's shape (dX, dW).

  Non-matmul bytes per token and layer, forward (one read and one write of each tensor an op
  touches; biases are fused into matmul epilogues): two norms 4d, two residual adds 6d,
  dropout on two branches 2(2d + d/e) when used, the MLP activation 2f (GELU) or 3f (SwiGLU),
  rotary 2(n+k)h, and the softmax over the scores 2ns when attention is not fused. Ops on
  d-wide tensors repeat on every model-axis device (Megatron without sequence parallelism);
  the others split over it. The backward moves twice the forward; a recomputed forward
  once more. Cross-entropy: six float32 passes over the logits (cast, max, sum-exp forward;
  softmax, minus one-hot, cast back). Optimizer: Adam over each device's parameter shard.
  Gradient accumulation: each microbatch after the first adds its gradients into a float32
  accumulator (read it, read the gradient, write it back)."""
  if attention not in ATTENTION:
    raise UserError(f"attention '{attention}' is not one of {', '.join(ATTENTION)}")
  c = model_cfg
  e = compute_bytes(c)
  d, f, n, k, h, s, v = c.d_model, c.d_ff, c.num_heads, c.kv_heads, c.head_dim, c.max_len, c.vocab_size
  t = layout.model
  seqs = global_batch / layout.replicas / layout.microbatches          # sequences per microbatch per replica
  M = seqs * s
  mm = lambda m_, k_, n_: _matmul_s(chip, m_, k_, n_, e)
  mlp_in = (2 if c.mlp == "swiglu" else 1) * f
  dense = mm(M, d, (n + 2 * k) * h / t) + mm(M, n * h / t, d) + mm(M, d, mlp_in / t) + mm(M, f / t, d)
  heads = seqs * n / t
  if attention == "flash":
    bw = chip.operand_bw or chip.hbm_bw * chip.hbm_efficiency
    attn = heads * max(4 * s * s * h / (chip.bf16_flops * chip.matmul_efficiency(s)), 4 * s * h * e / bw)
  else:
    attn = heads * (mm(s, h, s) + mm(s, s, h))
  head = mm(M, d, v / t) if c.name == "gpt" else mm(seqs, d, c.num_outputs)   # LM head, or a classifier on one token
  layers, mb = _stage_layers(c, layout), layout.microbatches
  compute = mb * (3 * layers * (dense + attn) + 3 * head)
  recompute = mb * layers * {"none": 0.0, "block": dense + attn, "dots": attn}[c.remat]

  tokens = global_batch * s / layout.replicas
  whole = 10 * d * e + (2 * (2 * d * e + d) if c.dropout > 0 else 0)
  split = (3 if c.mlp == "swiglu" else 2) * f * e + (2 * (n + k) * h * e if c.positions == "rope" else 0)
  split += 2 * n * s * e if attention != "flash" else 0
  passes = 3 + (1 if c.remat in ("block", "dots") else 0)
  layer_bytes = tokens * layers * passes * (whole + split / t)
  if attention == "dense-dropout":   # dropout on the probabilities: read, write and a 1-byte mask, each pass
    layer_bytes += tokens * layers * passes * (2 * e + 1) * n * s / t
  ce_bytes = tokens * 6 * 4 * v / t if c.name == "gpt" else 0.0
  shard = params / (layout.fsdp * t * layout.stage)
  opt_bytes = ADAM_UPDATE_BYTES_PER_PARAM * shard
  accumulate = (layout.microbatches - 1) * (8 + e) * shard
  return {"compute_s": compute, "recompute_s": recompute, "traffic_bytes": layer_bytes + ce_bytes + opt_bytes + accumulate}


def predict(acc: Accounting, model_cfg, layout: Layout, chip: Chip, *, traffic_bytes: float | None = None,
            compression: str = "none", attention: str = "dense") -> Prediction:
  """The step on `chip` (a catalog chip, or a host from `hardware.from_calibration`).
  `traffic_bytes`: the step's measured non-matmul memory traffic, all devices together (a
  host: XLA's bytes accessed), in place of the analytic count."""
  n = layout.devices
  if _is_transformer(model_cfg):
    work = transformer_work(model_cfg, layout, chip, acc.examples_per_step, acc.params, attention)
    compute, recompute = work["compute_s"], work["recompute_s"]
    traffic = work["traffic_bytes"] if traffic_bytes is None else traffic_bytes / n
    memory = traffic / (chip.hbm_bw * chip.hbm_efficiency)
  else:   # no layer shapes: matmuls at the large-matmul rate; their operand traffic bounds them (roofline)
    rate = chip.bf16_flops * chip.achievable
    compute = acc.flops_per_step / (n * rate)
    recompute = acc.flops_recompute / (n * rate)
    traffic = (acc.matmul_bytes / 2 if traffic_bytes is None else traffic_bytes) / n
    memory = traffic / (chip.hbm_bw * chip.hbm_efficiency)
    if traffic_bytes is None:
      memory = max(memory - compute, 0.0)
  if chip.collectives is not None:
    comm = comm_time_s(acc, model_cfg, layout, {k: v["bw"] for k, v in chip.collectives.items()},
                       {k: v["alpha_s"] for k, v in chip.collectives.items()}, compression)
  else:
    comm = comm_time_s(acc, model_cfg, layout, axis_bandwidths(chip, layout), 1e-6, compression)
  busy = compute + recompute + memory
  if chip.overlap:
    layers = _stage_layers(model_cfg, layout)
    fsdp = comm["fsdp_all_gather"] + comm["fsdp_reduce_scatter"]
    first = fsdp / (layout.microbatches * layers)        # the first layer's gather has nothing to hide under
    backward_last = busy * 2 / 3 / layout.microbatches   # the gradients are final only in the last microbatch's backward
    exposed = {"data_all_reduce": max(comm["data_all_reduce"] - backward_last, 0.0),
               "fsdp_all_gather": 0.0, "fsdp_reduce_scatter": 0.0,
               "model_all_reduce": comm["model_all_reduce"], "stage_send": comm["stage_send"]}
    shown = max(fsdp - first - busy, 0.0) + first
    if fsdp:
      exposed["fsdp_all_gather"] = shown * comm["fsdp_all_gather"] / fsdp
      exposed["fsdp_reduce_scatter"] = shown * comm["fsdp_reduce_scatter"] / fsdp
  else:
    exposed = dict(comm)
  on_path = busy + exposed["model_all_reduce"] + exposed["stage_send"]
  bubble = (layout.stage - 1) / (layout.interleave * layout.microbatches) * on_path
  step = busy + sum(exposed.values()) + bubble
  terms = {"compute": compute, "recompute": recompute, "memory": memory, "communication": sum(exposed.values()), "bubble": bubble}
  bottleneck = max(terms, key=terms.get)
  mem = memory_per_device(acc, layout)["total"]
  return Prediction(layout, step, compute, memory, comm, mem, acc.flops_per_step / (step * n * chip.bf16_flops),
                    bottleneck, _explain(bottleneck, layout, exposed), recompute, bubble, exposed,
                    (acc.flops_per_step + acc.flops_recompute) / (step * n))


def predict_on_chip(acc: Accounting, model_cfg, layout: Layout, chip: Chip, hbm_bytes_per_step: float | None = None,
                    compression: str = "none", attention: str = "dense") -> Prediction:
  """A catalog chip; MFU is against its full peak. `hbm_bytes_per_step` replaces the analytic
  non-matmul traffic (all devices together)."""
  return predict(acc, model_cfg, layout, chip, traffic_bytes=hbm_bytes_per_step, compression=compression, attention=attention)


def predict_on_host(acc: Accounting, model_cfg, layout: Layout, cal, one_device_bytes: float) -> Prediction:
  """This host as calibrated, through the same step model. The step's non-matmul traffic is
  measured: XLA's bytes accessed for the step compiled on one device (layout-free), minus the
  matmul operands (which stream from cache and are timed by the fitted matmul curve); each
  extra data-parallel replica repeats the optimizer update over its parameters."""
  params = acc.param_bytes / 4
  traffic = max(one_device_bytes - acc.matmul_bytes, 0.0) + (layout.data - 1) * ADAM_UPDATE_BYTES_PER_PARAM * params
  p = predict(acc, model_cfg, layout, from_calibration(cal), traffic_bytes=traffic)
  # MFU against the host's measured matmul rate (its "peak")
  return dataclasses.replace(p, mfu=acc.flops_per_step / (p.step_s * cal.matmul_flops))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(chips: int, model_cfg, global_batch: int | None = None) -> list[Layout]:
  """Every data x fsdp x model x stage factorization of `chips` (any integers: 6144 = 3 x 2048
  gives 12-way tensor parallelism): the model axis divides the heads and d_ff, the stage axis
  is at most the layers, data x fsdp divides the batch. A pipelined layout runs one sequence
  per microbatch (Megatron's usual choice), so the bubble is as small as the batch allows."""
  heads = getattr(model_cfg, "num_heads", None)
  out = []
  for model in _divisors(chips):
    if model > 1 and (heads is None or heads % model or model_cfg.d_ff % model):
      continue
    for stage in _divisors(chips // model):
      if stage > 1 and (not hasattr(model_cfg, "num_layers") or stage > model_cfg.num_layers):
        continue
      for fsdp in _divisors(chips // (model * stage)):
        data = chips // (model * stage * fsdp)
        if global_batch is not None and global_batch % (data * fsdp):
          continue
        micro = global_batch // (data * fsdp) if stage > 1 and global_batch is not None else 1
        if stage > 1 and micro < stage:
          continue
        out.append(Layout(data, fsdp, model, stage, micro))
  return out


def comm_bound_thresholds(chip: Chip, model_cfg) -> dict[str, float]:
  """SB training.md:204-373: DP/FSDP need per-device batch tokens above C/W; TP needs
  d_ff > Y x C/W. Returns the thresholds for this chip (one-way link bandwidth, x2 bidirectional)."""
  alpha = chip.bf16_flops / (2 * chip.link_bw)
  return {"min_tokens_per_device_dp_fsdp": alpha,
          "max_model_axis_tp": math.floor(getattr(model_cfg, "d_ff", 0) / alpha) if alpha else 0}
