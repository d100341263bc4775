"""Losses and metrics per task. Metrics are masked sums, so padded eval batches count exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcmodel.errors import UserError
from dcmodel.models.layers import argmax


def _masked(per_example, correct, mask):
  """(mean loss over real examples, masked sums) for per-example losses and hits."""
  count = jnp.sum(mask)
  loss_sum = jnp.sum(per_example * mask)
  return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": jnp.sum(correct * mask), "count": count}


def classification_rows(logits, batch):
  """Per-example loss, predicted class, its probability and all class probabilities."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, -1)
  pred = argmax(logits)
  return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), "pred": pred,
          "score": jnp.max(probs, -1), "probs": probs}


def classification(logits, batch):
  rows = classification_rows(logits, batch)
  return _masked(rows["loss"], (rows["pred"] == batch["y"]).astype(jnp.float32), batch["mask"])


def binary_rows(logits, batch):
  """Per-example loss, predicted class (logit > 0) and score (the predicted probability of 1)."""
  logits = logits.reshape(logits.shape[0]).astype(jnp.float32)
  return {"loss": optax.sigmoid_binary_cross_entropy(logits, batch["y"].astype(jnp.float32)),
          "pred": (logits > 0).astype(jnp.int32), "score": jax.nn.sigmoid(logits), "logit": logits}


def binary(logits, batch):
  rows = binary_rows(logits, batch)
  y = batch["y"].astype(jnp.float32)
  loss, sums = _masked(rows["loss"], (rows["pred"] == batch["y"]).astype(jnp.float32), batch["mask"])
  return loss, {**sums, "scores": rows["logit"], "labels": y, "weights": batch["mask"]}  # for AUC at eval


def lm(logits, batch):
  """Next-token prediction over packed rows: losses per target token (nats), weighted by
  `weights` (0 across a document boundary and on padding); `bytes` sums the UTF-8 bytes of the
  weighted targets, so bits per byte = nats / ln 2 / bytes for any tokenizer."""
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"].astype(jnp.int32))
  weights = batch["weights"] * batch["mask"][:, None]
  correct = (argmax(logits) == batch["y"]).astype(jnp.float32)
  loss, sums = _masked(per_token, correct, weights)
  return loss, {**sums, "bytes": jnp.sum(batch["target_bytes"] * weights), "rows": jnp.sum(batch["mask"])}


PER_EXAMPLE = ("scores", "labels", "weights")   # eval outputs kept per example, not summed
TASKS = {"classification": classification, "binary": binary, "lm": lm}
ROWS = {"classification": classification_rows, "binary": binary_rows}   # per-example outputs, for predict


def get(name: str):
  if name not in TASKS:
    raise UserError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASKS))}")
  return TASKS[name]


def summarize(sums: dict, task: str | None = None) -> dict[str, float]:
  """Masked sums (host floats) -> the reported means (per example, or per token for lm)."""
  count = max(float(sums["count"]), 1.0)
  out = {"loss": float(sums["loss_sum"]) / count}
  if "correct" in sums:
    out["accuracy"] = float(sums["correct"]) / count
  if task == "lm":   # loss per target token; bits per byte of the text those targets are
    out["bits_per_byte"] = float(sums["loss_sum"]) / float(np.log(2)) / max(float(sums["bytes"]), 1.0)
    out["tokens"], out["bytes"], out["examples"] = int(sums["count"]), int(sums["bytes"]), int(sums["rows"])
  else:
    out["examples"] = int(sums["count"])
  return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
  from sklearn.metrics import roc_auc_score
  return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")
