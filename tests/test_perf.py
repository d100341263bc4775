"""The formula library against hand-computed values and brute force."""

import itertools

import numpy as np
import pytest

from dcmodel.perf import collectives, hardware, optimize, pipeline, roofline


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
