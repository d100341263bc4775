"""Evaluation over a split, and the bound on how far the host runs ahead of the devices."""

from __future__ import annotations

import jax
import numpy as np

from dcmodel.data import pipeline
from dcmodel.train import tasks

# Dispatched calls the host may run ahead of the devices. Unbounded, the queue of small steps
# grows deep between metric reads, and XLA:CPU aborts the process when a collective's
# rendezvous waits 40 s for a device thread busy with later work (seen with
# train.log_every=1000 on digits_mlp over 8 simulated devices). A few calls ahead keeps the
# devices fed; more buys nothing.
MAX_IN_FLIGHT = 4


def bound_in_flight(outputs: list, keep: bool = True) -> None:
  """Call after appending a dispatched call's output: waits for the one MAX_IN_FLIGHT back. Without
  `keep`, the outputs waited for leave the list (a long run would otherwise hold every call's)."""
  if len(outputs) > MAX_IN_FLIGHT:
    jax.block_until_ready(outputs[-MAX_IN_FLIGHT - 1])
    if not keep:
      del outputs[:-MAX_IN_FLIGHT]


def evaluate(eval_step, state, dataset, split: str, global_batch_size: int, sharding, task: str) -> dict:
  """The task's metrics over one pass of `split` (its last batch padded and masked)."""
  ds = dataset.eval_batches(split, global_batch_size)
  outs = []
  for i in range(len(ds)):
    outs.append(eval_step(state, pipeline.step_inputs(ds[i], sharding, dataset.device_keys)))
    bound_in_flight(outs)
  outs = jax.device_get(outs)
  total = {k: float(np.sum([o[k] for o in outs])) for k in outs[0] if k not in tasks.PER_EXAMPLE}
  metrics = tasks.summarize(total, task)
  if "scores" in outs[0]:  # per-example outputs are replicated, so every process sees the whole split
    scores, labels, weights = (np.concatenate([np.ravel(o[k]) for o in outs]) for k in tasks.PER_EXAMPLE)
    metrics["auc"] = tasks.auc(scores[weights > 0], labels[weights > 0])
  return metrics
