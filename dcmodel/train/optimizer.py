"""The Optax optimizer and learning-rate schedule named by the config."""

from __future__ import annotations

import optax

from dcmodel.config import OptimizerConfig
from dcmodel.errors import UserError


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  lr, warm = cfg.learning_rate, cfg.warmup_steps
  end = lr * cfg.min_learning_rate_ratio
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr) if not warm else optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
  if cfg.schedule in ("cosine", "warmup_cosine"):
    return optax.warmup_cosine_decay_schedule(0.0 if warm else lr, lr, warm, max(total_steps, warm + 1), end)
  if cfg.schedule == "linear":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)),
                                 optax.linear_schedule(lr, end, max(total_steps - warm, 1))], [max(warm, 1)])
  raise UserError(f"optimizer.schedule '{cfg.schedule}' is unknown; expected constant, cosine, warmup_cosine or linear")


def build(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(cfg, total_steps)
  if cfg.name == "adamw":
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  elif cfg.name == "adam":
    tx = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  elif cfg.name == "sgd":
    tx = optax.sgd(lr, momentum=cfg.momentum or None)
  elif cfg.name == "lion":
    tx = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  else:
    raise UserError(f"optimizer.name '{cfg.name}' is unknown; expected adamw, adam, sgd or lion")
  if cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx
