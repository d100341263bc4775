"""The pure, jitted steps: (state, batch) -> (state, metric sums). No I/O, no host sync."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dcmodel.mesh import replicated
from dcmodel.train.tasks import PER_EXAMPLE


def make_train_step(graphdef, task_fn, state_shardings, batch_sharding, inputs=("x",)):
  def train_step(state, batch):
    old_leaves = jax.tree.leaves(state)  # before merge: the update mutates the merged Variables
    model, opt = nnx.merge(graphdef, state)
    model.train()

    def loss_fn(m):
      return task_fn(m(*[batch[k] for k in inputs]), batch)

    (loss, sums), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    # A non-finite loss or gradient leaves the state as it was; the loop counts and reports it.
    finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_leaves, treedef = jax.tree.flatten(nnx.state((model, opt)))
    new_state = jax.tree.unflatten(treedef, [jnp.where(finite, n, o) for n, o in zip(new_leaves, old_leaves)])
    sums = {k: jnp.where(finite, v, 0.0) for k, v in sums.items() if k not in PER_EXAMPLE}
    return new_state, {**sums, "nonfinite": 1.0 - finite.astype(jnp.float32)}

  rep = replicated(batch_sharding.mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, rep), donate_argnums=0)


def make_eval_step(graphdef, task_fn, state_shardings, batch_sharding, inputs=("x",)):
  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return task_fn(model(*[batch[k] for k in inputs]), batch)[1]

  rep = replicated(batch_sharding.mesh)
  return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=rep)
