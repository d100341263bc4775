"""Every zoo model under every layout that applies equals its single-device run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import experiment
from dcmodel.errors import UserError
from dcmodel.train import state as state_lib
from dcmodel.train.loop import train
from dcmodel.train.metrics import read

# Small versions of each experiment, so every layout compiles and runs in seconds.
SMALL = {
    "stdlib_gpt": ["model.d_model=64", "model.num_layers=2", "model.num_heads=8", "model.num_kv_heads=4", "model.d_ff=128",
                   "model.max_len=32", "data.global_batch_size=16", "data.eval_batch_size=16"],
    "stdlib_bert": ["model.d_model=32", "model.num_layers=1", "model.d_ff=64", "model.max_len=32",
                    "data.options={'snippet_len': 32, 'max_per_class': 40}", "data.global_batch_size=16", "data.eval_batch_size=16"],
    "stdlib_gru": ["model.hidden=32", "model.embed_dim=16", "model.seq_len=32",
                   "data.options={'snippet_len': 32, 'max_per_class': 40}", "data.global_batch_size=16", "data.eval_batch_size=16"],
    "clicks_dlrm": ["data.options={'rows': 2000, 'table_sizes': (1000, 500, 200, 100)}", "data.global_batch_size=64",
                    "data.eval_batch_size=80"],
    "recommender_mlp": ["data.options={'rows': 800, 'num_features': 100}", "data.global_batch_size=32", "data.eval_batch_size=40"],
}
LAYOUTS = {  # name: (mesh overrides); the rule table is the default one in every case
    "dp": ("mesh.data=8", "mesh.fsdp=1", "mesh.model=1"),
    "fsdp": ("mesh.data=1", "mesh.fsdp=8", "mesh.model=1"),
    "tp": ("mesh.data=4", "mesh.fsdp=1", "mesh.model=2"),
    "fsdp_tp": ("mesh.data=1", "mesh.fsdp=4", "mesh.model=2"),
    "dp_tp": ("mesh.data=2", "mesh.fsdp=1", "mesh.model=4"),
}


BYTES_DIVISOR = {"fsdp": 8, "tp": 2, "fsdp_tp": 8, "dp_tp": 4}   # shards of a (embed, heads/mlp) weight


def _check_per_device_bytes(result, divisor):
  model, opt = nnx.merge(result.graphdef, result.state)
  wq = model.trunk.blocks[0].attn.wq.get_value()           # (embed, heads, head_dim)
  mlp_in = model.trunk.blocks[0].mlp.wi.get_value()         # (embed, mlp)
  for arr in (wq, mlp_in):
    assert {s.data.nbytes for s in arr.addressable_shards} == {arr.nbytes // divisor}, arr.sharding
  moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(opt))[0]
             if "opt_state" in jax.tree_util.keystr(path) and "'blocks'][0]['attn']['wq']" in jax.tree_util.keystr(path)]
  assert len(moments) == 1 and moments[0].sharding == wq.sharding   # optimizer state sharded like its parameter


def _run(tmp_path, name, layout, *extra):
  mesh = LAYOUTS[layout] if layout else ("mesh.data=1", "mesh.fsdp=1", "mesh.model=1")
  cfg = experiment(name, *SMALL[name], *mesh, "train.steps=3", "train.log_every=1", "checkpoint.enabled=false", "train.final_eval=false",
                   "optimizer.warmup_steps=0", "optimizer.name=sgd", "optimizer.learning_rate=0.1",
                   "optimizer.grad_clip_norm=0", *extra)
  devices = jax.devices()[:8] if layout else jax.devices()[:1]
  work = tmp_path / f"{name}-{layout}-{len(extra)}"
  result = train(cfg, work, devices=devices)
  losses = np.array([r["loss"] for r in read(work / "metrics.jsonl") if r["split"] == "train"])
  return result, losses


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_layout_equals_one_device(tmp_path, name):
  ref, ref_losses = _run(tmp_path, name, None)
  ref_params = jax.device_get(state_lib.params(ref.graphdef, ref.state))
  for layout in LAYOUTS:
    if name == "recommender_mlp" and layout == "fsdp":
      with pytest.raises(UserError, match=r"dimension 0 \(100\) does not split over mesh axes fsdp"):
        _run(tmp_path, name, layout)                              # 100 inputs cannot be split 8 ways
      continue
    result, losses = _run(tmp_path, name, layout)
    if name == "stdlib_gpt" and layout in BYTES_DIVISOR:
      _check_per_device_bytes(result, BYTES_DIVISOR[layout])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, err_msg=f"{name} {layout}")
    # SGD, so parameters after 3 steps differ exactly as the gradients do (Adam's g / sqrt(v)
    # would turn rounding noise on near-zero gradients into full-size steps).
    params = jax.device_get(state_lib.params(result.graphdef, result.state))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{name} {layout}"),
                 params, ref_params)


def test_dlrm_tables_are_split_by_rows(tmp_path):
  result, _ = _run(tmp_path, "clicks_dlrm", "tp")
  model, _ = nnx.merge(result.graphdef, result.state)
  table = model.tables[0].get_value()
  assert table.sharding.spec == jax.sharding.PartitionSpec("model", None)
  assert {s.data.shape for s in table.addressable_shards} == {(500, 16)}


def test_dropout_is_applied_layout_independent_and_resumes_exactly(tmp_path):
  drop = ("model.dropout=0.2",)
  ref, ref_losses = _run(tmp_path, "stdlib_gpt", None, *drop)
  model, _ = nnx.merge(ref.graphdef, ref.state)
  tokens = jax.numpy.arange(64).reshape(2, 32) % 256
  keyed = [np.asarray(model(tokens, dropout_key=jax.random.key(k))) for k in (0, 0, 1)]
  plain = np.asarray(model(tokens))
  np.testing.assert_array_equal(keyed[0], keyed[1])                    # same key, same masks
  assert np.abs(keyed[0] - plain).max() > 1e-2 and np.abs(keyed[0] - keyed[2]).max() > 1e-2   # masks applied, per key
  # The masks come from (seed, step) and the partitionable threefry, so they do not depend on
  # how the batch and weights are split.
  _, losses = _run(tmp_path, "stdlib_gpt", "tp", *drop)                  # data=4 x model=2
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
  # Microbatches draw their own masks.
  _, accum = _run(tmp_path, "stdlib_gpt", None, *drop, "train.grad_accum_steps=2")
  assert np.all(np.isfinite(accum)) and not np.allclose(accum, ref_losses, rtol=1e-4)
  # Nothing random lives in the state, yet a resumed run draws the same masks: bitwise equal.
  common = (*SMALL["stdlib_gpt"], *drop, "mesh.data=1", "mesh.fsdp=1", "mesh.model=1", "train.log_every=1",
            "train.final_eval=false", "checkpoint.every_steps=3")
  straight = train(experiment("stdlib_gpt", *common, "train.steps=6"), tmp_path / "straight", devices=jax.devices()[:1])
  train(experiment("stdlib_gpt", *common, "train.steps=3"), tmp_path / "resumed", devices=jax.devices()[:1])
  resumed = train(experiment("stdlib_gpt", *common, "train.steps=6"), tmp_path / "resumed", devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state_lib.params(straight.graphdef, straight.state)),
               jax.device_get(state_lib.params(resumed.graphdef, resumed.state)))


def test_dropout_out_of_range_is_a_user_error():
  with pytest.raises(UserError, match=r"model.dropout must be in \[0, 1\), got 1.5"):
    experiment("stdlib_gpt", "model.dropout=1.5").model.validate()


def _matmul_input_dtypes(jaxpr) -> set:
  """dtypes entering every dot_general / conv in a jaxpr, nested scans and jits included, and the
  floating operands of the CPU kernels' custom calls (host BLAS products, fused attention)."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      found |= {str(v.aval.dtype) for v in eqn.invars}
    if eqn.primitive.name == "ffi_call":
      found |= {str(v.aval.dtype) for v in eqn.invars if jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.size}
    for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else ():
      found |= _matmul_input_dtypes(sub)
    for p in eqn.params.values():
      inner = getattr(p, "jaxpr", None)
      if inner is not None and hasattr(inner, "eqns"):
        found |= _matmul_input_dtypes(inner)
      elif hasattr(p, "eqns"):
        found |= _matmul_input_dtypes(p)
  return found


