"""model.attention: the choice of kernel by platform; the fused CPU kernel's and the TPU splash
kernel's (in Pallas interpret mode) numerics against XLA, forward and gradients, alone, sharded
under a mesh and in the model; and the cuDNN path lowered for a CUDA target from this CPU-only
host."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dcmodel.errors import UserError
from dcmodel.models import host_kernels
from dcmodel.models.attention import attend, choose

B, H, K, D = 2, 4, 2, 32     # grouped-query heads: 2 query heads per kv head


def inputs(length: int, kv_heads: int = K, dtype=jnp.float32, seed: int = 0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, length, H, D), dtype), jax.random.normal(kk, (B, length, kv_heads, D), dtype),
          jax.random.normal(kv, (B, length, kv_heads, D), dtype))


def packed(length: int):
  """Row 0: three documents (at length 384 two of them cross a 128-token block boundary), then
  padding (id 0); row 1: one document filling the row."""
  cuts = [0, round(0.26 * length), round(0.65 * length), length - length // 16, length]
  row0 = np.concatenate([np.full(b - a, i + 1 if i < 3 else 0) for i, (a, b) in enumerate(itertools.pairwise(cuts))])
  return jnp.asarray(np.stack([row0, np.ones(length)]), jnp.int32)


def diff(got, want) -> tuple[float, float]:
  """(max |got - want|, that / max |want|)."""
  err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
  return err, err / float(np.max(np.abs(np.asarray(want))))


def exact(q, k, v, causal: bool, segment_ids) -> np.ndarray:
  """Attention in float64 NumPy: the reference both float32 paths are measured against."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  k, v = (np.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  ok = np.ones(logits.shape[-2:], bool)
  ok = np.tril(ok) if causal else ok
  if segment_ids is not None:
    s = np.asarray(segment_ids)
    ok = ok & (s[:, None, :, None] == s[:, None, None, :])
  logits = np.where(ok, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def close(got, want, what: str):
  # rtol 1e-5 elementwise, and an absolute floor of 1e-5 of the largest value: two float32
  # attentions that sum in different orders differ by ~1e-6 of the scale on every element, so
  # elements near zero (a document's first token, whose dq is exactly 0) have no relative bound.
  # XLA itself is as far from a float64 reference as the kernel is (see the README).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))),
                             err_msg=what)


# --- which implementation runs ---------------------------------------------------------------

def pick(impl, backend, dtype=jnp.bfloat16, q_len=256, kv_len=None, head_dim=64, masked=True, cache=False):
  return choose(impl, backend=backend, dtype=dtype, q_len=q_len, kv_len=q_len if kv_len is None else kv_len,
                head_dim=head_dim, masked=masked, cache=cache)


@pytest.mark.parametrize("args, want", [
    (("auto", "cpu"), "xla"),                                           # bfloat16: no CPU kernel
    (("auto", "cpu", jnp.float32), "cpu"),                              # (xla where it cannot be built)
    (("auto", "cpu", jnp.float32, 200, None, 24, False), "cpu"),        # any length, any head_dim
    (("auto", "cpu", jnp.float32, 1, 384, 64, True, True), "xla"),      # decoding against the cache
    (("cpu", "cpu", jnp.float32, 1, 384, 64, True, True), "xla"),       # even when asked for
    (("auto", "gpu"), "cudnn"),
    (("auto", "cuda"), "cudnn"),
    (("auto", "tpu"), "splash"),
    (("auto", "rocm"), "xla"),
    (("auto", "gpu", jnp.float32), "xla"),                              # cuDNN has no float32 kernel
    (("auto", "gpu", jnp.bfloat16, 256, None, 12), "xla"),              # head_dim not a multiple of 8
    (("auto", "gpu", jnp.bfloat16, 256, None, 192), "xla"),             # > 128 before Hopper
    (("auto", "gpu", jnp.bfloat16, 255), "xla"),                        # odd length with a mask
    (("auto", "gpu", jnp.bfloat16, 255, None, 64, False), "cudnn"),     # odd length, causal only
    (("auto", "tpu", jnp.float32, 200), "xla"),                         # not a multiple of 128
    (("auto", "tpu", jnp.float32, 1, 384, 64, True, True), "xla"),      # decoding against the cache
    (("splash", "tpu", jnp.float32, 1, 384, 64, True, True), "xla"),    # even when asked for
    (("cudnn", "gpu", jnp.bfloat16, 128, 384, 64, True, True), "cudnn"),  # prefill against the cache
    (("cudnn", "gpu", jnp.bfloat16, 1, 384, 64, True, True), "xla"),    # one token: odd length
    (("splash", "cpu", jnp.float32, 384), "splash"),                    # interpret mode off TPU
    (("xla", "tpu"), "xla"),
])
def test_choice(args, want):
  if want == "cpu" and not host_kernels.available():
    want = "xla"
  assert pick(*args) == want


