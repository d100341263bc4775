"""The formula library against hand-computed values and brute force."""

import itertools

import jax
import numpy as np
import pytest

from dcmodel.errors import UserError
from dcmodel.perf import calibrate, collectives, hardware, optimize, pipeline, roofline


def test_ring_collectives_match_nccl_forms():
  S, n, B = 1e9, 8, 1e11
  assert collectives.all_reduce(S, n, B) == pytest.approx(S * 2 * (n - 1) / (n * B))     # 0.0175 s
  assert collectives.all_reduce(S, n, B) == pytest.approx(0.0175)
  assert collectives.all_gather(S, n, B) == pytest.approx(S * (n - 1) / (n * B))
  assert collectives.reduce_scatter(S, 4, B, alpha=1e-6) == pytest.approx(3e-6 + 0.0075)
  assert collectives.all_reduce(S, 1, B) == 0.0
  assert collectives.ppermute(1e6, 1e9, alpha=2e-6) == pytest.approx(1.002e-3)
  assert collectives.ring_all_reduce_bytes(10**6, 8, 4) == pytest.approx(2 * 7 / 8 * 4e6)


def test_torus_all_reduce_reduces_to_ring_on_one_axis():
  S, B = 8e8, 5e10
  assert collectives.torus_all_reduce(S, (8,), B) == pytest.approx(collectives.all_reduce(S, 8, B))
  # 2-D: RS over 4 (S), RS over 2 (S/4), AG over 2 (S/4), AG over 4 (S)
  expect = 2 * (S * 3 / 4 / B) + 2 * (S / 4 * 1 / 2 / B)
  assert collectives.torus_all_reduce(S, (4, 2), B) == pytest.approx(expect)


def test_bubble_fractions():
  assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)
  assert pipeline.bubble_fraction(4, 16) == pytest.approx(3 / 19)
  assert pipeline.bubble_over_ideal(4, 8) == pytest.approx(3 / 8)
  assert pipeline.bubble_over_ideal(4, 8, interleave=2) == pytest.approx(3 / 16)


def test_roofline_critical_intensity_v5e():
  chip = hardware.get("tpu-v5e")
  assert chip.critical_intensity == pytest.approx(1.97e14 / 8.2e11)        # ~240 FLOPs/byte (SB)
  flops, nbytes = roofline.matmul(512, 8192, 8192)
  r = roofline.Roofline(flops, nbytes, chip.bf16_flops, chip.hbm_bw)
  assert r.intensity == pytest.approx(2 * 512 * 8192 * 8192 / (2 * (512 * 8192 * 2 + 8192 * 8192)))
  assert r.compute_bound and r.time_s == pytest.approx(flops / chip.bf16_flops)
  small = roofline.Roofline(*roofline.matmul(16, 8192, 8192), chip.bf16_flops, chip.hbm_bw)
  assert not small.compute_bound and small.attainable_flops < chip.bf16_flops


def test_unknown_hardware():
  from dcmodel.errors import UserError
  with pytest.raises(UserError, match="unknown hardware 'h10'; did you mean h100"):
    hardware.get("h10")


def _brute_allocate(r, d, allowed, w):
  best = 0.0
  for choice in itertools.product(range(-1, len(r)), repeat=len(d)):
    load = np.zeros(len(r))
    ok = True
    for j, i in enumerate(choice):
      if i >= 0:
        ok &= bool(allowed[i, j])
        load[i] += d[j]
    if ok and (load <= np.asarray(r) + 1e-9).all():
      best = max(best, sum(w[j] * d[j] for j, i in enumerate(choice) if i >= 0))
  return best


@pytest.mark.parametrize("seed", range(12))
def test_integral_allocation_equals_brute_force(seed):
  rng = np.random.default_rng(seed)
  n, m = rng.integers(2, 4), rng.integers(2, 6)
  r = rng.integers(2, 10, n).astype(float)
  d = rng.integers(1, 7, m).astype(float)
  allowed = rng.random((n, m)) < 0.8
  w = rng.integers(1, 4, m).astype(float)
  a = optimize.allocate(r, d, allowed, w, integral=True)
  assert a.allocated == pytest.approx(_brute_allocate(r, d, allowed, w))
  assert (a.x.sum(1) <= r + 1e-9).all()
  lp = optimize.allocate(r, d, allowed, w)                  # the documents' continuous model
  assert lp.allocated >= a.allocated - 1e-9                 # a relaxation never does worse
  assert (lp.x.sum(1) <= r + 1e-6).all() and (lp.x.sum(0) <= d + 1e-6).all()


