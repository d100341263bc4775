"""The step model and the planner: recompute, pipeline bubble, non-power-of-two meshes, the
breakdown, and the published runs (benchmarks/published_runs.json, sources there)."""

import dataclasses
import itertools

import pytest
from conftest import experiment

from benchmarks import published_runs
from dcmodel import models
from dcmodel.errors import UserError
from dcmodel.perf import hardware
from dcmodel.perf.accounting import account, megatron_flops, transformer_accounting, transformer_saved_bytes
from dcmodel.perf.layouts import Layout, candidate_layouts, predict
from dcmodel.perf.plan import named_layout, parse_mesh, plan


def _parts(p) -> float:
  return p.compute_s + p.recompute_s + p.memory_s + sum(p.exposed_s.values()) + p.bubble_s


@pytest.mark.parametrize("remat", ["none", "block", "dots"])
def test_recompute_counted_from_the_jaxpr_equals_the_closed_form(remat):
  # stdlib_gpt: L=4, d=128, f=512 (GELU), 4 heads of 32, T=128, V=256, batch 64. One layer's forward per
  # token: 2 (4 d^2 + 2 d f) projections and MLP + 4 T d attention = 393,216 + 65,536.
  cfg = experiment("stdlib_gpt")
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))   # --set reads 'none' as null
  acc = account(cfg)
  tokens = 64 * 128
  recompute = {"none": 0, "block": 4 * (393_216 + 65_536) * tokens, "dots": 4 * 65_536 * tokens}[remat]
  assert acc.flops_recompute == recompute
  closed = transformer_accounting(cfg.model, 64)
  assert (closed.params, closed.flops_per_step, closed.flops_recompute) == (acc.params, acc.flops_per_step, recompute)
  # what plan uses for memory: 2 and 3 layers on 1 and 2 sequences traced, solved for 4 layers x 64
  assert transformer_saved_bytes(cfg) == acc.activation_bytes


def test_remat_block_predicts_four_thirds_of_the_compute_and_mfu_leaves_it_out():
  chip = hardware.get("tpu-v5p")
  layout = Layout(data=1, fsdp=64)
  preds = {}
  for remat in ("none", "block"):
    # vocab 256 against d 4096: the head (not recomputed) is 0.1% of the FLOPs
    cfg = models.get_config("gpt", vocab_size=256, max_len=2048, d_model=4096, num_layers=8, num_heads=32, d_ff=16384,
                            dtype="bfloat16", remat=remat)
    preds[remat] = predict(transformer_accounting(cfg, 256), cfg, layout, chip, attention="flash")
  none, block = preds["none"], preds["block"]
  assert none.recompute_s == 0 and block.compute_s == pytest.approx(none.compute_s)
  assert (block.compute_s + block.recompute_s) / none.compute_s == pytest.approx(4 / 3, rel=2e-3)   # 3 passes -> 4
  assert block.step_s > none.step_s and block.mfu < none.mfu


def test_pipeline_bubble_by_hand():
  chip = hardware.get("a100")
  cfg = models.get_config("gpt", vocab_size=512, max_len=1024, d_model=1024, num_layers=16, num_heads=16, d_ff=4096, dtype="bfloat16")
  acc = transformer_accounting(cfg, 64)
  for micro, interleave in ((8, 1), (16, 1), (16, 2)):
    p = predict(acc, cfg, Layout(data=2, stage=4, microbatches=micro, interleave=interleave), chip)
    on_path = p.compute_s + p.recompute_s + p.memory_s + p.exposed_s["model_all_reduce"] + p.exposed_s["stage_send"]
    assert p.bubble_s == pytest.approx(3 / (micro * interleave) * on_path)   # (p-1)/(v m), Megatron s2.2
    assert p.comm_s["stage_send"] > 0
  assert predict(acc, cfg, Layout(data=8), chip).bubble_s == 0.0


