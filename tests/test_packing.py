"""Packed rows: the loss of a packed batch equals the documents' losses computed one document at a
time, under data and tensor parallelism, with RoPE and with learned positions (both restart at
every document). If attention crossed a document boundary, or positions ran on, they would differ."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import experiment
from dcmodel.data.transforms import PackedWindows, TokenStream
from dcmodel.train import state as state_lib
from dcmodel.train import tasks

L, VOCAB = 16, 64


def _packed_batch(rows: int = 8):
  rng = np.random.default_rng(0)
  docs, total = [], 0
  while total < rows * L + 1:
    docs.append(rng.integers(0, VOCAB, rng.integers(2, 13)).astype(np.int32))
    total += len(docs[-1])
  return PackedWindows(TokenStream.concat(docs), L, np.ones(VOCAB)).take(np.arange(rows))


def _pieces(batch):
  """Every document piece of every row as its own sequence at positions 0..n-1, right-padded to L
  (a causal model never looks right), with its own targets and weights."""
  xs, ys, ws = [], [], []
  for r in range(len(batch["x"])):
    for s in np.unique(batch["segment_ids"][r]):
      at = batch["segment_ids"][r] == s
      n = int(at.sum())
      pad = lambda v: np.pad(v[at], (0, L - n))
      xs.append(pad(batch["x"][r])), ys.append(pad(batch["y"][r])), ws.append(pad(batch["weights"][r]))
  return np.stack(xs), np.stack(ys), np.stack(ws).astype(np.float32)


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("layout", [("mesh.data=8",), ("mesh.data=2", "mesh.model=4")], ids=["dp", "dp_x_tp"])
def test_packed_loss_equals_the_documents_one_at_a_time(positions, layout):
  cfg = experiment("corpus_gpt", f"model.positions={positions}", f"model.max_len={L}", f"model.vocab_size={VOCAB}",
                   "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.num_layers=2", *layout)
  placed = state_lib.place(cfg)
  batch = _packed_batch()
  # real packing: several documents per row, and documents that go on into the next row
  assert (batch["segment_ids"].max(1) > 1).all() and (batch["weights"][:, -1] == 1).any()
  state = jax.tree.map(lambda v: v * 3 if v.dtype == jnp.float32 else v, placed.init())     # sharper than at init
  batch = {k: v for k, v in batch.items() if k != "id"} | {"mask": np.ones(len(batch["x"]), np.float32)}
  with placed.context():
    packed = jax.jit(lambda s, b: tasks.lm(placed.model(s)(b["x"], b["segment_ids"], b["positions"]), b)[1])(
        state, jax.device_put(batch, placed.data_sharding))
    x, y, w = _pieces(batch)
    alone = jax.jit(lambda s, x: placed.model(s)(x))(state, x)
  per_token = optax.softmax_cross_entropy_with_integer_labels(np.asarray(alone, np.float64), y)
  np.testing.assert_allclose(float(packed["loss_sum"]), float((per_token * w).sum()), rtol=1e-5)
  assert float(packed["count"]) == w.sum() == batch["weights"].sum()