def test_continuous_allocation_hand_computed():
  # Two nodes of 10, jobs of 6, 6, 6: 18 units fit; utilization 100% on one node, 80% on the other.
  a = optimize.allocate([10, 10], [6, 6, 6])
  assert a.allocated == pytest.approx(18) and sorted(a.utilization) == pytest.approx([0.8, 1.0])


def _brute_flow(n, edges, cost, cap, supply):
  best = None
  for x in itertools.product(*[range(int(c) + 1) for c in cap]):
    net = np.zeros(n)
    for (u, v), f in zip(edges, x):
      net[u] += f
      net[v] -= f
    if np.allclose(net, supply):
      c = float(np.dot(cost, x))
      best = c if best is None else min(best, c)
  return best


@pytest.mark.parametrize("seed", range(10))
def test_min_cost_flow_equals_brute_force(seed):
  rng = np.random.default_rng(100 + seed)
  n = 4
  edges = [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (0, 3)]
  cost = rng.integers(1, 9, len(edges)).astype(float)
  cap = rng.integers(0, 4, len(edges)).astype(float)
  demand = int(rng.integers(1, 4))
  supply = np.array([demand, 0, 0, -demand], float)
  expected = _brute_flow(n, edges, cost, cap, supply)
  if expected is None:
    from dcmodel.errors import UserError
    with pytest.raises(UserError, match="no feasible routing"):
      optimize.min_cost_flow(n, edges, cost, cap, supply)
  else:
    f = optimize.min_cost_flow(n, edges, cost, cap, supply)
    assert f.cost == pytest.approx(expected) and (f.flow <= cap + 1e-9).all()


# ---- model accounting

ZOO = ["digits_cnn", "digits_mlp", "recommender_mlp", "binary_mlp", "stdlib_gpt", "stdlib_bert", "stdlib_gru", "clicks_dlrm"]


@pytest.mark.parametrize("name", ZOO)
def test_analytic_flops_within_5_percent_of_xla(name):
  import jax
  from conftest import experiment
  from dcmodel.perf.accounting import account, loss_fn_and_args
  # XLA's cost analysis counts a while loop's body once; unrolled, it sees every GRU step.
  extra = ("model.seq_len=32", "model.unroll=32") if name == "stdlib_gru" else ()
  cfg = experiment(name, *extra)
  acc = account(cfg)
  loss, params, batch, _ = loss_fn_and_args(cfg)
  xla = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile().cost_analysis()["flops"]
  # XLA also counts elementwise work, which the accounting leaves out (MFU's convention). It is
  # under 5% of every step but bert's: 256 tokens on d_model 64, where the softmax over its
  # 4 x 256 x 256 scores per example and layer, the norms and the q/k/v/o biases make 5.0-5.1%.
  assert acc.flops_per_step == pytest.approx(xla, rel=0.06 if name == "stdlib_bert" else 0.05)
  assert acc.params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  # The roofline's major ops: together they are the step's FLOPs, and each one, run alone, is
  # the op XLA counts (convolutions: the taps inside the input, as both count them).
  from dcmodel.perf.accounting import matmul_ops
  ops = matmul_ops(cfg)
  assert sum(o.step_flops for o in ops) == acc.flops_per_step
  for op in ops[:2]:
    alone = jax.jit(op)
    assert alone.lower(*op.operands).compile().cost_analysis()["flops"] == pytest.approx(op.flops, rel=0.01)


