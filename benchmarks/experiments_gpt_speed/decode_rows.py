"""Is a decode step's time its weight matmuls at few rows? The lm_decode model's weight matmuls
(8 layers of Q, K, V, O 512x512, MLP 512x2048 and 2048x512, the 512x256 unembedding) chained in
one jit on (rows, 512) activations, nothing else (no attention, no cache, no norms), against the
bytes of those weights at the calibrated read bandwidth, at 1, 8 and 64 rows. Median of 20 calls,
interleaved with the same chain over every weight stored as SPLIT column blocks (one dot each), and
the same chain in numpy (OpenBLAS) and in PyTorch (its CPU GEMM, 2 and 1 threads; torch is in the
`peers` extra): whether any kernel library on this host reads few-row weights near the bound.

  SPLIT=2 PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.decode_rows
"""

import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dcmodel.perf import calibrate  # noqa: E402

D, F, LAYERS, V = 512, 2048, 8, 256
SPLIT = int(os.environ.get("SPLIT", 2))


def main():
  keys = iter(jax.random.split(jax.random.key(0), 100))
  w = lambda i, o: jax.random.normal(next(keys), (i, o)) / np.sqrt(i)
  layers = [[w(D, D), w(D, D), w(D, D), w(D, D), w(D, F), w(F, D)] for _ in range(LAYERS)]
  unembed = w(D, V)
  weight_bytes = 4 * (sum(a.size for layer in layers for a in layer) + unembed.size)

  def chain(mm):
    @jax.jit
    def matmuls(x, layers, unembed):
      for wq, wk, wv, wo, wi, wf in layers:
        a = mm(mm(x, wq) + mm(x, wk) + mm(x, wv), wo)      # the step's projections (values are not the point)
        x = x + mm(jax.nn.gelu(mm(a, wi)), wf) * 1e-3
      return mm(x, unembed)
    return matmuls

  # "split": every weight stored as its column blocks, one dot per block: independent thunks XLA:CPU
  # may run on both cores at once (a few-row dot alone reads the weights from one)
  split = lambda w, n=SPLIT: tuple(jnp.split(w, n, axis=1))
  forms = {"whole": (chain(lambda x, w: x @ w), layers, unembed),
           "split": (chain(lambda x, ws: jnp.concatenate([x @ w for w in ws], -1)),
                     [[split(a) for a in layer] for layer in layers], split(unembed))}
  # the same chain outside XLA: OpenBLAS via numpy, PyTorch's GEMM at 2 and at 1 thread
  def host_chain(mm, gelu, conv):
    ls = [[conv(a) for a in layer] for layer in layers]
    u = conv(unembed)
    def run(x, *_):
      x = conv(x)
      for wq, wk, wv, wo, wi, wf in ls:
        a = mm(mm(x, wq) + mm(x, wk) + mm(x, wv), wo)
        x = x + mm(gelu(mm(a, wi)), wf) * 1e-3
      return mm(x, u)
    return run
  np_gelu = lambda v: 0.5 * v * (1 + np.tanh(0.7978845608 * (v + 0.044715 * v ** 3)))
  to_np = lambda a: np.asarray(a, np.float32)
  to_torch = lambda a: torch.from_numpy(np.array(a, np.float32))
  torch_gelu = lambda v: torch.nn.functional.gelu(v, approximate="tanh")
  forms["numpy"] = (host_chain(np.matmul, np_gelu, to_np), None, None)
  for threads in (2, 1):
    def with_threads(f, n=threads):
      def run(*a):
        torch.set_num_threads(n)
        with torch.inference_mode():
          return f(*a)
      return run
    forms[f"torch{threads}"] = (with_threads(host_chain(torch.matmul, torch_gelu, to_torch)), None, None)
  bw = calibrate.read_bandwidth(256)
  print(f"weights {weight_bytes / 1e6:.1f} MB, read bandwidth {bw / 1e9:.1f} GB/s: memory bound {weight_bytes / bw * 1e3:.2f} ms")
  for rows in (1, 8, 64):
    x = jnp.ones((rows, D))
    times = {}
    for name, (f, ls, u) in forms.items():
      jax.block_until_ready(f(x, ls, u))
      times[name] = []
    for _ in range(20):                       # interleaved
      for name, (f, ls, u) in forms.items():
        t = time.perf_counter()
        jax.block_until_ready(f(x, ls, u))
        times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
      med = float(np.median(ts))
      flops = 2 * rows * weight_bytes / 4
      print(f"rows {rows:3d} {name:6s}: {med * 1e3:6.2f} ms = {weight_bytes / med / 1e9:5.1f} GB/s of weights, "
            f"{flops / med / 1e9:6.1f} GFLOP/s ({weight_bytes / bw / med:.0%} of the memory bound)")


if __name__ == "__main__":
  main()