def test_auto_builds_no_kernel_for_a_call_it_does_not_fit(monkeypatch):
  """auto on CPU asks for the kernels only when the call fits them (bfloat16 never builds them),
  and runs XLA's attention where they cannot be built."""
  asked = []
  monkeypatch.setattr(host_kernels, "available", lambda: asked.append(1) or False)
  assert pick("auto", "cpu", jnp.bfloat16) == "xla" and not asked
  assert pick("auto", "cpu", jnp.float32) == "xla" and asked


@pytest.mark.parametrize("args, says", [
    (("splash", "tpu", jnp.float32, 200), "200 is not a multiple of the kernel's 128-token block"),
    (("cudnn", "cpu"), "cuDNN runs on an NVIDIA GPU, not cpu"),
    (("cudnn", "gpu", jnp.float32), "no float32 kernel; set model.dtype=bfloat16"),
    (("cudnn", "gpu", jnp.bfloat16, 256, None, 12), "head dimension 12 is not a multiple of 8"),
    (("cpu", "cpu", jnp.bfloat16), "fused CPU attention computes float32 only, not bfloat16"),
    (("cpu", "tpu", jnp.float32), "dcmodel's fused attention runs on the CPU, not tpu"),
    (("cpu", "cpu", jnp.float32, 128, 256, 64, False), "self-attention, not 128 queries against 256 keys"),
    (("flash", "tpu"), "model.attention='flash' is not one of auto, xla, cpu, cudnn, splash"),
])
def test_explicit_kernel_that_cannot_run_says_why(args, says):
  with pytest.raises(UserError, match=says):
    pick(*args)


def test_config_field(exp):
  from dcmodel.config import same_model, to_dict
  assert exp("stdlib_gpt").model.attention == "auto"
  for override, says in (("model.attention=flash", "model.attention='flash' is not one of auto, xla, cpu, cudnn, splash"),
                         ("model.dtype=bfloat16 model.attention=cpu", "cannot take this model: .* float32 only, not bfloat16"),
                         ("model.attention=cudnn", "cannot take this model: cuDNN's fused attention has no float32"),
                         ("model.max_len=200 model.attention=splash", "200 is not a multiple of the kernel's 128")):
    with pytest.raises(UserError, match=says):
      exp("stdlib_gpt", *override.split())
  # Compute only: a checkpoint written under one kernel resumes under another.
  saved = to_dict(exp("stdlib_gpt", "model.attention=xla"))["model"]
  assert same_model(exp("stdlib_gpt", "model.attention=splash"), saved)
  assert same_model(exp("stdlib_gpt", "model.dtype=bfloat16", "model.attention=cudnn"), {**saved, "dtype": "bfloat16"})


# --- the kernels' numerics against XLA: splash in Pallas interpret mode, the CPU kernel natively --

