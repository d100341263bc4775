"""`dcmodel import-hf` and `dcmodel export-hf`: a Hugging Face model directory to a dcmodel
workdir (config.json, tokenizer, a step-0 checkpoint) and back.

Import checks everything that can be checked from headers (architecture, config fields gpt
cannot express, every tensor's name, dtype and shape, the tokenizer's vocabulary) before
reading a weight; reads each tensor once, maps it through the family's table and places each
device's slice straight into the sharded parameter (`make_array_from_callback`), so the host
holds the model plus about one tensor; and writes the workdir only once every weight is in.

The step-0 checkpoint holds the model alone: Hugging Face checkpoints carry no optimizer state,
and a fresh one (zero moments, step 0) is what `train` creates when it resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from dcmodel import config as config_lib
from dcmodel import experiment as experiment_lib
from dcmodel import models
from dcmodel.checkpoint import Checkpointer, check_disk_space, state_bytes
from dcmodel.config import CheckpointConfig, Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from dcmodel.data import tokenizers
from dcmodel.errors import UserError
from dcmodel.interop import files, gpt2, llama
from dcmodel.train import state as state_lib

FAMILIES = {gpt2.ARCHITECTURE: gpt2, llama.ARCHITECTURE: llama}
TOKENIZERS = ("tokenizer.json", "tokenizer.model")        # Hugging Face tokenizers, SentencePiece
CARRIED = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")   # kept for export
HF_CONFIG = "hf_config.json"     # the source's config.json, kept in the workdir: export starts from it


@dataclasses.dataclass
class Imported:
  cfg: Config
  workdir: Path
  params: int
  bytes_read: int          # safetensors bytes of the weights read
  mesh: dict               # the mesh the weights were placed on (axis sizes > 1)
  times: dict              # time.perf_counter() when each phase ended: checked, loaded, saved

  @property
  def read_s(self) -> float:
    """Reading every tensor and placing it on the devices (blocked on)."""
    return self.times["loaded"] - self.times["checked"]

  @property
  def save_s(self) -> float:
    """Writing the step-0 checkpoint and reading it back to verify it."""
    return self.times["saved"] - self.times["loaded"]


def family_of(hf_config: dict, where: Path):
  archs = hf_config.get("architectures") or []
  for arch in archs:
    if arch in FAMILIES:
      return FAMILIES[arch]
  raise UserError(f"{where / 'config.json'}: architecture {', '.join(archs) or '(none named)'} is not supported; "
                  f"import-hf reads {' and '.join(FAMILIES)}")


def family_for(model) -> object:
  """The Hugging Face family a gpt config is (for export)."""
  reasons = {}
  for arch, family in FAMILIES.items():
    reasons[arch] = family.mismatch(model)
    if reasons[arch] is None:
      return family
  raise UserError("the model is neither a GPT-2 nor a Llama shape, so no Hugging Face class holds it: "
                  + "; ".join(f"{arch} needs another {why}" for arch, why in reasons.items()))


def default_experiment(name: str, model, tokenizer: str) -> Config:
  """A fine-tuning experiment around imported weights (every field can be --set): FSDP over
  all devices (each holds 1/N of the weights, as MaxText's default), AdamW at a fine-tuning rate."""
  return Config(
      name=name, model=model,
      data=DataConfig(source="corpus", tokenizer=tokenizer, global_batch_size=8, eval_batch_size=8, test_fraction=0.02),
      mesh=MeshConfig(data=1, fsdp=-1),
      optimizer=OptimizerConfig(name="adamw", learning_rate=3e-5, grad_clip_norm=1.0),
      train=TrainConfig(steps=1000, log_every=50, eval_every=0),
      checkpoint=CheckpointConfig(every_steps=500))


def _tokenizer_source(hf_dir: Path, overrides: list[str]) -> str:
  if any(o.partition("=")[0].strip() == "data.tokenizer" for o in overrides):
    return "bytes"      # replaced by the override
  for name in TOKENIZERS:
    if (hf_dir / name).is_file():
      return str(hf_dir / name)
  raise UserError(f"{hf_dir} has no {' or '.join(TOKENIZERS)}; name the model's tokenizer with "
                  f"--set data.tokenizer=FILE (or bytes)")


def _match_tensors(hf: files.HFDirectory, family, rows, tied: bool) -> dict[str, str]:
  """Table name -> name in the files, after checking that the files hold exactly the table's
  tensors, each a float of the shape the config implies."""
  found = {}
  for name in hf.tensors:
    canon = family.canonical(name)
    if not family.IGNORED.search(canon) and not (tied and canon == "lm_head.weight"):   # a tied head is the embedding
      found[canon] = name
  want = {r.hf: r for r in rows}
  missing = [n for n in want if n not in found]
  if missing:
    raise UserError(f"{hf.path}: {len(missing)} tensor(s) that config.json implies are missing from the weights, "
                    f"e.g. {missing[0]} of shape {want[missing[0]].hf_shape}")
  extra = [n for n in found if n not in want]
  if extra:
    raise UserError(f"{hf.path}: tensor {found[extra[0]]} ({len(extra)} in all) has no place in the model config.json "
                    f"describes; is config.json the one these weights were saved with?")
  for r in rows:
    e = hf.tensors[found[r.hf]]
    if e.dtype not in files.FLOAT_DTYPES:
      raise UserError(f"{e.file.name}: tensor {found[r.hf]} has dtype {e.dtype}; weights must be floating point "
                      f"({', '.join(files.FLOAT_DTYPES)})")
    if e.shape != r.hf_shape:
      raise UserError(f"{e.file.name}: tensor {found[r.hf]} has shape {e.shape}, but the model config implies {r.hf_shape}")
  return {r.hf: found[r.hf] for r in rows}


def _name(path) -> str:
  """A parameter's dotted path in the model state (trunk.blocks.0.attn.wq)."""
  return ".".join(str(k.key if hasattr(k, "key") else k.idx) for k in path if not isinstance(k, jax.tree_util.GetAttrKey))


def _flat(tree) -> dict:
  return {_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_table(rows, target) -> None:
  """The table names every parameter of the model once (a family table out of step with the model is a bug)."""
  covered = [n for r in rows for n in r.ours]
  if sorted(covered) != sorted(_flat(target)):
    raise RuntimeError(f"mapping table and model disagree: {sorted(set(covered) ^ set(_flat(target)))[:5]}")


def load_params(src: Source, placed: state_lib.Placed):
  """The model's state, read tensor by tensor into its shardings on `placed`'s mesh."""
  target = _flat(placed.model_target)
  arrays = {}
  for row in src.rows:
    parts = row.to_ours(src.hf.read(src.names[row.hf]))
    for name, part in zip(row.ours, parts):
      t = target[name]
      assert part.shape == t.shape, (row.hf, name, part.shape, t.shape)
      arrays[name] = jax.make_array_from_callback(t.shape, t.sharding, lambda index, part=part: part[index])
    del parts
  return jax.tree_util.tree_map_with_path(lambda p, _: arrays[_name(p)], placed.model_target)


def in_flight_bytes(target) -> int:
  """What the checkpoint I/O may hold at once: twice the largest array, at least 256 MiB (fast
  for small models; for a large one, a few tensors instead of a second copy of the model)."""
  return max(2 * max(x.size * x.dtype.itemsize for x in jax.tree.leaves(target)) + 1, 256 * 2**20)


def _check_new_workdir(workdir: Path) -> None:
  if (workdir / "config.json").exists() or (workdir / "checkpoints").exists():
    raise UserError(f"workdir {workdir} already holds a run; import into a new --workdir (nothing is overwritten)")
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"workdir {workdir} is a file; pick a directory")


@dataclasses.dataclass
class Source:
  """A Hugging Face directory checked against the experiment it becomes (nothing read yet)."""
  hf: files.HFDirectory
  cfg: Config
  rows: list            # the family's mapping table for this config
  names: dict           # table name -> tensor name in the files
  tokenizer: object


def read_source(hf_dir: str | Path, overrides: list[str] = ()) -> Source:
  """Everything checkable from config.json, the safetensors headers and the tokenizer."""
  hf_dir, overrides = Path(hf_dir), list(overrides)
  hf = files.HFDirectory.open(hf_dir)
  family = family_of(hf.config, hf_dir)
  model = models.get_config("gpt", **family.gpt_fields(hf.config))
  cfg = config_lib.apply_overrides(default_experiment(hf_dir.resolve().name, model, _tokenizer_source(hf_dir, overrides)),
                                   overrides)
  rows = family.table(cfg.model)
  names = _match_tensors(hf, family, rows, cfg.model.tie_embeddings)
  tok = tokenizers.load(cfg.data.tokenizer)
  if tok.vocab_size > cfg.model.vocab_size:
    raise UserError(f"tokenizer {cfg.data.tokenizer} has {tok.vocab_size} tokens, more than the model's vocab_size "
                    f"{cfg.model.vocab_size}: ids past the embedding would have no row")
  return Source(hf, cfg, rows, names, tok)


def import_hf(hf_dir: str | Path, workdir: str | Path, overrides: list[str] = (), devices=None) -> Imported:
  hf_dir, workdir = Path(hf_dir), Path(workdir)
  src = read_source(hf_dir, overrides)
  hf, cfg, rows, names, tok = src.hf, src.cfg, src.rows, src.names, src.tokenizer
  _check_new_workdir(workdir)
  placed = state_lib.place(cfg, devices)
  _check_table(rows, placed.model_target)

  times = {"checked": time.perf_counter()}
  with placed.context():
    params = jax.block_until_ready(load_params(src, placed))
  times["loaded"] = time.perf_counter()
  count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  nbytes = sum(hf.tensors[n].nbytes for n in names.values())

  # Every weight is in: only now is the workdir touched.
  check_disk_space(next(p for p in (workdir, *workdir.absolute().parents) if p.exists()), state_bytes(placed.model_target), 1)
  workdir.mkdir(parents=True, exist_ok=True)
  if cfg.data.tokenizer not in ("", "bytes"):
    tok_file = Path(cfg.data.tokenizer)
    dst = workdir / ("tokenizer.model" if tok_file.suffix == ".model" else "tokenizer.json")
    shutil.copyfile(tok_file, dst)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(dst)))
  for name in CARRIED:
    if (hf_dir / name).is_file():
      shutil.copyfile(hf_dir / name, workdir / name)
  (workdir / HF_CONFIG).write_text(json.dumps(hf.config, indent=2, sort_keys=True) + "\n")
  config_lib.save(cfg, workdir, tok.sha256)
  with placed.context():
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint, in_flight_bytes(placed.model_target))
    ckpt.save_model(0, params)
    del params          # the async save holds its own reference until written: the read-back below
    ckpt.close()        # (verification) then needs no second copy of the model beside this one
  times["saved"] = time.perf_counter()
  return Imported(cfg, workdir, count, nbytes, {k: v for k, v in placed.mesh.shape.items() if v > 1}, times)


