"""The design documents' two optimization models, solved with SciPy's HiGHS.

Resource allocation (doc 002): maximize utilization, sum_j x_ij <= r_i for every node i.
  x_ij = resource of node i given to job j; each job asks for d_j and may only use the nodes it
  fits on (allowed_ij). Continuous (`linprog`) as the documents state it, or whole jobs on one
  node each (`milp`), which is what a scheduler placing shards needs.
Data transfer (doc 002): minimize sum d_ij * x_ij subject to x_ij <= c_ij, as a min-cost flow:
  x_ij = bytes/s sent over link i->j, d_ij its cost (distance, latency), c_ij its bandwidth;
  flow is conserved at every node and each source/sink sends/receives its rate.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from dcmodel.errors import UserError


@dataclasses.dataclass(frozen=True)
class Allocation:
  x: np.ndarray                 # (nodes, jobs) resource given
  allocated: float              # sum of x, weighted by job weight
  utilization: np.ndarray       # per node, sum_j x_ij / r_i
  placed: np.ndarray            # (jobs,) node index or -1 (integral only)


def allocate(capacity, demand, allowed=None, weight=None, integral: bool = False) -> Allocation:
  r = np.asarray(capacity, float)
  d = np.asarray(demand, float)
  n, m = len(r), len(d)
  allowed = np.ones((n, m), bool) if allowed is None else np.asarray(allowed, bool)
  w = np.ones(m) if weight is None else np.asarray(weight, float)
  if (r < 0).any() or (d < 0).any() or allowed.shape != (n, m):
    raise UserError(f"allocate: capacities and demands must be >= 0 and allowed must be ({n}, {m})")
  if not integral:
    # variables x_ij, row-major; maximize w_j x_ij  <=>  minimize -w_j x_ij
    c = -np.tile(w, n)
    node_rows = np.kron(np.eye(n), np.ones(m))            # sum_j x_ij <= r_i
    job_rows = np.kron(np.ones(n), np.eye(m))             # sum_i x_ij <= d_j
    upper = np.where(allowed, np.inf, 0.0).reshape(-1)
    res = linprog(c, A_ub=np.vstack([node_rows, job_rows]), b_ub=np.concatenate([r, d]),
                  bounds=list(zip(np.zeros(n * m), upper)), method="highs")
    x = res.x.reshape(n, m)
    placed = -np.ones(m, int)
  else:
    # binary y_ij: job j runs wholly on node i; sum_i y_ij <= 1; sum_j d_j y_ij <= r_i
    c = -np.tile(w * d, n)
    cons = [LinearConstraint(np.kron(np.eye(n), d[None, :]), -np.inf, r),
            LinearConstraint(np.kron(np.ones(n), np.eye(m)), -np.inf, np.ones(m))]
    res = milp(c, constraints=cons, integrality=np.ones(n * m), bounds=Bounds(0, allowed.reshape(-1).astype(float)))
    y = np.round(res.x).reshape(n, m)
    x = y * d[None, :]
    placed = np.where(y.any(axis=0), y.argmax(axis=0), -1)
  if not res.success:
    raise UserError(f"allocate: the solver failed: {res.message}")
  util = np.divide(x.sum(1), r, out=np.zeros(n), where=r > 0)
  return Allocation(x, float((x * w[None, :]).sum()), util, placed)


@dataclasses.dataclass(frozen=True)
class Flow:
  edges: list[tuple[int, int]]
  flow: np.ndarray              # per edge, bytes/s
  cost: float                   # sum d_ij * x_ij
  bottleneck_utilization: float # max_ij x_ij / c_ij


def min_cost_flow(num_nodes: int, edges, cost, capacity, supply) -> Flow:
  """supply[v] > 0 sends, < 0 receives, and sum(supply) == 0."""
  edges = [tuple(e) for e in edges]
  cost, capacity, supply = (np.asarray(a, float) for a in (cost, capacity, supply))
  if abs(supply.sum()) > 1e-9 * max(1.0, np.abs(supply).sum()):
    raise UserError(f"min_cost_flow: supplies must sum to 0, got {supply.sum()}")
  incidence = np.zeros((num_nodes, len(edges)))
  for k, (u, v) in enumerate(edges):
    incidence[u, k] += 1.0                                 # out of u
    incidence[v, k] -= 1.0                                 # into v
  res = linprog(cost, A_eq=incidence, b_eq=supply, bounds=list(zip(np.zeros(len(edges)), capacity)), method="highs")
  if not res.success:
    raise UserError(f"min_cost_flow: no feasible routing within the link capacities ({res.message})")
  util = float(np.max(np.divide(res.x, capacity, out=np.zeros_like(res.x), where=capacity > 0), initial=0.0))
  return Flow(edges, res.x, float(cost @ res.x), util)


def transfer_time_s(volume_bytes: float, rate_bytes_per_s: float, latency_s: float = 0.0) -> float:
  """Time to move a volume at a sustained routed rate."""
  return latency_s + volume_bytes / rate_bytes_per_s
