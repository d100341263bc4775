"""Measure this host: matmul peak, the rate of XLA's elementwise fusions (the step model's memory
term), fresh-buffer and read bandwidth (the roofline's, decoding's), and each collective's alpha-beta on the
current devices. The figures a prediction uses on a machine with no catalog entry (and a
check of the catalog on one that has).

Calibration points are their own sizes, chosen here, never the configurations a benchmark
scores. Timing: warm-up excluded, results blocked on, median of repeats.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dcmodel.models import host_gemm
from dcmodel.models.layers import takes_host_gemm
from dcmodel.perf import collectives


def timed_calls(fn, *args, repeats: int = 5, warmup: int = 2) -> list[float]:
  """Seconds of each of `repeats` calls of fn(*args), after `warmup` calls, each blocked on."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return times


def _median_time(fn, *args, repeats: int = 5, warmup: int = 2) -> float:
  return float(np.median(timed_calls(fn, *args, repeats=repeats, warmup=warmup)))


@dataclasses.dataclass(frozen=True)
class HostCalibration:
  matmul_flops: float                   # best float32 matmul FLOP/s over all devices together
  mem_bw: float                         # bytes/s XLA's elementwise fusions move (as its cost analysis counts them), all devices
  collectives: dict                     # name -> {"alpha_s": ..., "bw": ...} on all devices (one ring)
  devices: int
  platform: str
  matmul_half_dim: float = 0.0          # narrow output dimension at which a matmul runs at half the wide rate (0: flat)

  def save(self, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

  @classmethod
  def load(cls, path) -> "HostCalibration":
    return cls(**json.loads(Path(path).read_text()))


def _split(devices=None) -> tuple[NamedSharding, int]:
  """The sharding that splits an array's leading axis over `devices` (default all), and their count."""
  devices = list(jax.devices() if devices is None else devices)
  return NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("d",)), P("d")), len(devices)


def matmul_peak(sizes=(512, 1024, 2048), dtype=jnp.float32, devices=None) -> float:
  """FLOP/s of the fastest square matmul, batched over every device (each multiplies its own);
  `devices` (default all) may be this process's own, which needs no other process. On one CPU
  device, the faster of XLA's dot and host BLAS (which the transformers' dense products use)."""
  split, count = _split(devices)
  blas = count == 1 and takes_host_gemm("auto", dtype)
  best = 0.0
  for n in sizes:
    a = jax.device_put(jnp.ones((count, n, n), dtype), split)
    f = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    best = max(best, 2 * count * n ** 3 / _median_time(f, a))
    if blas:
      best = max(best, 2 * n ** 3 / _median_time(jax.jit(lambda x: host_gemm.gemm(x[0], x[0])), a))
  return best


SHAPE_DEPTH = 1024   # the wide dimensions of the shape-curve matmuls; the curve is 1 there (hardware.from_calibration)


def matmul_half_dim(peak: float, widths=(16, 32, 64, 128, 256), depth: int = SHAPE_DEPTH) -> float:
  """Fit the matmul efficiency curve n / (n + h) to matmuls (depth x depth) @ (depth x n) that
  are narrow in one output dimension, relative to the wide rate `peak`: h = n (peak/rate - 1)
  at each width, the median over widths."""
  split, count = _split()
  f = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))
  a = jax.device_put(jnp.ones((count, depth, depth), jnp.float32), split)
  wide = 2 * count * depth ** 3 / _median_time(f, a, a)
  estimates = []
  for n in widths:
    b = jax.device_put(jnp.ones((count, depth, n), jnp.float32), split)
    rate = 2 * count * depth * depth * n / _median_time(f, a, b, repeats=9)
    estimates.append(n * (wide / rate - 1))
  return float(max(np.median(estimates), 0.0))


def memory_bandwidth(mib: int = 256, devices=None) -> float:
  """Bytes/s of x -> 2x over an array split across the devices (default all), each byte read once
  and written once into a fresh buffer, as a step's temporaries are (on a CPU host that includes
  the page faults of new memory, which in-place updates avoid). Median of 9 runs."""
  split, count = _split(devices)
  n = mib * 2 ** 20 // 4 // count * count
  x = jax.device_put(jnp.ones((n,), jnp.float32), split)
  f = jax.jit(lambda v: v * 2.0)
  return 2 * 4 * n / _median_time(f, x, repeats=9)


def _residual_blocks_loss(x, scales):
  """Matmul-free residual blocks (RMS norm, scale, GELU): the elementwise work of a transformer step."""
  for s in scales:
    x = x + jax.nn.gelu(x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s)
  return jnp.sum(x * x)


def fusion_program(tokens: int = 3072, width: int = 384, blocks: int = 4, devices=None):
  """The gradient of `blocks` matmul-free residual blocks over a (tokens, width) array on each of
  `devices` (default all; vmapped over a leading device axis split across them), compiled, and
  its arguments. (3072, 384) float32 is 4.5 MiB: a small model's activations per device."""
  split, count = _split(devices)
  x = jax.device_put(jnp.full((count, tokens, width), 0.5, jnp.float32), split)
  s = jax.device_put(jnp.ones((count, blocks, width), jnp.float32), split)
  return jax.jit(jax.vmap(jax.grad(_residual_blocks_loss, argnums=(0, 1)))).lower(x, s).compile(), (x, s)