def _inputs(model_cfg, batch=4):
  rng = np.random.default_rng(0)
  shape = (batch, *model_cfg.input_shape())
  if hasattr(model_cfg, "vocab_size"):
    x = rng.integers(0, model_cfg.vocab_size, shape, dtype=np.int32)
  else:
    x = rng.normal(size=shape).astype(np.float32)
  if "cat" in model_cfg.batch_spec().inputs:
    return {"x": x, "cat": np.stack([rng.integers(0, n, batch) for n in model_cfg.table_sizes], 1).astype(np.int32)}
  return {"x": x}


@pytest.mark.parametrize("name", sorted({*SMALL, "digits_cnn", "digits_mlp"}))
def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_parameters(name):
  outs = {}
  for dtype in ("float32", "bfloat16"):
    cfg = experiment(name, *SMALL.get(name, ()), f"model.dtype={dtype}", "mesh.data=1", "mesh.fsdp=1", "mesh.model=1")
    with state_lib.place(cfg, jax.devices()[:1]).context():
      model, opt = state_lib.make_model_and_optimizer(cfg)
      graphdef, state = nnx.split(model)
      args = _inputs(cfg.model)
      forward = lambda s, a: nnx.merge(graphdef, s)(**a)
      assert _matmul_input_dtypes(jax.make_jaxpr(forward)(state, args).jaxpr) == {dtype}
      outs[dtype] = np.asarray(jax.jit(forward)(state, args))
    assert {str(v.dtype) for v in jax.tree.leaves(state)} == {"float32"}        # parameters stay float32
    moments = jax.tree.leaves(nnx.state(opt, nnx.OptState))
    assert {str(v.dtype) for v in moments if v.ndim} == {"float32"}             # so does the optimizer state
  assert outs["bfloat16"].dtype == np.float32                                  # logits back in float32
  err = np.linalg.norm(outs["bfloat16"] - outs["float32"]) / np.linalg.norm(outs["float32"])
  assert 0 < err < 3e-2, err


