"""The pure, jitted steps: (state, batch) -> (state, metric sums). No I/O, no host sync."""

from __future__ import annotations

import jax
from flax import nnx

from dcmodel.mesh import replicated


def make_train_step(graphdef, task_fn, state_shardings, batch_sharding):
  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    model.train()

    def loss_fn(m):
      return task_fn(m(batch["x"]), batch)

    (_, sums), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), sums

  rep = replicated(batch_sharding.mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, rep), donate_argnums=0)


def make_eval_step(graphdef, task_fn, state_shardings, batch_sharding):
  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return task_fn(model(batch["x"]), batch)[1]

  rep = replicated(batch_sharding.mesh)
  return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=rep)