def compiled_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program, per device: {"flops", "bytes accessed"} (nan
  where the backend gives none)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return {k: float(cost.get(k, float("nan"))) for k in ("flops", "bytes accessed")}


def fusion_bandwidth(tokens: int = 3072, width: int = 384, devices=None) -> float:
  """Bytes/s of XLA's elementwise fusions as a train step runs them: the backward of norms and
  activations (`fusion_program`) on every device at once, its bytes as XLA's cost analysis
  counts them per device, so the rate divides the same count the step model's traffic is. Its
  temporaries come from the allocator each call, as a step's do (on a CPU host: page faults
  with glibc's defaults, none with an allocator that keeps freed memory). Median of 9 runs."""
  compiled, args = fusion_program(tokens, width, devices=devices)
  count = len(args[0].sharding.device_set)
  return count * compiled_cost(compiled)["bytes accessed"] / _median_time(compiled, *args, repeats=9)


def read_bandwidth(mib: int = 256) -> float:
  """Bytes/s of summing an array split across the devices: each byte read once, nothing written
  (the traffic of reading weights and a KV cache in decoding). Median of 9 runs."""
  split, count = _split()
  n = mib * 2 ** 20 // 4 // count * count
  x = jax.device_put(jnp.ones((n,), jnp.float32), split)
  return 4 * n / _median_time(jax.jit(jnp.sum), x, repeats=9)


# Each collective as a shard_map over one axis, and the alpha-beta form that predicts it.
def _collective_fns(n: int):
  def wrap(body):
    mesh = jax.make_mesh((n,), ("d",))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"), check_vma=False))
  return {
      "all_gather": (wrap(lambda x: jax.lax.all_gather(x, "d", tiled=True)[: x.shape[0]]), collectives.all_gather),
      "reduce_scatter": (wrap(lambda x: jax.lax.psum_scatter(jnp.tile(x, n), "d", tiled=True)), collectives.reduce_scatter),
      "all_reduce": (wrap(lambda x: jax.lax.psum(x, "d")), collectives.all_reduce),
      "all_to_all": (wrap(lambda x: jax.lax.all_to_all(x, "d", 0, 0, tiled=True)), collectives.all_to_all),
      "ppermute": (wrap(lambda x: jax.lax.ppermute(x, "d", [(i, (i + 1) % n) for i in range(n)])), None),
  }


def collective_alpha_beta(sizes_bytes=(2 ** 12, 2 ** 16, 2 ** 20, 2 ** 22, 2 ** 24)) -> dict:
  """Fit t = steps·alpha + moved_bytes/bw for each collective by least squares over `sizes_bytes`
  (the full array S for all-gather/all-reduce/all-to-all/reduce-scatter; each device's shard for ppermute)."""
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("d",))
  out = {}
  for name, (fn, model) in _collective_fns(n).items():
    rows, times = [], []
    for size in sizes_bytes:
      elems = max(size // 4 // n, 1) * n
      if name == "all_gather":
        x = jnp.ones((elems,), jnp.float32)           # each device holds S/n and gathers S
      elif name == "ppermute":
        x = jnp.ones((elems * n,), jnp.float32)        # each device sends `size` bytes
      else:
        x = jnp.ones((elems,), jnp.float32)
      x = jax.device_put(x, NamedSharding(mesh, P("d")))
      s = 4.0 * elems
      t = _median_time(fn, x)
      if model is None:
        rows.append([1.0, s])                         # alpha + shard/bw
      else:                                            # steps from alpha=1,bw=inf; bytes from alpha=0,bw=1
        rows.append([model(0.0, n, float("inf"), 1.0), model(s, n, 1.0, 0.0)])
      times.append(t)
    # relative least squares (each row divided by its time), so small sizes fix alpha and large ones bw
    a, t = np.asarray(rows), np.asarray(times)
    (alpha, inv_bw), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    out[name] = {"alpha_s": float(max(alpha, 0.0)), "bw": float(1.0 / inv_bw) if inv_bw > 0 else float("inf"),
                 "sizes_bytes": list(sizes_bytes), "median_s": times}
  return out


def calibrate(quick: bool = False) -> HostCalibration:
  sizes = (2 ** 12, 2 ** 18, 2 ** 22) if quick else (2 ** 12, 2 ** 16, 2 ** 20, 2 ** 22, 2 ** 24)
  peak = matmul_peak((512, 1024) if quick else (512, 1024, 2048))
  return HostCalibration(matmul_flops=peak, mem_bw=fusion_bandwidth(), collectives=collective_alpha_beta(sizes),
                         devices=jax.device_count(), platform=jax.devices()[0].platform,
                         matmul_half_dim=matmul_half_dim(peak))
