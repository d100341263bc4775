"""The same matmul in each operand layout XLA:CPU may give it: NN, NT (rhs contracted on its last
dim, as a backward dX = dY @ W^T), TN (lhs contracted on its first dim, as dW = X^T @ dY), at the
GPT's MLP and projection shapes. Interleaved rounds; GFLOP/s per form.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.dot_forms
"""

import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def forms(m, k, n):
  """{form: (fn, operands)} computing the same (m, n) = (m, k) @ (k, n) product."""
  r = np.random.default_rng(0)
  a, b = r.standard_normal((m, k), np.float32), r.standard_normal((k, n), np.float32)
  dot = lambda x, y, dims: jax.lax.dot_general(x, y, (dims, ((), ())))
  return {"NN": (jax.jit(lambda x, y: dot(x, y, ((1,), (0,)))), (a, b)),
          "NT": (jax.jit(lambda x, y: dot(x, y, ((1,), (1,)))), (a, np.ascontiguousarray(b.T))),
          "TN": (jax.jit(lambda x, y: dot(x, y, ((0,), (0,)))), (np.ascontiguousarray(a.T), b)),
          "TT": (jax.jit(lambda x, y: dot(x, y, ((0,), (1,)))), (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)))}


def main():
  for m, k, n in [(4096, 512, 2048), (4096, 2048, 512), (512, 4096, 2048), (4096, 512, 512), (512, 4096, 512), (4096, 512, 1536)]:
    fs = {name: (f, [jax.device_put(o) for o in ops]) for name, (f, ops) in forms(m, k, n).items()}
    times = {name: [] for name in fs}
    for name, (f, ops) in fs.items():
      jax.block_until_ready(f(*ops))
    for _ in range(5):
      for name, (f, ops) in fs.items():
        t = time.perf_counter()
        jax.block_until_ready(f(*ops))
        times[name].append(time.perf_counter() - t)
    print(f"({m}x{k}) @ ({k}x{n}): " + "  ".join(
        f"{name} {2 * m * k * n / np.median(t) / 1e9:5.0f} GFLOP/s" for name, t in times.items()), flush=True)


if __name__ == "__main__":
  main()