def test_breakdown_sums_to_the_step_on_chips_and_on_the_host():
  cfg = models.get_config("gpt", vocab_size=1024, max_len=512, d_model=512, num_layers=8, num_heads=8, d_ff=2048, dtype="bfloat16",
                          remat="block")
  acc = transformer_accounting(cfg, 64)
  for chip_name, layout in itertools.product(("a100", "tpu-v5e"), (Layout(8, 1, 1), Layout(1, 8, 1), Layout(2, 2, 2),
                                                                  Layout(1, 2, 2, 2, 16, 2), Layout(4, 1, 1, 2, 8))):
    p = predict(acc, cfg, layout, hardware.get(chip_name))
    assert p.step_s == pytest.approx(_parts(p), rel=1e-12)
    assert all(0.0 <= p.exposed_s[k] <= p.comm_s[k] + 1e-15 for k in p.comm_s)
  cal = type("Cal", (), {"devices": 8, "matmul_flops": 1.5e11, "mem_bw": 5e9, "platform": "cpu", "matmul_half_dim": 30.0,
                         "collectives": {k: {"alpha_s": 3e-5, "bw": 1e9} for k in
                                         ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "ppermute")}})()
  host = hardware.from_calibration(cal)
  p = predict(acc, cfg, Layout(2, 2, 2), host, traffic_bytes=1e9)
  assert p.step_s == pytest.approx(_parts(p)) and p.exposed_s == p.comm_s          # nothing overlaps on the host
  assert p.memory_s == pytest.approx(1e9 / 5e9)                                      # all devices' bytes at all devices' bandwidth


