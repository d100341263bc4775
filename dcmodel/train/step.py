"""The pure, jitted steps: (state, batch) -> (state, metric sums). No I/O, no host sync."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dcmodel.mesh import replicated
from dcmodel.train.tasks import PER_EXAMPLE


def compiler_options(cpu_options: dict | None, sharding) -> dict | None:
  """`cpu_options` (a model family's CPU_COMPILER_OPTIONS) if the batch placed by `sharding` is on
  CPU devices, else none."""
  return (cpu_options or None) if sharding.mesh.devices.flat[0].platform == "cpu" else None


# train.nonfinite: a step with a non-finite loss or gradient is skipped (counted), skipped and the run
# stopped, or applied and counted (PyTorch's and Keras's behaviour). The guard that skips it makes
# every update wait for the gradient's global norm: on the recommender's ~35 us step that costs XLA:CPU
# the overlap of the updates with the backward pass (benchmarks.peers_step, 3 rounds: 0.69-0.87 of the bare
# step guarded, 0.84-0.99 unguarded).
NONFINITE = ("skip", "stop", "apply")

# Leaves up to this size go into one concatenated vector for the gradient's norm: one dot
# instead of a square-and-reduce per leaf, which on XLA:CPU cost the small models a kernel each
# (the recommender's step: 0.66 of the bare step with per-leaf reductions, 0.86 with one dot).
# Larger leaves keep their own reduction: concatenating them would copy the gradient.
SMALL_LEAF = 1 << 16


def global_norm(tree, concat: bool = True):
  """The float32 L2 norm over every leaf of `tree` (optax.tree.norm up to rounding): with
  `concat`, the small leaves raveled into one vector and dotted with itself; each other leaf
  reduced on its own. Only unsharded leaves may be concatenated (a sharded one would be gathered)."""
  leaves = [jnp.ravel(g).astype(jnp.float32) for g in jax.tree.leaves(tree)]
  small = [g for g in leaves if concat and g.size <= SMALL_LEAF]
  squares = [jnp.sum(g * g) for g in leaves if not (concat and g.size <= SMALL_LEAF)]
  if small:
    flat = jnp.concatenate(small) if len(small) > 1 else small[0]
    squares.append(jnp.dot(flat, flat, precision=jax.lax.Precision.HIGHEST))
  return jnp.sqrt(sum(squares)) if squares else jnp.float32(0.0)


def _grads(model, task_fn, batch, inputs, accum: int, key=None):
  """(loss, metric sums, grads w.r.t. the Params); with accum > 1, averaged over `accum`
  microbatches taken as rows j, j+accum, ... so each device keeps its own rows (no resharding).
  `key` (dropout) is passed to the model, folded with the microbatch index."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, b, k):
    kw = {} if k is None else {"dropout_key": k}
    loss, sums = task_fn(nnx.merge(graphdef, p, rest)(**{name: b[name] for name in inputs}, **kw), b)
    return loss, {name: v for name, v in sums.items() if name not in PER_EXAMPLE}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  micro_key = lambda j: None if key is None else jax.random.fold_in(key, j)
  if accum == 1:
    (loss, sums), grads = grad_fn(params, batch, key)
    return loss, sums, grads
  micro = jax.tree.map(lambda v: v.reshape(v.shape[0] // accum, accum, *v.shape[1:]).swapaxes(0, 1), batch)

  def body(carry, jb):
    j, b = jb
    (l, s), g = grad_fn(params, b, micro_key(j))
    return jax.tree.map(jnp.add, carry, (l, s, g)), None

  (l0, s0), g0 = grad_fn(params, jax.tree.map(lambda v: v[0], micro), micro_key(0))
  rest_micro = (jnp.arange(1, accum), jax.tree.map(lambda v: v[1:], micro))
  (loss, sums, grads), _ = jax.lax.scan(body, (l0, s0, g0), rest_micro)
  return loss / accum, sums, jax.tree.map(lambda g: g / accum, grads)


def make_train_step(graphdef, task_fn, state_shardings, batch_sharding, inputs=("x",), accum: int = 1, steps: int = 1,
                    dropout_seed: int | None = None, unroll: int = 1, lr_schedule=None, guard: bool = True,
                    grad_norm: bool = True):
  """The jitted step. With steps > 1 it takes `steps` batches stacked on a leading axis and runs
  them in order inside one call (lax.scan, `unroll` steps per loop iteration), returning the
  summed metrics: the same updates as `steps` separate calls, without the per-call host work.
  With a `dropout_seed`, the model gets a dropout key derived from (seed, optimizer step):
  nothing random is stored, so a resumed run draws the same masks, and the masks do not depend
  on the layout. Beside the task's sums, each step adds its gradient's global norm (before any
  clipping) and, given the optimizer's `lr_schedule`, the learning rate it applied: the means
  over a window's applied steps are those sums over its finite steps. Without `guard`, a step with a
  non-finite loss or gradient is applied like any other (and still counted in "nonfinite"); without
  `grad_norm` (only unguarded) the norm is neither computed nor reported, and "nonfinite" counts the
  steps whose loss is NaN/Inf (a non-finite gradient shows in the next step's loss)."""
  if guard and not grad_norm:
    raise ValueError("the non-finite guard tests the gradient's norm: grad_norm=False needs guard=False")
  replicated_state = all(s.is_fully_replicated for s in jax.tree.leaves(state_shardings))

  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    model.train()
    # split: a stream apart from the fold_in(key(seed), i) keys that initialised the parameters
    key = None if dropout_seed is None else jax.random.fold_in(jax.random.split(jax.random.key(dropout_seed))[1], opt.step[...])
    loss, sums, grads = _grads(model, task_fn, batch, inputs, accum, key)

    def update(state):
      model, opt = nnx.merge(graphdef, state)
      opt.update(model, grads)
      return nnx.state((model, opt))

    # A non-finite loss or gradient leaves the state as it was; the loop counts and reports it.
    # The gradient's norm is one reduction over every leaf, reported and tested for finiteness
    # at once (a gradient so large its squared norm overflows counts as non-finite). On a ~170 us
    # step that reduction is ~10% of it (the MLP of benchmarks.peers_step), hence `grad_norm`.
    finite = jnp.isfinite(loss)
    if grad_norm:
      norm = global_norm(grads, concat=replicated_state)
      finite &= jnp.isfinite(norm)
      sums = {**sums, "grad_norm": norm}
    if lr_schedule is not None:
      sums["learning_rate"] = jnp.asarray(lr_schedule(opt.step[...]), jnp.float32)   # what this update applies
    nonfinite = 1.0 - finite.astype(jnp.float32)
    if not guard:
      return update(state), {**sums, "nonfinite": nonfinite}
    # Selected leaf by leaf, not lax.cond: each select fuses into the optimizer's own elementwise
    # update of that leaf. A conditional ran the recommender's step at 0.72 of the unguarded
    # one's speed, against 0.90 here; copy insertion's region analysis (ModelConfig's default
    # CPU_COMPILER_OPTIONS) keeps XLA:CPU from copying the old moments the fused update still reads.
    old = jax.tree.leaves(state)        # before update(): merge shares the state's Variables
    new = jax.tree.leaves(update(state))
    new_state = jax.tree.unflatten(jax.tree.structure(state), [jnp.where(finite, n, o) for n, o in zip(new, old)])
    sums = {k: jnp.where(finite, v, 0.0) for k, v in sums.items()}
    return new_state, {**sums, "nonfinite": nonfinite}

  rep = replicated(batch_sharding.mesh)
  if steps == 1:
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, rep), donate_argnums=0)

  def multi_step(state, batches):
    # The sums add up in the loop's carry as one vector (float32 scalars, as the tasks return):
    # stacked as scan outputs, or carried metric by metric, each metric cost the step a kernel
    # (the recommender's step: 0.80 / 0.74 of the bare step, against 0.88 with one vector).
    shapes = jax.eval_shape(train_step, state, jax.tree.map(lambda v: v[0], batches))[1]
    names = sorted(shapes)
    if any(shapes[k].shape or shapes[k].dtype != jnp.float32 for k in names):
      raise TypeError(f"a step's metric sums must be float32 scalars: {shapes}")

    def body(carry, batch):
      state, totals = carry
      state, sums = train_step(state, batch)
      return (state, totals + jnp.stack([sums[k] for k in names])), None

    (state, totals), _ = jax.lax.scan(body, (state, jnp.zeros(len(names), jnp.float32)), batches, unroll=unroll)
    return state, {k: totals[i] for i, k in enumerate(names)}

  return jax.jit(multi_step, in_shardings=(state_shardings, stacked(batch_sharding)),
                 out_shardings=(state_shardings, rep), donate_argnums=0)


def on_leaves(step, state_shardings, batch_sharding, cpu_options: dict | None = None):
  """`step` over the state's leaves, a list of arrays, in the same shardings, adding its metric
  sums into running totals on the device: (leaves, totals, batch) -> (leaves, totals).

  jit flattens a list in C++ but an nnx.State's Variables in Python (~140 us per call for a
  21-leaf state here), and fetching every step's sums cost ~110 us per step; the recommender MLP
  at one step per call ran 58k examples/s with both. `zero_totals` starts a window. `cpu_options`:
  XLA compiler options for this program on CPU (the model family's CPU_COMPILER_OPTIONS)."""
  treedef = jax.tree.structure(state_shardings)
  def leaf_step(leaves, totals, batch):
    state, sums = step(jax.tree.unflatten(treedef, leaves), batch)
    return jax.tree.leaves(state), jax.tree.map(jnp.add, totals, sums)
  leaf_shardings, rep = jax.tree.leaves(state_shardings), replicated(batch_sharding.mesh)
  # the loop's program: compiler options go on this top-level jit (jax refuses them on a nested one)
  return jax.jit(leaf_step, in_shardings=(leaf_shardings, rep, batch_sharding),
                 out_shardings=(leaf_shardings, rep), donate_argnums=0,
                 compiler_options=compiler_options(cpu_options, batch_sharding))


def zero_totals(step, state, batch):
  """A function returning zeros shaped like `step`'s metric sums, as global (replicated) arrays."""
  shapes = jax.eval_shape(step, state, batch)[1]
  rep = replicated(jax.tree.leaves(state)[0].sharding.mesh)
  return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), out_shardings=rep)


def stacked(batch_sharding):
  """The sharding of `steps` batches stacked on a new leading axis (kept whole)."""
  return jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))


def make_eval_step(graphdef, task_fn, state_shardings, batch_sharding, inputs=("x",)):
  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return task_fn(model(**{k: batch[k] for k in inputs}), batch)[1]

  rep = replicated(batch_sharding.mesh)
  return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=rep)
