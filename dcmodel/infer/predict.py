"""Batch inference over a split: the trained model, sharded like training, fed by the same
Grain eval pipeline, its per-example outputs written batch by batch to a results store.

A rerun of the same command continues after the last committed row; the summary it returns
(mean loss, accuracy, AUC for binary tasks) is computed from the stored rows, so it equals the
training run's evaluation of the same checkpoint.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from dcmodel import config as config_lib
from dcmodel import resources
from dcmodel.config import Config
from dcmodel.data import pipeline
from dcmodel.data.dataset import Dataset
from dcmodel.errors import UserError
from dcmodel.infer import results as results_lib
from dcmodel.infer.load import load
from dcmodel.mesh import check_batch, replicated
from dcmodel.train import tasks


def make_predict_step(graphdef, task: str, state_shardings, data_sharding, inputs):
  rows_fn = tasks.ROWS[task]

  def predict_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return {"label": batch["y"].astype(jnp.int32), **rows_fn(model(**{k: batch[k] for k in inputs}), batch)}

  return jax.jit(predict_step, in_shardings=(state_shardings, data_sharding), out_shardings=replicated(data_sharding.mesh))


def predict(cfg: Config, workdir, out: str, split: str = "test", step: int | None = None, batch_size: int | None = None,
            progress: bool = True, after_batch=None, devices=None) -> dict:
  """Write `split`'s per-example outputs to `out`; return a summary with the metrics."""
  if cfg.model.task not in tasks.ROWS:
    raise UserError(f"predict serves classifiers and the recommender; {cfg.model.name} is a '{cfg.model.task}' model "
                    f"(for gpt use dcmodel generate)")
  results_lib.check_out(out)
  spec = cfg.model.batch_spec()
  batch = batch_size or cfg.data.eval_batch_size
  resources.check_count("--batch-size", batch, 1)
  example_bytes = sum(math.prod(f.shape) * np.dtype(f.dtype).itemsize for f in spec.fields.values())
  resources.check_host_memory(3 * batch * example_bytes, f"--batch-size {batch} (a batch read, on the devices and "
                              f"its outputs)", "use a smaller --batch-size")
  dataset = Dataset.load(cfg.data, spec)        # cleaning and the normalizer fitted on train, as in training
  batches = dataset.eval_batches(split, batch)
  n = len(dataset.splits[split])
  if n == 0:
    raise UserError(f"split '{split}' is empty after cleaning")
  trained = load(cfg, workdir, step, devices)
  check_batch(batch, trained.placed.mesh, "--batch-size")
  data_sharding = trained.placed.data_sharding
  with trained.placed.context():
    step_fn = make_predict_step(trained.placed.graphdef, cfg.model.task, trained.placed.shardings, data_sharding, spec.inputs)
    shapes = jax.eval_shape(step_fn, trained.state, {k: jax.ShapeDtypeStruct((batch, *v.shape[1:]), v.dtype, sharding=data_sharding)
                                                     for k, v in batches[0].items() if k in dataset.device_keys})
  columns = {"id": ("int64", ()),
             **{k: (v.dtype.name, tuple(v.shape[1:])) for k, v in shapes.items() if k != "logit"}}
  meta = {"experiment": cfg.name, "model": cfg.model.name, "config_hash": config_lib.config_hash(cfg),
          "task": cfg.model.task, "checkpoint_step": trained.step, "split": split, "workdir": str(workdir)}
  writer = results_lib.ResultsWriter(out, n, batch, columns, meta) if jax.process_index() == 0 else None
  first = (writer.done if writer else 0) // batch
  if jax.process_count() > 1:  # every process must agree where to start
    first = int(multihost_utils.broadcast_one_to_all(np.int64(first)))

  t0 = time.perf_counter()
  bar = tqdm(total=len(batches), initial=first, desc=f"predict {split}", unit="batch",
             disable=not progress or jax.process_index() != 0)
  with trained.placed.context():
    for i in range(first, len(batches)):
      host = batches[i]
      rows = jax.device_get(step_fn(trained.state, pipeline.to_device(host, data_sharding, dataset.device_keys)))
      if writer:
        writer.write(i * batch, {"id": np.arange(i * batch, (i + 1) * batch), **{k: v for k, v in rows.items() if k in columns}})
      bar.update(1)
      if after_batch:
        after_batch(i)
  bar.close()
  wall = time.perf_counter() - t0
  return {**summarize(out), "new_batches": len(batches) - first, "wall_s": wall, "checkpoint_step": trained.step}


def summarize(path: str) -> dict:
  """Metrics over the committed rows of a results store."""
  res = results_lib.Results(path)
  got = res.read(slice(0, res.rows_done), ["label", "pred", "loss", "score"])
  out = {"rows": res.rows_done, "of": res.meta["rows"], "loss": float(np.mean(got["loss"])) if res.rows_done else float("nan"),
         "accuracy": float(np.mean(got["pred"] == got["label"])) if res.rows_done else float("nan")}
  if res.meta["task"] == "binary":
    out["auc"] = tasks.auc(got["score"], got["label"])
  return out
