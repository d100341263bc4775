"""Where dcmodel's train loop loses against the bare step (benchmarks/peers.py's `run_xla`), step
by step: the documents' models at batch 32 on one CPU device, every contender over the same
device-resident stacked batches, as many steps per call as peers runs dcmodel, interleaved in one
process (rounds alternate the order).

- bare: peers.run_xla's step (jax.jit + optax.adam, lax.scan over the call's steps);
- step: dcmodel's jitted call as the loop runs it (setup's `train_step`: the leaf-list step with
  the non-finite guard, the task's metric sums, grad norm and learning rate, totals on device;
  with --tuned, as peers' dcmodel-tuned row runs it: unguarded, no grad norm);
- host: the same call given the host's numpy batches (as the loop gives them: placed on dispatch);
- loop: the loop's per-call work: the next stacked batch from the Grain iterator, then the call;
- --variants name=guard:norm:sums[:xla_option=value+...]: the step rebuilt with other forms of
  its non-finite guard (cond: lax.cond, the form before; where: leaf-by-leaf select; none), of the
  gradient norm (optax: per-leaf reductions; concat; dot: one dot of the concatenated leaves;
  vdot: one per leaf; none) and of the metric sums (stack: scan outputs; vector: one stacked
  output; carry: one vector in the loop's carry), e.g. old=cond:optax:stack.

Prints examples/s per contender and round, and each one's share of the bare step; --hlo DIR
writes every contender's optimized HLO. Run: python -m benchmarks.peers_step [--models mlp,rec]
[--rounds 3] [--variants old=cond:optax:stack]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dcmodel import hostenv  # noqa: E402
from dcmodel.data import pipeline  # noqa: E402

from benchmarks.peers import BATCH, DISPATCH, MODELS, ROOT, bare_program, overrides  # noqa: E402


def dcmodel_call(model: str, calls: int, work: str, tuned: bool = False):
  """(call, carry, batches): setup's jitted leaf step over `calls` device-resident stacked batches
  (`tuned`: as peers' dcmodel-tuned row configures it)."""
  from dcmodel import experiment
  from dcmodel.train.setup import setup
  cfg = experiment.load(ROOT / "experiments" / f"{MODELS[model][0]}.py", overrides(model, 10 ** 6, 10 ** 6, tuned))
  run = setup(cfg, work, jax.devices()[:1])
  hosts = [next(run.iterator) for _ in range(calls)]
  run.writer.close()
  if run.lock is not None:
    run.lock.release()
  with run.placed.context():
    batches = [jax.device_put(pipeline.step_inputs(h, run.call_sharding, run.dataset.device_keys), run.call_sharding)
               for h in hosts]
    run.step_once(batches[0])
  step = run.train_step
  return (lambda carry, b: step(*carry, b)), (run.leaves, run.totals), batches, run, hosts


def bare_call(model: str, hosts: list[dict]):
  """peers.run_xla's step (same model, optax.adam, scan over the call's steps) on the same batches."""
  layers, tx, _, step = bare_program(model)
  call = jax.jit(lambda carry, xy: jax.lax.scan(step, carry, xy)[0], donate_argnums=0)
  batches = [jax.device_put((h["x"].reshape(h["x"].shape[0], BATCH, -1), h["y"])) for h in hosts]
  return call, (layers, tx.init(layers)), batches


def timed(call, carry, batches, calls: int):
  for b in batches[:2]:                      # warm (compiled already)
    carry = call(carry, b)
  jax.block_until_ready(carry)
  t = time.perf_counter()
  for i in range(calls):
    carry = call(carry, batches[i % len(batches)])
  jax.block_until_ready(carry)
  return time.perf_counter() - t, carry


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="mlp,cnn,rec")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--seconds", type=float, default=3.0, help="per contender and round (about)")
  p.add_argument("--variants", default="", help="probe: name=guard:norm:sums,... (see variant())")
  p.add_argument("--hlo", default=None, help="write the steps' optimized HLO into this directory")
  p.add_argument("--tuned", action="store_true", help="dcmodel's step as peers' dcmodel-tuned row configures it")
  args = p.parse_args(argv)
  for model in args.models.split(","):
    per_call = DISPATCH[model][0]
    with tempfile.TemporaryDirectory() as work:
      dc, dc_carry, dc_batches, run, hosts = dcmodel_call(model, 8, work, args.tuned)
      bare, bare_carry, bare_batches = bare_call(model, hosts)
      bare_carry = bare(bare_carry, bare_batches[0])
      host_batches = [pipeline.step_inputs(h, run.call_sharding, run.dataset.device_keys) for h in hosts]
      fetch = lambda carry, _: dc(carry, pipeline.step_inputs(next(run.iterator), run.call_sharding, run.dataset.device_keys))
      copy = lambda: (jax.tree.map(jnp.copy, run.leaves), run.zero_totals())
      contenders = {"bare": (bare, bare_carry, bare_batches), "step": (dc, dc_carry, dc_batches),
                    "host": (dc, copy(), host_batches), "loop": (fetch, copy(), host_batches)}
      jitted = {"bare": bare, "step": run.train_step}
      with run.placed.context():
        for spec in filter(None, args.variants.split(",")):
          name, knobs = spec.split("=", 1)
          f, zeros = variant(run, dc_batches[0], *knobs.split(":"))
          carry = (jax.tree.map(jnp.copy, run.leaves), zeros)
          contenders[name] = ((lambda f: lambda c, b: f(*c, b))(f), carry, dc_batches)
          jitted[name] = f
        if args.hlo:
          out = Path(args.hlo)
          out.mkdir(parents=True, exist_ok=True)
          for name, (call, carry, batches) in contenders.items():
            if name not in jitted:
              continue
            args_ = (carry, batches[0]) if name == "bare" else (*carry, batches[0])
            (out / f"{model}_{name}.hlo.txt").write_text(jitted[name].lower(*args_).compile().as_text())
      carries = {k: v[1] for k, v in contenders.items()}
      with run.placed.context():
        for name, (call, _, batches) in contenders.items():   # compile all
          carries[name] = call(carries[name], batches[0])
      s, carries["bare"] = timed(bare, carries["bare"], bare_batches, 20)
      calls = max(20, int(args.seconds / (s / 20)))
      rates = {k: [] for k in contenders}
      names = list(contenders)
      for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
          call, _, batches = contenders[name]
          with run.placed.context():
            s, carries[name] = timed(call, carries[name], batches, calls)
          rates[name].append(calls * per_call * BATCH / s)
      print(f"{model}: bare {statistics.median(rates['bare']):9.0f} ex/s {[round(x) for x in rates['bare']]}", flush=True)
      for name in names[1:]:
        ratios = [d / b for d, b in zip(rates[name], rates["bare"])]
        print(f"  {name:10s} {statistics.median(rates[name]):9.0f} ex/s; of bare per round {[round(x, 3) for x in ratios]} "
              f"(median {statistics.median(ratios):.3f})", flush=True)
  return 0