@dataclasses.dataclass
class Exported:
  out: Path
  step: int
  architecture: str
  tensors: int


def export_hf(workdir: str | Path, out: str | Path, overrides: list[str] = (), devices=None) -> Exported:
  workdir, out = Path(workdir), Path(out)
  if not (workdir / "config.json").is_file():
    raise UserError(f"{workdir} has no config.json; export-hf reads a workdir that import-hf or train wrote")
  cfg = experiment_lib.load(workdir / "config.json", list(overrides))
  if cfg.model.name != "gpt":
    raise UserError(f"export-hf exports gpt models; {workdir} holds a '{cfg.model.name}'")
  family = family_for(cfg.model)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out {out} exists and is not empty; export into a new directory (nothing is overwritten)")
  if not (workdir / "checkpoints").is_dir():
    raise UserError(f"no checkpoints in {workdir}; import or train first")
  tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer not in ("", "bytes") else None
  if tokenizer is not None and not tokenizer.is_file():
    raise UserError(f"tokenizer file not found: {tokenizer} (data.tokenizer of {workdir / 'config.json'})")
  placed = state_lib.place(cfg, devices)
  with placed.context():
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint, in_flight_bytes(placed.target))
    try:
      step, params = ckpt.restore_model(placed.target)
    finally:
      ckpt.manager.close()
  ours = _flat(params)
  del params
  tensors = {r.hf: r.to_hf(*(np.asarray(jax.device_get(ours[n])) for n in r.ours)) for r in family.table(cfg.model)}
  base = json.loads((workdir / HF_CONFIG).read_text()) if (workdir / HF_CONFIG).is_file() else {}

  tmp = out.with_name(out.name + ".export-tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  files.write(tmp, family.hf_config(cfg.model, base), tensors)
  if tokenizer is not None:
    shutil.copyfile(tokenizer, tmp / ("tokenizer.model" if tokenizer.suffix == ".model" else "tokenizer.json"))
  for name in CARRIED:
    if (workdir / name).is_file():
      shutil.copyfile(workdir / name, tmp / name)
  if tokenizer is not None and tokenizer.suffix == ".json" and not (tmp / "tokenizer_config.json").exists():
    (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
  if out.exists():
    out.rmdir()
  tmp.rename(out)
  return Exported(out, step, family.ARCHITECTURE, len(tensors))