def test_non_power_of_two_meshes_are_enumerated_and_valid():
  # PaLM's 6144 TPU v4 = 2 pods x 3072: 12-way model, 256-way FSDP, 2-way data (arXiv:2204.02311 s4)
  palm = models.get_config("gpt", vocab_size=256000, max_len=2048, d_model=18432, num_layers=118, num_heads=48, num_kv_heads=1,
                           d_ff=73728, mlp="swiglu")
  batch = 2048
  layouts = candidate_layouts(6144, palm, batch)
  assert Layout(2, 256, 12, 1) in layouts
  # divisors of 6144 that split 48 heads; 1- and 2-way would leave more than 2048 ways to split 2048 sequences
  # (or a pipeline with fewer microbatches than stages)
  assert {l.model for l in layouts} == {3, 4, 6, 8, 12, 16, 24, 48}
  for l in layouts:
    assert l.devices == 6144 and 48 % l.model == 0 and 73728 % l.model == 0 and batch % l.replicas == 0
    assert l.stage <= 118 and (l.stage == 1 or l.microbatches == batch // l.replicas >= l.stage)
  expect = 0
  divisors = [x for x in range(1, 6145) if 6144 % x == 0]
  for m, s, f in itertools.product(divisors, divisors, divisors):
    if 6144 % (m * s * f) or 48 % m or 73728 % m or s > 118:
      continue
    d = 6144 // (m * s * f)
    if batch % (d * f) == 0 and (s == 1 or batch // (d * f) >= s):
      expect += 1
  assert len(layouts) == expect
  # 6 x 8 x 64 A100s with t=8, p=64 (Megatron's 1T row) is a candidate of 3072 too
  meg = models.get_config("gpt", d_model=25600, num_layers=128, num_heads=160, d_ff=102400)
  assert Layout(6, 1, 8, 64, 512) in candidate_layouts(3072, meg, 3072)


def test_axes_leaving_the_fast_domain_use_the_network():
  v5e = hardware.get("tpu-v5e")                    # 256-chip slices, DCN 3.125e9 B/s per chip (SB tpus.md:214)
  assert v5e.axis_bandwidth(256, 1) == pytest.approx(2 * 4.5e10 * 2 * 0.8)    # a 16x16 torus: two rings of 2 links
  assert v5e.axis_bandwidth(16, 1) == pytest.approx(2 * 4.5e10 * 0.8)
  assert v5e.axis_bandwidth(32, 256) == pytest.approx(3.125e9 * 0.8)         # data across 32 slices: one chip per slice
  assert v5e.axis_bandwidth(512, 1) == pytest.approx(2 * 4.5e10 * 2 * 0.8)   # 256 per slice pool 800 GB/s of DCN: ICI-bound
  a100 = hardware.get("a100")                      # DGX A100: 8 GPUs on NVSwitch, 8 x 25 GB/s InfiniBand
  assert a100.axis_bandwidth(8, 1) == pytest.approx(3e11 * 0.8)
  assert a100.axis_bandwidth(32, 1) == pytest.approx(8 * 25e9 * 0.8)         # 8 members per node pool the node's rails
  assert a100.axis_bandwidth(6, 8) == pytest.approx(25e9 * 0.8)              # t=8 inside: one member per node


def test_megatron_eq3_equals_model_flops_plus_recompute():
  # Eq. 3 counts 4 passes of the layers and 3 of the head: our model FLOPs + block remat's recompute
  cfg = models.get_config("gpt", vocab_size=51200, max_len=2048, d_model=2304, num_layers=24, num_heads=24, d_ff=4 * 2304,
                          remat="block")
  acc = transformer_accounting(cfg, 512)
  assert megatron_flops(cfg, 512) == pytest.approx(acc.flops_per_step + acc.flops_recompute, rel=1e-12)


def test_megatron_table1_every_row_within_20_percent():
  data = published_runs.load()
  assert len(data["megatron_table1"]["rows"]) == 10 and "2104.04473" in data["megatron_table1"]["source"]
  rows = published_runs.megatron(data)
  for r in rows:
    assert abs(r["error"]) <= 0.20, r
    assert r["predicted_step_s"] == pytest.approx(sum(v for k, v in r["breakdown_s"].items() if k != "exposed_by_collective"))


def test_held_out_runs_are_predicted():
  # not a fit: the same constants, other frameworks and chips; bounds say how far the model is trusted
  rows = published_runs.held_out()
  assert len(rows) == 7
  for r in rows:
    assert abs(r["error"]) <= 0.15, r


def test_named_layouts_and_their_errors():
  assert parse_mesh("data=6,model=8,stage=64") == {"data": 6, "fsdp": 1, "model": 8, "stage": 64}
  with pytest.raises(UserError, match="--mesh 'pipe=4': expected AXIS=N with AXIS one of data, fsdp, model, stage"):
    parse_mesh("pipe=4")
  assert named_layout({"data": 6, "fsdp": 1, "model": 8, "stage": 64}, 3072, 3072, None, 1) == Layout(6, 1, 8, 64, 512)
  with pytest.raises(UserError, match="--mesh uses 384 chips"):
    named_layout({"data": 6, "fsdp": 1, "model": 8, "stage": 8}, 3072, 3072, None, 1)
  with pytest.raises(UserError, match="--microbatches 7 does not divide the 512"):
    named_layout({"data": 6, "fsdp": 1, "model": 8, "stage": 64}, 3072, 3072, 7, 1)
  cfg = experiment("stdlib_gpt", "model.d_model=1024", "model.num_heads=16", "model.d_ff=4096", "model.dtype=bfloat16",
                   "data.global_batch_size=96")
  out = plan(cfg, "h100", 24, mesh={"data": 3, "fsdp": 1, "model": 8, "stage": 1})
  assert [c["layout"] for c in out["candidates"]] == ["data3xmodel8"]
  best = out["candidates"][0]
  assert best["predicted_step_s"] == pytest.approx(best["compute_s"] + best["recompute_s"] + best["memory_s"]
                                                   + best["exposed_comm_s"] + best["bubble_s"])


def test_plan_at_thousands_of_chips():
  # 6144 chips: hundreds of candidates, 1536 hosts; the placement MILP is solved on a block of alike hosts
  cfg = experiment("stdlib_gpt", "model.d_model=18432", "model.num_layers=118", "model.num_heads=48", "model.num_kv_heads=1",
                   "model.d_ff=73728", "model.mlp=swiglu", "model.vocab_size=256000", "model.max_len=2048",
                   "model.dtype=bfloat16", "model.remat=block", "data.global_batch_size=2048")
  out = plan(cfg, "tpu-v4", 6144)
  assert out["fits"] and len(out["candidates"]) > 300
  assert out["placement"]["hosts"] == 1536 and out["placement"]["replicas_placed"] == out["placement"]["replicas"]
  assert {c["mesh"]["model"] for c in out["candidates"]} >= {3, 6, 12}