def test_unknown_compute_dtype_is_a_user_error():
  with pytest.raises(UserError, match="model.dtype='float16' is not one of float32, bfloat16"):
    experiment("digits_cnn", "model.dtype=float16").model.validate()


def test_remat_policies_change_memory_not_numbers():
  """model.remat=block|dots: the same loss and gradients as no remat (rtol 1e-5) from the same
  parameters and batch, and the residuals saved for the backward pass shrink (none > dots > block)."""
  from dcmodel.perf.accounting import account, loss_fn_and_args
  rng = np.random.default_rng(0)
  results, saved, batch = {}, {}, None
  for policy in ("none", "block", "dots"):
    cfg = experiment("stdlib_gpt", *SMALL["stdlib_gpt"], "mesh.data=1", *([f"model.remat={policy}"] if policy != "none" else []))
    assert cfg.model.remat == policy
    loss, _, spec, _ = loss_fn_and_args(cfg)
    placed = state_lib.place(cfg, jax.devices()[:1])
    params = state_lib.params(placed.graphdef, placed.init())    # same seed: same values
    if batch is None:
      batch = {k: (np.ones if k in ("mask", "weights", "target_bytes", "segment_ids") else
                   lambda s, d: rng.integers(0, 32, s).astype(d))(v.shape, v.dtype) for k, v in spec.items()}
    results[policy] = jax.device_get(jax.jit(jax.value_and_grad(loss))(params, batch))
    saved[policy] = account(cfg).activation_bytes
  for policy in ("block", "dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), results[policy], results["none"])
  assert saved["none"] > saved["dots"] > saved["block"] > 0, saved


def test_cnn_pooling_equals_reduce_window_in_values_and_gradients():
  """The CNN's reshape-and-max pooling is nnx.max_pool (reduce_window) in values and, where no
  window ties, in gradients."""
  from dcmodel.models.cnn import max_pool_2x2
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  ref = lambda v: nnx.max_pool(v, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
  w = jax.random.normal(jax.random.key(1), (4, 4, 4, 3))
  grad = lambda pool: jax.grad(lambda v: (pool(v) * w).sum())(x)
  np.testing.assert_array_equal(grad(max_pool_2x2), grad(ref))


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_cnn_matmul_convolution_equals_xla_in_values_and_gradients(kernel_size):
  """model.conv=matmul (the taps gathered into one matmul; what auto picks on CPU) is XLA's
  convolution: the same logits and parameter gradients from the same parameters, to float32
  rounding."""
  from dcmodel.models.layers import conv_function
  x = jax.random.normal(jax.random.key(0), (4, 64))
  results = {}
  for conv in ("xla", "matmul"):
    cfg = experiment("digits_cnn", f"model.kernel_size={kernel_size}", f"model.conv={conv}", "mesh.data=1")
    with state_lib.place(cfg, jax.devices()[:1]).context():
      graphdef, state = nnx.split(state_lib.make_model_and_optimizer(cfg)[0])
      loss = lambda s: (nnx.merge(graphdef, s)(x) ** 2).mean()
      results[conv] = jax.device_get((nnx.merge(graphdef, state)(x), jax.jit(jax.grad(loss))(state)))
  np.testing.assert_allclose(results["matmul"][0], results["xla"][0], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), results["matmul"][1], results["xla"][1])
  assert conv_function("auto") is conv_function("matmul" if jax.default_backend() == "cpu" else "xla")


def test_argmax_equals_jnp_argmax_with_ties_and_nans():
  """layers.argmax (a max and a min, which XLA:CPU vectorizes) is jnp.argmax: the first index of
  the maximum, of the first NaN when there is one, along any axis, and int32; also jitted over a
  sharded array."""
  from dcmodel.models.layers import argmax
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, (6, 7, 33)).astype(np.float32)      # few values: many ties
  x[1, 2, 4] = x[3, 0, 30] = np.nan
  x[2, 5, :] = -np.inf
  for axis in (-1, 0, 1):
    got = np.asarray(argmax(x, axis))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(x, axis)))
  mesh = jax.make_mesh((8,), ("data",))
  logits = jax.device_put(rng.normal(size=(16, 256)).astype(np.float32), jax.NamedSharding(mesh, jax.P("data")))
  np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(logits)), np.asarray(jnp.argmax(logits, -1)))