@pytest.mark.parametrize("sets", [
    (),                                                                                   # Llama-style stdlib_gpt
    ("model.mlp=swiglu", "model.num_kv_heads=2", "model.use_bias=true", "model.norm=layernorm",
     "model.positions=learned", "model.tie_embeddings=false"),                           # GPT-2 style, GQA, untied
])
def test_transformer_closed_forms_equal_the_counted_model(sets):
  from conftest import experiment
  from dcmodel.perf.accounting import account, transformer_flops, transformer_params
  for name in ("stdlib_gpt", "stdlib_bert"):
    cfg = experiment(name, *sets)
    acc = account(cfg)
    assert acc.params == transformer_params(cfg.model)
    assert (acc.flops_forward, acc.flops_backward) == transformer_flops(cfg.model, cfg.data.global_batch_size)


def test_parameter_counts_by_hand():
  from conftest import experiment
  from dcmodel.perf.accounting import account
  assert account(experiment("digits_mlp")).params == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
  assert account(experiment("recommender_mlp")).params == 100 * 64 + 64 + 64 * 32 + 32 + 32 + 1
  # GPT-3 175B shape (Brown et al. 2020, table 2.1) with biases, LayerNorm, learned positions, tied embeddings:
  # per layer 4d^2 + 4d (attention: Q, K, V, output and their biases) + 2df + f + d (MLP) + 4d (two norms)
  # = 1,812,099,072; x 96 layers, + 2d final norm + 50257 d embeddings + 2048 d positions
  from dcmodel import models
  from dcmodel.perf.accounting import transformer_params
  gpt3 = models.get_config("gpt", vocab_size=50257, max_len=2048, d_model=12288, num_layers=96, num_heads=96, d_ff=49152,
                           tie_embeddings=True)
  assert transformer_params(gpt3) == 96 * 1_812_099_072 + 2 * 12288 + 50257 * 12288 + 2048 * 12288 == 174_604_259_328


def test_inference_formulas_by_hand():
  from dcmodel import models
  from dcmodel.perf.accounting import decode_step_s, kv_cache_bytes
  # SB inference.md:280-286: LLaMA-13B (40 layers, 40 KV heads of 128) at 8192 tokens in bf16 is 6.7 GB
  llama13 = models.get_config("gpt", d_model=5120, num_layers=40, num_heads=40, d_ff=13824)
  assert kv_cache_bytes(llama13, 1, 8192, 2) == 2 * 2 * 40 * 128 * 40 * 8192 == pytest.approx(6.7e9, rel=0.01)
  # SB tpus.md Q1: 200B bf16 on 32 chips, 12.5e9 bytes per chip / 1.23e12 B/s ~ 10 ms
  assert decode_step_s(12.5e9, 0.0, 1.23e12) == pytest.approx(0.0102, rel=0.01)
  assert decode_step_s(1e9, 1e9, 1e12, flops=1e13, peak_flops=1e15) == pytest.approx(0.01)   # compute wins


def test_layout_communication_by_hand():
  from conftest import experiment
  from dcmodel.perf import hardware
  from dcmodel.perf.accounting import account
  from dcmodel.perf.layouts import Layout, comm_bound_thresholds, comm_bytes
  cfg = experiment("stdlib_gpt", "model.dtype=bfloat16")
  acc = account(cfg)
  half = acc.param_bytes / 2                        # gathered and reduced in bfloat16
  assert comm_bytes(acc, cfg.model, Layout(8, 1, 1))["data_all_reduce"] == half
  fsdp = comm_bytes(acc, cfg.model, Layout(1, 8, 1))
  assert fsdp["fsdp_all_gather"] + fsdp["fsdp_reduce_scatter"] == 3 * half          # ZeRO-3: 3 x parameters
  tp = comm_bytes(acc, cfg.model, Layout(4, 1, 2))   # 4 all-reduces per layer of (local tokens x d_model)
  assert tp["model_all_reduce"] == 4 * 4 * (64 * 128 / 4) * 128 * 2
  # Compressed gradient all-reduce: int8 carries 1 byte per element, bf16 2; only the data axis.
  f32 = experiment("stdlib_gpt")
  for compression, per_el in (("none", 4), ("bf16", 2), ("int8", 1)):
    b = comm_bytes(acc, f32.model, Layout(4, 1, 2), compression)
    assert b["data_all_reduce"] == acc.param_bytes * per_el / 4 / 2          # each device reduces its model=2 half
    assert b["model_all_reduce"] == 4 * 4 * (64 * 128 / 4) * 128 * 4          # activations stay float32
  with pytest.raises(UserError, match="compression 'fp8' is not one of none, bf16, int8"):
    comm_bytes(acc, f32.model, Layout(8, 1, 1), "fp8")
  from dcmodel.perf.layouts import predict_on_chip
  chip = hardware.get("tpu-v5p")
  plain, int8 = (predict_on_chip(acc, f32.model, Layout(8, 1, 1), chip, compression=c) for c in ("none", "int8"))
  alpha = 2 * 7 * 1e-6                                                      # ring latency terms, not compressed
  assert int8.comm_s["data_all_reduce"] - alpha == pytest.approx((plain.comm_s["data_all_reduce"] - alpha) / 4)
  assert int8.step_s <= plain.step_s
  th = comm_bound_thresholds(hardware.get("tpu-v5p"), cfg.model)
  assert th["min_tokens_per_device_dp_fsdp"] == pytest.approx(2550)                   # SB training.md:288-299


def test_plan_json_ranks_meshes(tmp_path):
  import json
  import subprocess
  import sys
  from conftest import EXPERIMENTS, ROOT
  p = subprocess.run([sys.executable, "-m", "dcmodel.cli", "--host-devices", "1", "plan", str(EXPERIMENTS / "stdlib_gpt.py"),
                      "--set", "model.d_model=2048", "--set", "model.num_heads=16", "--set", "model.d_ff=8192",
                      "--set", "model.dtype=bfloat16", "--hardware", "h100", "--chips", "64", "--json"],
                     cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == 0, p.stderr
  out = json.loads(p.stdout)
  for key in ("params", "flops_per_step", "memory_per_device_bytes", "predicted_step_s", "bottleneck"):
    assert key in out
  fitting = [c["predicted_step_s"] for c in out["candidates"] if c["fits"]]
  assert fitting == sorted(fitting) and out["predicted_step_s"] == fitting[0]
  assert out["placement"]["replicas_placed"] == out["placement"]["replicas"]
  bad = subprocess.run([sys.executable, "-m", "dcmodel.cli", "plan", str(EXPERIMENTS / "stdlib_gpt.py"), "--hardware", "h1000",
                        "--chips", "8"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown hardware 'h1000'; did you mean h100" in bad.stderr


def test_the_memory_term_is_calibrated_on_elementwise_fusions_only():
  """The host step model divides XLA's non-matmul bytes per device by calibrate()'s mem_bw, so
  the rate's program must be matmul-free and counted as XLA counts it per device for the very
  program timed (the same on 1 and 2 devices), growing with the array it streams."""
  one, _ = calibrate.fusion_program(256, 64, devices=jax.devices()[:1])
  two, _ = calibrate.fusion_program(256, 64, devices=jax.devices()[:2])
  wide, _ = calibrate.fusion_program(512, 64, devices=jax.devices()[:2])
  small, large = calibrate.compiled_cost(two)["bytes accessed"], calibrate.compiled_cost(wide)["bytes accessed"]
  assert " dot(" not in two.as_text() and " convolution(" not in two.as_text()
  assert calibrate.compiled_cost(one)["bytes accessed"] == small
  assert 1.8 < large / small < 2.1 and small > 40 * 256 * 64 * 4     # 4 blocks forward and backward: many passes
  assert 0 < calibrate.fusion_bandwidth(256, 64, devices=jax.devices()[:2]) < float("inf")


def test_calibrate_takes_the_memory_term_from_the_fusions(monkeypatch):
  monkeypatch.setattr(calibrate, "fusion_bandwidth", lambda *a, **k: 123.0)
  monkeypatch.setattr(calibrate, "memory_bandwidth", lambda *a, **k: pytest.fail("fresh-buffer writes are not the step's rate"))
  monkeypatch.setattr(calibrate, "matmul_peak", lambda *a, **k: 1e9)
  monkeypatch.setattr(calibrate, "matmul_half_dim", lambda *a, **k: 0.0)
  monkeypatch.setattr(calibrate, "collective_alpha_beta", lambda *a, **k: {})
  assert calibrate.calibrate(quick=True).mem_bw == 123.0
