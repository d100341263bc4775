"""Model accounting from the model definition itself, by abstract evaluation (nothing allocated):
parameters, FLOPs per training step, and bytes of parameters, gradients, optimizer state and
saved activations.

FLOP convention (stated once, used everywhere): a multiply-add is 2 FLOPs and only matmuls and
convolutions count (elementwise work is left out, as in the 6ND rule). The forward pass is read
from the jaxpr of the model's loss: every `dot_general` and `conv_general_dilated`, inside
scans (times their length), jits and remat blocks. Convolutions count only the taps that land
inside the input (SAME padding's zeros are not work), as XLA's cost analysis does. The
backward pass costs, per matmul, one more forward for each operand that depends on the
parameters (its gradient, dW or dX), so the first layer's input gradient is not counted.
Attention counts the full T x T score matrix even when causal (the models are traced with
`attention.full_causal`): XLA's dense attention computes it all and masks; a causal-aware
kernel does about half, and on CPU the xla path's two query halves skip a quarter. Rematerialization's recompute is not
counted in the model FLOPs (as in MFU); it is counted apart, `flops_recompute`: the forward
matmuls inside each remat block that its policy does not save (block: all of them; dots: the
batched ones, attention's QK^T and AV), which the step time adds.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from dcmodel.config import Config
from dcmodel.models.attention import full_causal
from dcmodel.train import state as state_lib
from dcmodel.train import tasks


def _conv_valid_taps(lhs_shape, rhs_shape, out_shape, params) -> int:
  """Multiply-adds per (batch, in-feature, out-feature) that touch real input, over all spatial dims."""
  dn = params["dimension_numbers"]
  total = 1
  for i, (ld, rd, od) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:])):
    n_in, k, n_out = lhs_shape[ld], rhs_shape[rd], out_shape[od]
    stride, (pad_lo, _) = params["window_strides"][i], params["padding"][i]
    lhs_dil, rhs_dil = params["lhs_dilation"][i], params["rhs_dilation"][i]
    o = np.arange(n_out)[:, None]
    t = np.arange(k)[None, :]
    pos = o * stride + t * rhs_dil - pad_lo              # position in the (lhs-dilated) input
    real = (pos >= 0) & (pos <= (n_in - 1) * lhs_dil) & (pos % lhs_dil == 0)
    total *= int(real.sum())
  return total


def _matmul_flops(eqn) -> int:
  name = eqn.primitive.name
  out = eqn.outvars[0].aval
  if name == "dot_general":
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    return 2 * math.prod(out.shape) * math.prod(lhs.shape[i] for i in lc)
  if name == "conv_general_dilated":
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    batch = lhs.shape[dn.lhs_spec[0]] // eqn.params["batch_group_count"]
    out_feat, in_feat = rhs.shape[dn.rhs_spec[0]], rhs.shape[dn.rhs_spec[1]]
    return 2 * batch * out_feat * in_feat * _conv_valid_taps(lhs.shape, rhs.shape, out.shape, eqn.params)
  return 0


def _operand_bytes(eqn) -> int:
  return sum(math.prod(v.aval.shape) * jnp.dtype(v.aval.dtype).itemsize for v in [*eqn.invars[:2], *eqn.outvars])


def _walk(jaxpr, tainted: set, mult: int, found: list | None = None) -> tuple[int, int, int]:
  """(forward FLOPs, backward FLOPs, matmul operand bytes fwd + bwd) of a jaxpr whose `tainted`
  vars depend on the parameters. Each backward matmul moves about as many bytes as its forward.
  With `found`, every matmul is also listed as (eqn, calls, backward matmuls per call)."""
  fwd = bwd = mm_bytes = 0
  for eqn in jaxpr.eqns:
    ins = [isinstance(v, jcore.Var) and v in tainted for v in eqn.invars]
    flops = _matmul_flops(eqn)
    if flops:
      fwd += flops * mult
      bwd += flops * mult * sum(ins[:2])
      mm_bytes += _operand_bytes(eqn) * mult * (1 + sum(ins[:2]))
      if found is not None:
        found.append((eqn, mult, sum(ins[:2])))
    subs = list(jcore.jaxprs_in_params(eqn.params))
    if subs:
      sub = subs[0]
      inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
      if eqn.primitive.name == "scan":
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        # a carry depends on the parameters if its initial value does or the body makes it so
        sub_in = list(ins)
        for _ in range(2):
          t = {v for v, flag in zip(inner.invars, sub_in) if flag}
          out_t = _taint(inner, t)
          for j in range(n_carry):
            sub_in[n_consts + j] = sub_in[n_consts + j] or (inner.outvars[j] in out_t)
        f, b, m = _walk(inner, {v for v, flag in zip(inner.invars, sub_in) if flag}, mult * eqn.params["length"], found)
      elif len(inner.invars) == len(eqn.invars):
        f, b, m = _walk(inner, {v for v, flag in zip(inner.invars, ins) if flag}, mult, found)
      else:  # a call whose operands do not line up one to one: assume all depend on the parameters
        f, b, m = _walk(inner, set(inner.invars), mult, found)
      fwd, bwd, mm_bytes = fwd + f, bwd + b, mm_bytes + m
    if any(ins):
      tainted.update(eqn.outvars)
  return fwd, bwd, mm_bytes


def _recomputed(eqn, policy) -> bool:
  """Whether a remat policy recomputes this matmul in the backward pass (a policy returns True
  for what it saves; None saves nothing)."""
  if policy is None:
    return True
  return not policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params)


def _recompute_flops(jaxpr, mult: int, policy=None, inside: bool = False) -> float:
  """Forward matmul FLOPs inside remat (`checkpoint`) blocks that their policy recomputes."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if inside and _matmul_flops(eqn) and _recomputed(eqn, policy):
      total += _matmul_flops(eqn) * mult
    is_remat = eqn.primitive.name in ("checkpoint", "remat", "remat2")
    for sub in jcore.jaxprs_in_params(eqn.params):
      inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
      times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
      total += _recompute_flops(inner, mult * times, eqn.params.get("policy") if is_remat else policy, inside or is_remat)
  return total