LENGTH = 384    # three 128-token blocks: the kernels' causal block skipping and accumulation across blocks
KERNELS = ["splash", pytest.param("cpu", marks=pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel"))]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("causal, segments", [(True, False), (True, True), (False, True)],
                         ids=["causal", "causal+segments", "segments"])
def test_kernel_equals_xla_forward_and_gradients(impl, causal, segments):
  q, k, v = inputs(LENGTH)
  seg = packed(LENGTH) if segments else None
  probe = jax.random.normal(jax.random.key(1), (B, LENGTH, H, D))   # a loss that weighs every output

  def run(q, k, v, impl):
    out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, causal=causal, segment_ids=seg, impl=impl), q, k, v)
    return out, pullback(probe)

  (out, grads), (want, want_grads) = (jax.jit(run, static_argnums=3)(q, k, v, i) for i in (impl, "xla"))
  close(out, want, "forward")
  for name, got, ref in zip("qkv", grads, want_grads):
    close(got, ref, f"d{name}")
  # The kernel is as accurate as XLA: both float32 results against float64.
  truth = exact(q, k, v, causal, seg)
  assert diff(out, truth)[0] < 2 * diff(want, truth)[0]
  print(f"\n{impl} {'causal' if causal else 'full'}{'+segments' if segments else ''} (max abs, / max |xla|): "
        f"forward {diff(out, want)}; " + "; ".join(f"d{n} {diff(g, r)}" for n, g, r in zip("qkv", grads, want_grads))
        + f"; forward vs float64: {impl} {diff(out, truth)}, xla {diff(want, truth)}")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")
@pytest.mark.parametrize("length, heads, kv_heads, head_dim, causal, scale, rotary", [
    (5, 4, 2, 32, True, 1.0, None),       # shorter than one 32-row block
    (70, 4, 1, 8, True, 1.0, "row"),      # a partial last block; multi-query; RoPE at positions 0..69
    (70, 3, 3, 16, False, 1.0, "packed"),  # full attention, one kv head per query head; RoPE per row
    (64, 2, 2, 64, True, 5.0, None),      # logits of std 25: the softmax's max shift keeps it finite
])
def test_cpu_kernel_at_the_edges_equals_float64(length, heads, kv_heads, head_dim, causal, scale, rotary):
  """The fused CPU kernel against float64 (XLA's attention computed in float64; the rotation, as
  attention.rope computes it, in float32), forward and
  gradients, with packed rows, on shapes that fall off its blocks, with RoPE inside the kernel
  (positions shared by the batch, or each row's own as packed documents restart them): as close
  as XLA's float32 attention is, or closer. (At logits of std 25 both are ~1e-5 off in dq, the
  kernel about half as far as XLA.)"""
  rng = np.random.default_rng(length + heads)
  q = scale * rng.standard_normal((B, length, heads, head_dim))
  k, v = (scale * rng.standard_normal((B, length, kv_heads, head_dim)) for _ in "kv")
  seg = np.sort(rng.integers(0, 3, (B, length)), axis=1).astype(np.int32)
  positions = {None: None, "row": np.arange(length), "packed": rng.integers(0, 4 * length, (B, length))}[rotary]
  rot = None if positions is None else (jnp.asarray(positions), 10000.0)

  def run(impl, dtype):
    f = lambda q, k, v: attend(q, k, v, causal=causal, segment_ids=seg, impl=impl, rotary=rot)
    out, pullback = jax.vjp(f, *(jnp.asarray(x, dtype) for x in (q, k, v)))
    return jax.device_get((out, *pullback(jnp.cos(out))))   # the gradient of sum(sin(attention))

  with jax.enable_x64(True):
    truth = run("xla", jnp.float64)
  got, xla = run("cpu", jnp.float32), run("xla", jnp.float32)
  assert np.all(np.isfinite(got[0]))
  for name, g, x, t in zip(["forward", "dq", "dk", "dv"], got, xla, truth):
    if scale == 1.0:   # at std-25 logits XLA's float32 falls outside this tolerance too
      close(g, t, name)
    assert diff(g, t)[1] <= max(2 * diff(x, t)[1], 1e-6), name


