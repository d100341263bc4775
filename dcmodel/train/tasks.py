"""Losses and metrics per task. Metrics are masked sums, so padded eval batches count exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dcmodel.errors import UserError


def classification(logits, batch):
  mask = batch["mask"]
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["y"])
  correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
  count = jnp.sum(mask)
  loss = jnp.sum(per_example * mask) / jnp.maximum(count, 1.0)
  return loss, {"loss_sum": jnp.sum(per_example * mask), "correct": jnp.sum(correct * mask), "count": count}


def binary(logits, batch):
  mask = batch["mask"]
  logits = logits.reshape(logits.shape[0]).astype(jnp.float32)
  y = batch["y"].astype(jnp.float32)
  per_example = optax.sigmoid_binary_cross_entropy(logits, y)
  correct = ((logits > 0).astype(jnp.float32) == y).astype(jnp.float32)
  count = jnp.sum(mask)
  loss = jnp.sum(per_example * mask) / jnp.maximum(count, 1.0)
  return loss, {"loss_sum": jnp.sum(per_example * mask), "correct": jnp.sum(correct * mask), "count": count}


TASKS = {"classification": classification, "binary": binary}


def get(name: str):
  if name not in TASKS:
    raise UserError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASKS))}")
  return TASKS[name]


def summarize(sums: dict) -> dict[str, float]:
  """Masked sums (host floats) -> the reported means."""
  count = max(float(sums["count"]), 1.0)
  out = {"loss": float(sums["loss_sum"]) / count}
  if "correct" in sums:
    out["accuracy"] = float(sums["correct"]) / count
  out["examples"] = int(sums["count"])
  return out