def _taint(jaxpr, tainted: set) -> set:
  tainted = set(tainted)
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jcore.Var) and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  return tainted


@dataclasses.dataclass(frozen=True)
class Accounting:
  params: int
  flops_forward: float            # one global batch
  flops_backward: float
  param_bytes: int
  grad_bytes: int
  optimizer_bytes: int
  activation_bytes: int           # residuals saved for the backward pass, one global batch, as configured
  matmul_bytes: int               # operand + result bytes of the matmuls, forward and backward
  examples_per_step: int
  tokens_per_step: int
  flops_recompute: float = 0.0    # forward matmuls the backward pass recomputes (remat); not in flops_per_step

  @property
  def flops_per_step(self) -> float:
    return self.flops_forward + self.flops_backward

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "flops_per_step": self.flops_per_step}


def _xla_forms(cfg: Config) -> dict:
  """The model's computation forms (conv, matmul, attention) not set to XLA's, set to it."""
  return {form: "xla" for form in ("conv", "matmul", "attention") if getattr(cfg.model, form, "xla") != "xla"}


def loss_fn_and_args(cfg: Config, countable: bool = True):
  """(loss(params, batch), abstract params, abstract batch, abstract optimizer state) of `cfg`'s
  model on one global batch, laid out on one device (accounting is layout-free). `countable`:
  convolutions, dense products and attention are XLA's, for counting FLOPs: the model's own, not
  the padding zeros the matmul form of a convolution also multiplies, and dots the jaxpr walk and
  XLA's cost analysis can count (a host BLAS product or a fused attention kernel is a custom call,
  opaque to both). Else the forms the config runs, whose saved residuals are what the backward
  pass keeps (a fused attention keeps no T x T probabilities)."""
  xla_forms = _xla_forms(cfg)
  if countable and xla_forms:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **xla_forms))
  one = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1, fsdp=1, model=1, stage=1))
  placed = state_lib.place(one, jax.devices()[:1])
  model, opt = nnx.merge(placed.graphdef, placed.target)
  gdef, params, rest = nnx.split(model, nnx.Param, ...)
  strip = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  task = tasks.get(cfg.model.task)
  inputs = cfg.model.batch_spec().inputs

  def loss(p, batch):
    return task(nnx.merge(gdef, p, rest)(**{k: batch[k] for k in inputs}), batch)[0]

  return loss, strip(params), strip(state_lib.abstract_batch(cfg)), strip(nnx.state(opt))


def nbytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _walk_step(cfg: Config, found: list | None = None):
  """_walk over the jaxpr of `cfg`'s loss, the parameters tainted: (fwd, bwd, matmul bytes), and
  the loss_fn_and_args it traced, and the jaxpr."""
  loss, params, batch, opt_state = loss_fn_and_args(cfg)
  with full_causal():
    closed = jax.make_jaxpr(loss)(params, batch)
  return (_walk(closed.jaxpr, set(closed.jaxpr.invars[:len(jax.tree.leaves(params))]), 1, found),
          (loss, params, batch, opt_state), closed.jaxpr)


def _saved_bytes(loss, params, batch) -> int:
  """Bytes of what jax.grad keeps for the backward pass (remat-aware), inputs left out."""
  from jax._src.ad_checkpoint import saved_residuals
  with full_causal():
    saved = saved_residuals(loss, params, batch)
  return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a, why in saved if "argument" not in str(why)))


def transformer_saved_bytes(cfg: Config) -> int:
  """What jax.grad keeps for `cfg`'s transformer, one global batch, from four traces of 2 or 3
  layers on 1 or 2 sequences (a second each at any width). The saved bytes are c0 + cL L +
  b (a0 + aL L): per layer and per sequence, plus what does not grow with the batch (weights
  cast to the compute dtype); not 1 layer, whose input is the embedding's own output."""
  def f(layers: int, batch: int) -> int:
    c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=layers),
                            data=dataclasses.replace(cfg.data, global_batch_size=batch))
    return _saved_bytes(*loss_fn_and_args(c, countable=False)[:3])
  f21, f31, f22, f32 = f(2, 1), f(3, 1), f(2, 2), f(3, 2)
  a_layer = (f32 - f22) - (f31 - f21)
  c_layer = (f31 - f21) - a_layer
  a0 = (f22 - f21) - 2 * a_layer
  c0 = f21 - 2 * c_layer - a0 - 2 * a_layer
  layers, batch = cfg.model.num_layers, cfg.data.global_batch_size
  return int(c0 + c_layer * layers + batch * (a0 + a_layer * layers))


def account(cfg: Config) -> Accounting:
  (fwd, bwd, mm_bytes), traced, jaxpr = _walk_step(cfg)
  _, params, _, opt_state = traced
  # the residuals of the forms that run; traced again only where they differ from the countable ones
  act = _saved_bytes(*(loss_fn_and_args(cfg, countable=False) if _xla_forms(cfg) else traced)[:3])
  b = cfg.data.global_batch_size
  tokens = b * cfg.model.input_shape()[0] if cfg.model.task == "lm" else b
  return Accounting(params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
                    flops_forward=float(fwd), flops_backward=float(bwd), param_bytes=nbytes(params),
                    grad_bytes=nbytes(params), optimizer_bytes=nbytes(opt_state), activation_bytes=int(act), matmul_bytes=int(mm_bytes),
                    examples_per_step=b, tokens_per_step=tokens, flops_recompute=_recompute_flops(jaxpr, 1))


@dataclasses.dataclass(frozen=True, eq=False)   # hashed by identity: jax.jit(op) keys its cache on it
class MatmulOp:
  """One distinct matmul or convolution of the forward pass (same primitive, operand shapes and
  parameters), with how often a training step runs it: the roofline's "major ops"."""
  label: str
  primitive: object            # the jax primitive (dot_general, conv_general_dilated)
  params: dict
  operands: tuple              # ShapeDtypeStructs of the two operands
  flops: int                   # one call
  bytes: int                   # one call: both operands read, the result written
  calls: int                   # forward calls per step
  grad_calls: int              # backward matmuls of about this size per step (dW and/or dX)

  @property
  def intensity(self) -> float:
    return self.flops / self.bytes

  @property
  def step_flops(self) -> float:
    return float(self.flops * (self.calls + self.grad_calls))

  def __call__(self, lhs, rhs):
    """The op alone, as the step runs it (same primitive and parameters)."""
    return self.primitive.bind(lhs, rhs, **self.params)


def matmul_ops(cfg: Config) -> list[MatmulOp]:
  """The step's distinct matmuls/convolutions, largest share of the step's FLOPs first."""
  found: list = []
  _walk_step(cfg, found)
  groups: dict = {}
  for eqn, calls, grads in found:
    key = (eqn.primitive.name, tuple(str(v.aval) for v in eqn.invars[:2]), repr(sorted(eqn.params.items(), key=str)))
    calls_so_far, grads_so_far, _ = groups.get(key, (0, 0, eqn))
    groups[key] = (calls_so_far + calls, grads_so_far + calls * grads, eqn)
  ops = []
  for (name, shapes, _), (calls, grads, eqn) in groups.items():
    ops.append(MatmulOp(f"{name} {' x '.join(a.str_short() for a in (v.aval for v in eqn.invars[:2]))}", eqn.primitive,
                        dict(eqn.params), tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars[:2]),
                        _matmul_flops(eqn), _operand_bytes(eqn), calls, grads))
  return sorted(ops, key=lambda o: -o.step_flops)


# ---- Closed forms for the transformer, the scaling book's per-layer formulas (SB transformers.md:183-310)
# in our variant's terms: D = d_model, F = d_ff, N query heads, K KV heads, H head dim, L layers, V vocab.

def transformer_params(cfg) -> int:
  """Exact parameter count of `gpt`/`bert` (matrices, biases, norms, embeddings, head)."""
  d, f, n, k, h, v = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size
  bias = cfg.use_bias
  norm = d * (2 if cfg.norm == "layernorm" and bias else 1)
  attn = d * (n + 2 * k) * h + n * h * d + (((n + 2 * k) * h + d) if bias else 0)   # Q/K/V and output biases
  mlp = (3 if cfg.mlp == "swiglu" else 2) * d * f + ((f + d) if bias else 0)
  total = cfg.num_layers * (attn + mlp + 2 * norm) + norm + v * d
  total += cfg.max_len * d if cfg.positions == "learned" else 0
  if cfg.name == "gpt" and not cfg.tie_embeddings:
    total += d * v
  if cfg.name == "bert":
    total += d * cfg.num_outputs + cfg.num_outputs
  return total


def transformer_flops(cfg, batch: int) -> tuple[float, float]:
  """(forward, backward) matmul FLOPs of one step on `batch` sequences of cfg.max_len tokens."""
  d, f, n, k, h, t = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.max_len
  tokens = batch * t
  per_layer = 2 * tokens * (d * (n + 2 * k) * h + n * h * d)            # Q, K, V, O projections
  per_layer += 2 * tokens * (3 if cfg.mlp == "swiglu" else 2) * d * f     # MLP
  per_layer += 2 * 2 * batch * t * t * n * h                              # QK^T and AV, full T x T (see module doc)
  fwd = cfg.num_layers * per_layer
  head = 2 * tokens * d * cfg.vocab_size if cfg.name == "gpt" else 2 * batch * d * cfg.num_outputs
  fwd += head
  return float(fwd), float(2 * fwd)   # every matmul's operands depend on the parameters (the input is a gather)


def transformer_recompute_flops(cfg, batch: int) -> float:
  """Forward matmul FLOPs the backward pass recomputes under cfg.remat: block recomputes each
  layer's forward (SB transformers.md:274, 6 -> 8 x params x tokens); dots saves the
  projections and MLP (no batch dimensions) and recomputes attention's QK^T and AV."""
  if cfg.remat == "none":
    return 0.0
  fwd, _ = transformer_flops(cfg, batch)
  t = cfg.max_len
  attention = cfg.num_layers * 2 * 2 * batch * t * t * cfg.num_heads * cfg.head_dim
  if cfg.remat == "dots":
    return float(attention)
  head = 2 * batch * t * cfg.d_model * cfg.vocab_size if cfg.name == "gpt" else 2 * batch * cfg.d_model * cfg.num_outputs
  return float(fwd - head)