# ---------------------------------------------------------------- variants of dcmodel's step (probe)
def variant(run, batch, guard="cond", norm="optax", sums_mode="stack", opts=""):
  """setup's leaf step rebuilt with one knob changed: guard cond|where|none, norm optax|concat|none,
  sums_mode stack (a stacked scan output per metric) | vector (one vector per step) | carry.
  Returns the leaf step and its zero totals (`batch`: one stacked batch, for their shapes)."""
  from flax import nnx
  from dcmodel.train import optimizer, tasks
  from dcmodel.train.step import _grads, on_leaves, zero_totals
  from dcmodel.mesh import replicated
  cfg, placed = run.cfg, run.placed
  graphdef, task_fn, inputs = placed.graphdef, tasks.get(cfg.model.task), cfg.model.batch_spec().inputs
  lr_schedule = optimizer.schedule(cfg.optimizer, cfg.train.steps)

  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    model.train()
    loss, sums, grads = _grads(model, task_fn, batch, inputs, 1, None)
    old = jax.tree.leaves(state)

    def update(state):
      model, opt = nnx.merge(graphdef, state)
      opt.update(model, grads)
      return nnx.state((model, opt))

    def update2(state, grads):
      model, opt = nnx.merge(graphdef, state)
      opt.update(model, grads)
      return nnx.state((model, opt))

    if norm == "optax":
      grad_norm = optax.tree.norm(grads)
    elif norm == "concat":
      grad_norm = jnp.sqrt(jnp.sum(jnp.concatenate([jnp.ravel(g) ** 2 for g in jax.tree.leaves(grads)])))
    elif norm == "dot":
      flat = jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grads)])
      grad_norm = jnp.sqrt(jnp.dot(flat, flat))
    elif norm == "vdot":
      grad_norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
    else:
      grad_norm = jnp.float32(0)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    sums = {**sums, "grad_norm": grad_norm}
    sums["learning_rate"] = jnp.asarray(lr_schedule(opt.step[...]), jnp.float32)
    if guard == "cond":
      new_state = jax.lax.cond(finite, update, lambda state: state, state)
    elif guard == "barrier":
      treedef = jax.tree.structure(state)
      n_model = len(jax.tree.leaves(state[0]))
      new = jax.tree.leaves(update(state))
      params = [jnp.where(finite, n, o) for n, o in zip(new[:n_model], old[:n_model])]
      # the optimizer's state after every parameter is written: recomputed from the old state behind
      # a barrier, so XLA neither keeps the old moments alive (copies) nor orders their writes first
      params, rest, g = jax.lax.optimization_barrier((params, old[n_model:], grads))
      grads_b = g
      again = jax.tree.leaves(update2(jax.tree.unflatten(treedef, old[:n_model] + rest), grads_b))
      new_state = jax.tree.unflatten(treedef, params + [jnp.where(finite, n, o) for n, o in zip(again[n_model:], rest)])
    else:
      new_state = update(state)
      if guard == "where":
        treedef = jax.tree.structure(new_state)
        new_state = jax.tree.unflatten(treedef, [jnp.where(finite, n, o) for n, o in zip(jax.tree.leaves(new_state), old)])
    sums = {k: jnp.where(finite, v, 0.0) for k, v in sums.items()}
    return new_state, {**sums, "nonfinite": 1.0 - finite.astype(jnp.float32)}

  unroll = cfg.train.dispatch_unroll

  def multi_step(state, batches):
    if sums_mode == "stack":
      state, sums = jax.lax.scan(train_step, state, batches, unroll=unroll)
      return state, jax.tree.map(lambda v: jnp.sum(v, 0), sums)
    names = list(jax.eval_shape(train_step, state, jax.tree.map(lambda v: v[0], batches))[1])
    if sums_mode == "vector":
      def body(s, b):
        s, sums = train_step(s, b)
        return s, jnp.stack([sums[k] for k in names])
      state, vec = jax.lax.scan(body, state, batches, unroll=unroll)
      vec = jnp.sum(vec, 0)
    else:
      def body(carry, b):
        s, acc = carry
        s, sums = train_step(s, b)
        return (s, acc + jnp.stack([sums[k] for k in names])), None
      (state, vec), _ = jax.lax.scan(body, (state, jnp.zeros(len(names))), batches, unroll=unroll)
    return state, {k: vec[i] for i, k in enumerate(names)}

  rep = replicated(run.call_sharding.mesh)
  step = jax.jit(multi_step, in_shardings=(placed.shardings, run.call_sharding), out_shardings=(placed.shardings, rep),
                 donate_argnums=0)
  extra = {k: {"true": True, "false": False}.get(v, v) for k, v in (kv.split("=") for kv in opts.split("+") if kv)}
  zeros = zero_totals(step, run.state(), batch)()
  return on_leaves(step, placed.shardings, run.call_sharding, {**cfg.model.cpu_compiler_options(len(run.call_sharding.addressable_devices)), **extra}), zeros


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
