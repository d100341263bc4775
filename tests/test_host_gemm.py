"""models/host_gemm.py: the CPU matmul custom call into OpenBLAS against float64 NumPy, in values
and gradients, for every transpose and for products split over the thread pool; where `auto`
takes it; and the errors a user sees when the CPU kernels (host_kernels.py) cannot be built or
cannot run."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import experiment
from dcmodel.errors import UserError
from dcmodel.models import host_gemm, host_kernels
from dcmodel.models.layers import matmul

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


def rel_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


# (m, k, n): one block; split by rows (m >= n, >= 128 rows); split by columns (n > m); odd sizes.
@pytest.mark.parametrize("m,k,n", [(5, 3, 7), (300, 70, 200), (100, 33, 301)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_equals_numpy_for_every_transpose(m, k, n, trans_a, trans_b):
  rng = np.random.default_rng(m + k + n)
  a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
  b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
  got = jax.jit(lambda a, b: host_gemm.gemm(a, b, trans_a, trans_b))(a, b)
  want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
  assert got.shape == (m, n) and rel_err(got, want) < 1e-6


@pytest.mark.parametrize("x_shape,w_shape,contract", [((3, 130, 70), (70, 33), 1),      # a dense layer
                                                      ((2, 40, 64), (64, 4, 16), 1),     # a Q projection
                                                      ((2, 40, 4, 16), (4, 16, 64), 2)])  # the output projection
def test_blas_matmul_equals_tensordot_in_values_and_gradients(x_shape, w_shape, contract):
  rng = np.random.default_rng(0)
  x, w = (rng.standard_normal(s).astype(np.float32) for s in (x_shape, w_shape))
  y, vjp = jax.vjp(lambda x, w: matmul(x, w, "blas", contract), x, w)
  g = rng.standard_normal(y.shape).astype(np.float32)
  dx, dw = vjp(g)
  X, W, G = (a.astype(np.float64) for a in (x, w, g))
  lead, out = x.ndim - contract, w.ndim - contract
  want = (np.tensordot(X, W, contract),
          np.tensordot(G, W, (list(range(lead, G.ndim)), list(range(contract, W.ndim)))),
          np.tensordot(X, G, (list(range(lead)), list(range(lead)))))
  assert out >= 1
  for got, ref in zip((y, dx, dw), want):
    assert got.shape == ref.shape and rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("shape,batch_only", [((8, 1), True), ((2, 4), True), ((4, 2), False)],
                         ids=["data8", "data2_fsdp4", "data4_model2"])
def test_where_auto_and_blas_take_the_kernel(shape, batch_only):
  """`auto` takes the kernel where the product is one device's: alone, or inside a shard_map; on a
  split mesh it leaves the product to XLA's dot, and products of few rows and bfloat16 everywhere. `blas` takes it on a
  split mesh too: shard_mapped over the batch axes where the mesh splits only the batch, its
  operands gathered where it splits the model. Values and gradients equal XLA's either way."""
  mesh = jax.make_mesh(shape, ("data", "fsdp" if batch_only else "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("batch", ("data", "fsdp")),)
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((64, 12, 24)).astype(np.float32), rng.standard_normal((24, 40)).astype(np.float32)
  uses = lambda f, *a: "dcmodel_host_gemm" in jax.jit(f).lower(*a).as_text()
  assert uses(lambda x, w: matmul(x, w), x, w)
  assert not uses(lambda x, w: matmul(x, w), x[:5], w)                # 60 rows: few, XLA's dot
  assert uses(lambda x, w: matmul(x, w, "blas"), x[:5], w)
  assert not uses(lambda x, w: matmul(x, w), x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert not uses(lambda x, w: matmul(x, w, "xla"), x, w)
  loss = lambda impl: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(matmul(x, w, impl))), argnums=(0, 1)))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    xs = jax.device_put(x, jax.NamedSharding(mesh, P(("data", "fsdp") if batch_only else "data")))
    assert not uses(lambda x, w: matmul(x, w), xs, w)
    assert uses(lambda x, w: matmul(x, w, "blas"), xs, w)
    local = jax.shard_map(lambda x, w: matmul(x, w), in_specs=(P(mesh.axis_names[0]), P()), out_specs=P(mesh.axis_names[0]))
    assert uses(local, xs, w)
    hlo = jax.jit(lambda x, w: matmul(x, w, "blas")).lower(xs, w).compile().as_text()
    assert bool(re.search(r"= f32\[768,24\]\S* all-gather", hlo)) == (not batch_only)   # x (as 768 x 24 rows) gathered whole
    got, want = loss("blas")(xs, w), loss("xla")(xs, w)
    np.testing.assert_allclose(jax.jit(local)(xs, w), x @ w, rtol=1e-5, atol=1e-5 * float(np.abs(x @ w).max()))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_blas_refuses_bfloat16_and_unknown_names():
  with pytest.raises(UserError, match="model.matmul=blas multiplies float32 only, and model.dtype=bfloat16"):
    experiment("stdlib_gpt", "model.matmul=blas", "model.dtype=bfloat16").model.validate()
  with pytest.raises(UserError, match="model.matmul='mkl' is not one of auto, xla, blas"):
    experiment("stdlib_gpt", "model.matmul=mkl").model.validate()


@pytest.mark.parametrize("cxx,message", [("/nonexistent/c++", "need a C\\+\\+ compiler, and '/nonexistent/c\\+\\+' was not found"),
                                         ("false", "building dcmodel's CPU kernels \\(host_gemm.cc, host_attention.cc\\) with 'false' failed")])
def test_a_kernel_that_cannot_be_built_is_a_user_error(monkeypatch, tmp_path, cxx, message):
  """The build's errors name the compiler and the way out, and leave no library in the cache."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setenv("CXX", cxx)
  with pytest.raises(UserError, match=message + ".*model.matmul=xla and model.attention=xla"):
    host_kernels.build()
  assert not list(tmp_path.rglob("*.so"))


def test_the_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  first = host_kernels.build()
  assert first.parent == tmp_path / "dcmodel" and first.stat().st_size > 0
  stamp = first.stat().st_mtime_ns
  assert host_kernels.build() == first and first.stat().st_mtime_ns == stamp