@pytest.mark.parametrize("layout", [("mesh.data=1", "model.mlp=gelu", "model.tie_embeddings=true"),
                                    ("mesh.data=2", "mesh.fsdp=4", "model.mlp=gelu", "model.tie_embeddings=true"),
                                    ("mesh.data=2", "mesh.fsdp=2", "mesh.model=2", "model.mlp=swiglu", "model.tie_embeddings=false")],
                         ids=["one_device_gelu_tied", "dp_fsdp_gelu_tied", "dp_fsdp_tp_swiglu_untied"])
def test_transformer_matmul_backward_equals_plain_matmul(monkeypatch, layout):
  """layers.matmul (the dense layers', projections' and unembedding's product) gives the same loss
  and updated parameters after a train step as a plain tensordot (float32 rounding), with
  model.matmul=auto, =blas and =xla, on one device and on sharded meshes; and on CPU the model
  does use what it says: auto multiplies by host BLAS on one device and by XLA's dots on a split
  mesh, blas by host BLAS everywhere (shard_mapped where the mesh splits only the batch); xla's
  backward computes dW as a row-major matmul."""
  from dcmodel.models import transformer
  from dcmodel.train import tasks
  from dcmodel.train.step import make_train_step
  rng = np.random.default_rng(0)
  one_device = "mesh.data=1" in layout
  devices = jax.devices()[:1] if one_device else jax.devices()
  plain = lambda x, w, impl="auto", contract=1: jnp.tensordot(x, w, contract)
  results = {}
  for name, sets, fn in (("auto", [], transformer.matmul), ("blas", ["model.matmul=blas"], transformer.matmul),
                         ("xla", ["model.matmul=xla"], transformer.matmul), ("plain", ["model.matmul=xla"], plain)):
    cfg = experiment("stdlib_gpt", *SMALL["stdlib_gpt"], *layout, *sets)
    spec = state_lib.abstract_batch(cfg)
    if not results:
      batch = {k: (np.ones if k in ("mask", "weights", "target_bytes", "segment_ids") else
                   lambda s, d: rng.integers(0, 32, s).astype(d))(v.shape, v.dtype) for k, v in spec.items()}
    monkeypatch.setattr(transformer, "matmul", fn)
    placed = state_lib.place(cfg, devices)
    with placed.context():
      step = make_train_step(placed.graphdef, tasks.get("lm"), placed.shardings, placed.data_sharding, cfg.model.batch_spec().inputs)
      if jax.default_backend() == "cpu" and name != "plain":
        hlo = step.lower(placed.init(), batch).as_text()
        assert ("dcmodel_host_gemm" in hlo) == (name == "blas" or (name == "auto" and one_device)), name
        if name == "xla":
          assert "optimization_barrier" in str(jax.make_jaxpr(step)(placed.init(), batch))   # the NN dW form
      state, sums = step(placed.init(), jax.device_put(batch, placed.data_sharding))
      results[name] = jax.device_get((state_lib.params(placed.graphdef, state), sums["loss_sum"]))
  for name in ("auto", "blas", "xla"):
    np.testing.assert_allclose(results[name][1], results["plain"][1], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results[name][0], results["plain"][0])