@pytest.mark.parametrize("impl", KERNELS)
def test_a_batch_that_does_not_split_evenly_goes_to_xla_under_auto(impl):
  """A shard_mapped kernel takes even pieces only: 3 rows over data=2 run XLA's attention under
  auto (XLA pads), and an explicit kernel says why it cannot run."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, k, v = (jnp.concatenate([x, x[:1]]) for x in inputs(128))   # 3 rows
  with jax.set_mesh(mesh), nnx.logical_axis_rules((("batch", "data"), ("act_heads", "model"))):
    got = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, impl="auto"))(q, k, v)
    with pytest.raises(UserError, match=f"model.attention={impl} cannot run here: the batch \\(3\\) does not split "
                                        "evenly over its 2 mesh shards"):
      jax.jit(lambda q, k, v: attend(q, k, v, causal=True, impl=impl))(q, k, v)
  close(got, attend(q, k, v, causal=True, impl="xla"), "auto")


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_kernel_sharded_over_batch_and_heads(kv_heads, impl):
  """Under an 8-device mesh (batch over data=4, heads over model=2), shard_mapped, equal to XLA,
  with the kv heads' own rule unsplit: 2 kv heads are split as the query heads are; 1 kv head
  (multi-query) does not split in 2, so each device gets it for each of its query heads."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("batch", "data"), ("act_heads", "model"), ("act_kv_heads", None))
  q, k, v = inputs(128, kv_heads=kv_heads)
  seg = packed(128)
  q, k, v, seg = (jnp.concatenate([x] * 4) for x in (q, k, v, seg))   # 8 rows over data=4
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P("data", None, "model" if x is q else None))) for x in (q, k, v))
    f = lambda impl: jax.jit(jax.value_and_grad(
        lambda q, k, v: (attend(q, k, v, causal=True, segment_ids=seg, impl=impl) ** 2).sum(), argnums=(0, 1, 2)))
    (loss, grads), (want_loss, want_grads) = f(impl)(q, k, v), f("xla")(q, k, v)
    text = jax.jit(lambda q, k, v: attend(q, k, v, causal=True, segment_ids=seg, impl=impl)).lower(q, k, v).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  close(loss, want_loss, "loss")
  for name, got, ref in zip("qkv", grads, want_grads):
    close(got, ref, f"d{name}")
  print(f"\n{impl} sharded, {kv_heads} kv heads (max abs, / max |xla|): loss {diff(loss, want_loss)}; "
        + "; ".join(f"d{n} {diff(g, r)}" for n, g, r in zip("qkv", grads, want_grads)))