def transformer_activation_bytes(cfg, batch: int) -> int:
  """Bytes jax.grad keeps for the backward pass, one global batch. Korthikanti et al. 2022
  (arXiv:2205.05198, eqs. 1-2): s b h (34 + 5 a s / h) bytes per layer in 16-bit with dropout
  masks; block remat keeps each layer's input (2 s b h); dots keeps the matmul outputs
  (34 s b h). Scaled to the compute dtype; plus the float32 logits."""
  e = 2 if cfg.dtype == "bfloat16" else 4
  sbh = batch * cfg.max_len * cfg.d_model
  per_layer = {"none": sbh * (34 + 5 * cfg.num_heads * cfg.max_len / cfg.d_model), "block": 2 * sbh,
               "dots": 34 * sbh}[cfg.remat] * e / 2
  logits = batch * cfg.max_len * (cfg.vocab_size if cfg.name == "gpt" else 0) * 4
  return int(cfg.num_layers * per_layer + logits)


def transformer_accounting(m, b: int) -> Accounting:
  """`account(cfg)` for a `gpt`/`bert` model config `m` on a global batch of `b` sequences,
  from the closed forms: microseconds instead of tracing (a 1T-parameter model traces in
  ~40 s). Parameters and FLOPs equal the counted model (tests/test_perf.py holds them equal);
  activations are the published estimate above."""
  params = transformer_params(m)
  fwd, bwd = transformer_flops(m, b)
  e = 2 if m.dtype == "bfloat16" else 4
  tokens = b * m.max_len
  # matmul operand + result bytes, forward and backward (each backward matmul moves about its forward's bytes)
  d, f, n, k, h, t = m.d_model, m.d_ff, m.num_heads, m.kv_heads, m.head_dim, m.max_len
  w = (d * (n + 2 * k) * h + n * h * d + (3 if m.mlp == "swiglu" else 2) * d * f)
  act = tokens * (d + (n + 2 * k) * h + n * h + d + d + (2 if m.mlp == "swiglu" else 1) * f + f + d)
  attn = b * n * (4 * t * h + 2 * t * t)
  mm = 3 * e * (m.num_layers * (w + act + attn) + d * m.vocab_size + tokens * (d + m.vocab_size))
  return Accounting(params=params, flops_forward=fwd, flops_backward=bwd, param_bytes=4 * params, grad_bytes=4 * params,
                    optimizer_bytes=8 * params, activation_bytes=transformer_activation_bytes(m, b), matmul_bytes=int(mm),
                    examples_per_step=b, tokens_per_step=tokens if m.task == "lm" else b,
                    flops_recompute=transformer_recompute_flops(m, b))


def megatron_flops(cfg, batch: int) -> float:
  """FLOPs per iteration as Megatron-LM counts them (Narayanan et al. 2021, arXiv:2104.04473,
  eq. 3), with full activation recomputation: F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)).
  Its TFLOP/s per GPU are this over the step time: model FLOPs plus one recomputed forward
  of the layers (not of the head), i.e. flops_per_step + flops_recompute for a GPT with
  d_ff = 4h and remat=block."""
  b, s, l, h, v = batch, cfg.max_len, cfg.num_layers, cfg.d_model, cfg.vocab_size
  return 96.0 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))


# ---- Inference (SB inference.md:188-286)

def kv_cache_bytes(cfg, batch: int, length: int, bytes_per_el: int = 4) -> int:
  """2 (K and V) x bytes x KV heads x head dim x layers x tokens, for `batch` sequences."""
  return 2 * bytes_per_el * cfg.kv_heads * cfg.head_dim * cfg.num_layers * length * batch


def decode_step_s(param_bytes: float, kv_bytes: float, mem_bw: float, flops: float = 0.0, peak_flops: float = float("inf")) -> float:
  """One generated token for the whole batch: read every weight and the KV cache once, or the
  matmuls if they take longer: (B·KV + params)/W_mem vs 2·B·N/C (SB inference.md:209,221)."""
  return max((kv_bytes + param_bytes) / mem_bw, flops / peak_flops)


def prefill_s(flops: float, peak_flops: float, param_bytes: float = 0.0, mem_bw: float = float("inf")) -> float:
  """Prefill of the prompts: compute-bound once the prompt tokens exceed the critical intensity."""
  return max(flops / peak_flops, param_bytes / mem_bw)
