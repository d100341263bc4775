"""The same matmul in each operand layout XLA:CPU may give it: NN, NT (rhs contracted on its last
dim, as a backward dX = dY @ W^T), TN (lhs contracted on its first dim, as dW = X^T @ dY), TT, at
the GPT's MLP and projection shapes, in XLA (compiled with the train loop's CPU options, so on
YNNPACK, which takes TN only through a transposing copy XLA adds) beside the GEMMs that take
transposed operands as they lie: numpy's OpenBLAS and PyTorch's (2 threads; torch is in the
`peers` extra). Five rounds; in each, one library's calls run back to back (a warm-up call, then
three timed, for each form), so OpenBLAS's and PyTorch's threads, which spin after a call, slow
only a warm-up; GFLOP/s per form and library, the median of the 15 timed calls.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.dot_forms
"""

import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dcmodel.models.transformer import GPTConfig  # noqa: E402

LIBRARIES = ("XLA", "OpenBLAS", "torch")
DIMS = {"NN": ((1,), (0,)), "NT": ((1,), (1,)), "TN": ((0,), (0,)), "TT": ((0,), (1,))}


def operands(m, k, n):
  """{form: (a, b)} stored as the form lays them out, all for the same (m, k) @ (k, n) product."""
  r = np.random.default_rng(0)
  a, b = r.standard_normal((m, k), np.float32), r.standard_normal((k, n), np.float32)
  at, bt = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
  return {"NN": (a, b), "NT": (a, bt), "TN": (at, b), "TT": (at, bt)}


def contenders(form, a, b):
  """{library: zero-argument call} for one form: XLA with the loop's options; numpy and torch on
  transposed views (no copy: the GEMM gets a transpose flag)."""
  lhs_t, rhs_t = form[0] == "T", form[1] == "T"
  xla = jax.jit(lambda x, y: jax.lax.dot_general(x, y, (DIMS[form], ((), ())))).lower(a, b).compile(
      compiler_options=GPTConfig().cpu_compiler_options(1))
  ja, jb = jax.device_put(a), jax.device_put(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  view = lambda x, t: x.T if t else x
  return {"XLA": lambda: jax.block_until_ready(xla(ja, jb)),
          "OpenBLAS": lambda: view(a, lhs_t) @ view(b, rhs_t),
          "torch": lambda: view(ta, lhs_t) @ view(tb, rhs_t)}


def main():
  torch.set_num_threads(2)
  for m, k, n in [(4096, 512, 2048), (4096, 2048, 512), (512, 4096, 2048), (4096, 512, 512), (512, 4096, 512), (4096, 512, 1536)]:
    by_form = {form: contenders(form, a, b) for form, (a, b) in operands(m, k, n).items()}
    reference = np.asarray(by_form["NN"]["OpenBLAS"]())
    for form, fs in by_form.items():              # every library and form computes the same product
      for lib, f in fs.items():
        np.testing.assert_allclose(np.asarray(f()), reference, rtol=1e-3, atol=1e-3 * np.sqrt(k), err_msg=f"{form} {lib}")
    calls = {lib: {form: fs[lib] for form, fs in by_form.items()} for lib in LIBRARIES}
    times = {(form, lib): [] for lib in LIBRARIES for form in DIMS}
    for _ in range(5):
      for lib in LIBRARIES:       # one library's calls back to back: the others' spinning threads hit only its warm-up
        for form, f in calls[lib].items():
          f()
          for _ in range(3):
            t = time.perf_counter()
            f()
            times[(form, lib)].append(time.perf_counter() - t)
    rate = lambda key: 2 * m * k * n / np.median(times[key]) / 1e9
    print(f"({m}x{k}) @ ({k}x{n}) GFLOP/s XLA / OpenBLAS / torch: " + "  ".join(
        f"{form} {rate((form, 'XLA')):4.0f} / {rate((form, 'OpenBLAS')):4.0f} / {rate((form, 'torch')):4.0f}" for form in DIMS), flush=True)


if __name__ == "__main__":
  main()