@pytest.mark.parametrize("impl", KERNELS)
def test_gpt_with_kernel_on_a_mesh_equals_xla(exp, impl):
  """The model's own call site: GPT (grouped-query, RoPE, packed rows) on data=4 x model=2, logits and
  parameter gradients under model.attention=splash (cpu) equal to xla."""
  from dcmodel.train.state import place
  base = ["model.d_model=64", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128", "model.positions=rope",
          "mesh.data=4", "mesh.model=2", "data.global_batch_size=8"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (8, 128)), jnp.int32)
  seg = np.sort(rng.integers(1, 4, (8, 128)), axis=1)
  # each document's positions restart at 0: per-row rotary tables, split over the batch shards
  pos = jnp.asarray(np.arange(128) - np.maximum.accumulate(np.where(np.diff(seg, prepend=0, axis=1) != 0, np.arange(128), 0), axis=1), jnp.int32)
  seg = jnp.asarray(seg, jnp.int32)
  results = {}
  for name in (impl, "xla"):
    placed = place(exp("stdlib_gpt", *base, f"model.attention={name}"))
    model = placed.model(placed.init())
    with placed.context():
      def loss(m):
        logits = m(x, segment_ids=seg, positions=pos)
        return (logits ** 2).mean(), logits
      (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
      jaxpr = str(jax.make_jaxpr(lambda m: m(x, segment_ids=seg, positions=pos))(model))
    assert ("pallas_call" in jaxpr) == (name == "splash") and ("dcmodel_host_attention" in jaxpr) == (name == "cpu")
    results[name] = logits, jax.tree.leaves(grads)
  (logits, grads), (want, want_grads) = results[impl], results["xla"]
  close(logits, want, "logits")
  for got, ref in zip(grads, want_grads):
    close(got, ref, "parameter gradient")
  print(f"\nGPT {impl} (max abs, / max |xla|): logits {diff(logits, want)}; worst parameter gradient "
        f"{max((diff(g, r) for g, r in zip(grads, want_grads)), key=lambda d: d[1])}")


# --- lowering for accelerators from this CPU host ---------------------------------------------

def lowered(f, *args, platform: str) -> str:
  return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_auto_lowers_cudnn_for_cuda(monkeypatch):
  """auto on a CUDA target emits cuDNN's fused attention (forward and backward custom calls).
  jax asks the CUDA plugin for cuDNN's version while tracing; no plugin is installed here
  ("RuntimeError: cuDNN is not detected."), so that one query is stubbed."""
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  q, k, v = inputs(256, dtype=jnp.bfloat16)
  seg = packed(256)
  attn = lambda q, k, v, seg=None: attend(q, k, v, causal=True, segment_ids=seg, impl="auto", backend="cuda")
  grad = jax.grad(lambda q, k, v, seg=None: attn(q, k, v, seg).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  assert "__cudnn$fmhaSoftmax(" in lowered(attn, q, k, v, platform="cuda")                    # causal only
  assert "__cudnn$fmhaScaleBiasSoftmax(" in lowered(attn, q, k, v, seg, platform="cuda")      # segments as a bias
  text = lowered(grad, q, k, v, seg, platform="cuda")
  assert "__cudnn$fmhaScaleBiasSoftmax(" in text and "__cudnn$fmhaScaleBiasSoftmaxBackward(" in text
  # float32 falls back to XLA's attention on the same target.
  q32, k32, v32 = inputs(256)
  assert "__cudnn" not in lowered(attn, q32, k32, v32, seg, platform="cuda")


def test_auto_lowers_splash_for_tpu():
  """auto on a TPU target emits the Mosaic kernel (not interpret mode): forward, dq and dkv."""
  q, k, v = inputs(256, dtype=jnp.bfloat16)
  seg = packed(256)
  attn = lambda q, k, v: attend(q, k, v, causal=True, segment_ids=seg, impl="auto", backend="tpu")
  assert lowered(attn, q, k, v, platform="tpu").count("tpu_custom_call") == 1
  grad = jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  assert lowered(grad, q, k, v, platform="tpu").count("tpu_custom_call") == 3


# --- XLA's causal self-attention as two query halves ------------------------------------------

@pytest.mark.parametrize("length, segments", [(128, False), (256, True)], ids=["causal128", "causal256+segments"])
def test_causal_halves_equal_dot_product_attention_forward_and_gradients(length, segments):
  """attend(impl="xla") on a causal self-attention of length >= CAUSAL_HALVES_MIN runs as two
  query halves; it is jax.nn.dot_product_attention's result (GQA, packed segments) to float32
  rounding, forward and gradients."""
  from dcmodel.models.attention import CAUSAL_HALVES_MIN, causal_halves
  assert length >= CAUSAL_HALVES_MIN
  q, k, v = inputs(length)
  seg = packed(length) if segments else None
  probe = jax.random.normal(jax.random.key(1), (B, length, H, D))

  def reference(q, k, v):
    mask = None if seg is None else seg[:, None, :, None] == seg[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")

  def run(fn):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(probe)

  (out, grads), (want, want_grads) = (jax.jit(run, static_argnums=0)(fn) for fn in (
      lambda q, k, v: attend(q, k, v, causal=True, segment_ids=seg, impl="xla"), reference))
  # attend took the halves (the same program as causal_halves called directly)
  assert str(jax.make_jaxpr(lambda q, k, v: attend(q, k, v, causal=True, segment_ids=seg, impl="xla"))(q, k, v)) == \
      str(jax.make_jaxpr(lambda q, k, v: causal_halves(q, k, v, seg))(q, k, v))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
