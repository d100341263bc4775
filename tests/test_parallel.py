"""Explicit collectives (shard_map) equal the automatic (jit + sharding rules) versions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import experiment
from dcmodel import models
from dcmodel.config import MeshConfig
from dcmodel.mesh import build_mesh, rules_for
from dcmodel.models.attention import rope
from dcmodel.parallel import allreduce, data_parallel, tensor_parallel
from dcmodel.train.loop import train
from dcmodel.train import state as state_lib


def _block_and_input(mesh_cfg, **model_kw):
  cfg = models.get_config("gpt", vocab_size=64, max_len=16, d_model=64, num_layers=1, num_heads=8, d_ff=128, **model_kw)
  mesh = build_mesh(mesh_cfg)
  rules = rules_for(mesh_cfg, mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = nnx.jit(lambda: cfg.make(nnx.Rngs(0)))()
  x = jax.random.normal(jax.random.key(1), (4, 16, 64))
  return cfg, mesh, rules, model.trunk.blocks[0], x


@pytest.mark.parametrize("kind, bias, sp", [("gelu", True, False), ("swiglu", False, False), ("gelu", True, True)])
def test_megatron_mlp_equals_jit(kind, bias, sp):
  mesh_cfg = MeshConfig(data=1, model=8)
  cfg, mesh, rules, block, x = _block_and_input(mesh_cfg, mlp=kind, use_bias=bias)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    auto = nnx.jit(lambda b, x: b.mlp(x, jnp.float32))(block, x)
    params = {k: getattr(block.mlp, k)[...] for k in ("wi", "wo", "wg", "bi", "bo") if getattr(block.mlp, k) is not None}
    explicit = jax.jit(lambda p, x: tensor_parallel.mlp(mesh, p, x, kind, sequence_parallel=sp))(params, x)
  np.testing.assert_allclose(explicit, auto, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_megatron_attention_equals_jit(positions):
  mesh_cfg = MeshConfig(data=1, model=4)
  cfg, mesh, rules, block, x = _block_and_input(mesh_cfg, positions=positions, num_kv_heads=4)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    for i, name in enumerate(("bq", "bk", "bv", "bo")):    # biases start at zero: make them count
      bias = getattr(block.attn, name)
      bias[...] = jax.random.normal(jax.random.key(10 + i), bias.shape)
    auto = nnx.jit(lambda b, x: b.attn(x, True, jnp.arange(16), jnp.float32))(block, x)
    params = {k: getattr(block.attn, k)[...] for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo")}
    explicit = jax.jit(lambda p, x: tensor_parallel.attention(mesh, p, x, True, rope if positions == "rope" else None))(params, x)
  np.testing.assert_allclose(explicit, auto, rtol=1e-5, atol=1e-5)


def test_explicit_data_parallel_equals_jit(tmp_path):
  cfg = experiment("digits_mlp", "mesh.model=1", "train.steps=15", "checkpoint.enabled=false", "train.log_every=15")
  explicit = data_parallel.train(cfg, "none")
  auto = train(cfg, tmp_path / "w")
  np.testing.assert_allclose(explicit.final_eval["loss"], auto.final_eval["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               explicit.params, jax.device_get(state_lib.params(auto.graphdef, auto.state)))


def test_compressed_mean_is_close_and_cuts_bytes():
  mesh = build_mesh(MeshConfig(data=8))
  x = jax.random.normal(jax.random.key(0), (8, 1000))
  from jax.sharding import PartitionSpec as P
  for mode, tol in (("none", 1e-6), ("bf16", 1e-2), ("int8", 3e-2)):
    f = jax.jit(jax.shard_map(lambda v: allreduce.mean(v[0], "data", mode)[0][None], mesh=mesh,
                              in_specs=P("data"), out_specs=P("data"), check_vma=False))
    out = f(x)
    np.testing.assert_allclose(out, np.broadcast_to(x.mean(0), out.shape), atol=tol * float(jnp.abs(x).max()))
  full = allreduce.bytes_sent_per_device(10**6, 8, "none")
  assert full == pytest.approx(2 * 7 / 8 * 4e6)
  assert full / allreduce.bytes_sent_per_device(10**6, 8, "bf16") == 2
  assert full / allreduce.bytes_sent_per_device(10**6, 8, "int8") == 4


@pytest.mark.slow
def test_compressed_training_converges_like_uncompressed():
  # 100 steps: far enough to converge on held-out data, before the train loss is ~0 (where a
  # 2% ratio would measure noise on 0.007 nats).
  cfg = experiment("digits_mlp", "mesh.model=1", "train.steps=100", "checkpoint.enabled=false")
  runs = {mode: data_parallel.train(cfg, mode) for mode in ("none", "bf16", "int8")}
  base = runs["none"]
  for mode in ("bf16", "int8"):
    assert base.bytes_per_step / runs[mode].bytes_per_step == {"bf16": 2, "int8": 4}[mode]
    final = lambda r: float(np.mean(r.losses[-20:]))
    assert abs(final(runs[mode]) / final(base) - 1) <= 0.02, (mode, final(runs[mode]), final(base))
    assert abs(runs[mode].final_eval["loss"] / base.final_eval["loss"] - 1) <= 0.02


def _mlp_stack(num_layers, width, key):
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, (num_layers, width, width)) / np.sqrt(width),
          "b": 0.1 * jax.random.normal(k2, (num_layers, width))}


def _layers(params, x):
  def layer(x, p):
    return x + jnp.tanh(x @ p["w"] + p["b"]), None
  return jax.lax.scan(layer, x, params)[0]


@pytest.mark.parametrize("microbatches", [4, 8])
def test_pipeline_equals_unpipelined(microbatches):
  from dcmodel.parallel import pipeline
  mesh = build_mesh(MeshConfig(data=1, stage=4), jax.devices()[:4])
  params = _mlp_stack(8, 32, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (microbatches * 4, 32))
  y = jax.random.normal(jax.random.key(2), (microbatches * 4, 32))
  staged = jax.tree.map(lambda p: p.reshape(4, 2, *p.shape[1:]), params)      # 4 stages x 2 layers

  def loss_plain(p):
    return jnp.mean((_layers(p, x) - y) ** 2)

  def loss_piped(p):
    out = pipeline.run(_layers, mesh, p, x.reshape(microbatches, 4, 32))
    return jnp.mean((out.reshape(-1, 32) - y) ** 2)

  l1, g1 = jax.value_and_grad(loss_plain)(params)
  l2, g2 = jax.jit(jax.value_and_grad(loss_piped))(staged)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a.reshape(b.shape), b, rtol=1e-4, atol=1e-6), g2, g1)
  assert pipeline.schedule_bubble(4, microbatches) == pytest.approx(3 / (microbatches + 3))
