"""Typed experiment configs: load `experiments/*.py`, apply `--set` overrides, validate, save.

An experiment file defines `get_config() -> Config`. Every field is typed, so an override
string is parsed against the field's type and a typo fails with the close matches named.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

from dcmodel import hostenv
from dcmodel.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "digits"
  # A user's data: a file, a directory or a glob. Corpora (source=corpus) by extension: .jsonl,
  # .parquet, .db/.sqlite (with `query`), anything else one text document per file; tables
  # (source=npz|csv); an ingested directory (source=arrayrecord).
  path: str = ""
  text_field: str = "text"       # JSONL key / Parquet or SQL column holding a document's text
  query: str = ""                # SQL for a database corpus, e.g. "SELECT body AS text, id FROM docs"
  sql_driver: str = "sqlite3"    # any DB-API 2.0 module whose connect() takes `path`
  tokenizer: str = "bytes"       # bytes | a tokenizer.json | a SentencePiece .model
  on_bad_record: str = "error"   # error | skip (skipped records are counted in the cleaning report)
  dedup: bool = True             # drop exact duplicate documents (by SHA-256)
  min_doc_bytes: int = 1         # documents shorter than this are dropped (counted)
  max_doc_bytes: int = 0         # ... and longer than this (0: no limit)
  global_batch_size: int = 128
  eval_batch_size: int = 128
  test_fraction: float = 0.2
  split_seed: int = 0
  shuffle_seed: int = 0
  read_threads: int = 1
  prefetch: int = 4
  # Options of the source itself (e.g. sequence length, vocab, number of rows), by name.
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; -1 on one axis means "all devices not used by the others"."""
  data: int = -1
  fsdp: int = 1
  model: int = 1
  stage: int = 1
  # Logical axis -> mesh axis (or tuple of mesh axes, or None). Sharding is data, not code.
  rules: tuple[tuple[str, Any], ...] = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv_heads", "model"),
      ("vocab", "model"),
      ("conv_out", "model"),
      ("table_rows", "model"),
      ("stage", "stage"),
      ("act_mlp", "model"),
      ("act_heads", "model"),
      ("act_kv_heads", "model"),
      ("act_vocab", "model"),
  )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adamw"           # adamw | adam | sgd | lion
  learning_rate: float = 1e-3
  schedule: str = "constant"    # constant | cosine | warmup_cosine | linear
  warmup_steps: int = 0
  min_learning_rate_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  momentum: float = 0.9          # sgd only
  grad_clip_norm: float = 0.0    # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 500
  seed: int = 0
  log_every: int = 50
  eval_every: int = 0            # 0: only at the end
  final_eval: bool = True        # evaluate on the test split when training ends
  nonfinite: str = "skip"        # a NaN/Inf loss or gradient: skip the update (counted) | stop | apply (counted, as PyTorch and Keras do)
  grad_norm: bool = True         # report the gradient's global norm; false (with nonfinite=apply) saves its reduction over every gradient
  grad_accum_steps: int = 1      # microbatches per step; gradients are averaged before the update
  steps_per_dispatch: int = 1    # train steps run inside one jitted call (a scan): small steps stop paying host overhead
  dispatch_unroll: int = 1       # of those, steps unrolled per loop iteration: XLA:CPU runs its own convolutions (model.conv=xla) ~8x slower inside a loop
  progress: bool = True
  max_seconds: float = 0.0       # a wall-clock budget: stop (checkpoint, final evaluation) once spent; 0: none
  profile_steps: str = ""        # "A:B": a jax.profiler trace of steps A+1..B (the B-A steps after step A) into WORKDIR/profile/


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  enabled: bool = True
  every_steps: int = 200         # 0: not by steps (then every_seconds)
  every_seconds: float = 0.0     # also a checkpoint when this long has passed since the last (0: not by time)
  max_to_keep: int = 2
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
  model: Any                     # the model's own config dataclass (see dcmodel.models)
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  name: str = "experiment"


# ---------------------------------------------------------------------------- overrides

def _fields(obj) -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(obj)}


def all_keys(cfg, prefix: str = "") -> list[str]:
  """Every overridable dotted key of a config."""
  keys = []
  for name, f in _fields(cfg).items():
    value = getattr(cfg, name)
    key = f"{prefix}{name}"
    if dataclasses.is_dataclass(value):
      keys.extend(all_keys(value, key + "."))
    else:
      keys.append(key)
  return keys


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, raw: Any, tp) -> Any:
  """Check `raw` (already literal-parsed) against the annotated type `tp`."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return raw
  if origin in (typing.Union, types.UnionType):
    for arg in args:
      try:
        return coerce(key, raw, arg)
      except UserError:
        continue
    raise UserError(f"{key}: expected {_type_name(tp)}, got {raw!r}")
  if tp is type(None):
    if raw is None:
      return None
    raise UserError(f"{key}: expected None, got {raw!r}")
  if tp is bool:
    if isinstance(raw, bool):
      return raw
    raise UserError(f"{key}: expected bool (true/false), got {raw!r}")
  if tp is int:
    if isinstance(raw, int) and not isinstance(raw, bool):
      return raw
    raise UserError(f"{key}: expected int, got {raw!r}")
  if tp is float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
      return float(raw)
    raise UserError(f"{key}: expected float, got {raw!r}")
  if tp is str:
    if isinstance(raw, str):
      return raw
    raise UserError(f"{key}: expected str, got {raw!r}")
  if origin is tuple:
    if not isinstance(raw, (tuple, list)):
      raise UserError(f"{key}: expected {_type_name(tp)} (e.g. (1, 2)), got {raw!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(raw))
    if args and len(args) != len(raw):
      raise UserError(f"{key}: expected {len(args)} items, got {len(raw)}")
    return tuple(coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(raw, args or [Any] * len(raw))))
  if origin is dict:
    if not isinstance(raw, dict):
      raise UserError(f"{key}: expected a dict (e.g. {{'a': 1}}), got {raw!r}")
    return dict(raw)
  raise UserError(f"{key}: cannot override a field of type {_type_name(tp)}")


def _parse_literal(text: str) -> Any:
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered in ("none", "null"):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word is a string


def _resolved_hints(obj) -> dict[str, Any]:
  return typing.get_type_hints(type(obj))


def override(cfg, key: str, text: str, _full: str | None = None, _root=None):
  """Return a copy of `cfg` with dotted `key` set from the string `text`."""
  full = _full or key
  root = _root if _root is not None else cfg
  head, _, rest = key.partition(".")
  fields = _fields(cfg)
  if head not in fields:
    candidates = all_keys(root)
    close = difflib.get_close_matches(full, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys start with: {', '.join(sorted({k.split('.')[0] for k in candidates}))}"
    raise UserError(f"unknown config key '{full}'{hint}")
  current = getattr(cfg, head)
  if rest:
    if not dataclasses.is_dataclass(current):
      raise UserError(f"unknown config key '{full}': '{full[:len(full) - len(rest) - 1]}' is a {_type_name(type(current))}, not a section")
    return dataclasses.replace(cfg, **{head: override(current, rest, text, full, root)})
  if dataclasses.is_dataclass(current):
    raise UserError(f"config key '{full}' is a section; set one of its fields, e.g. {full}.{next(iter(_fields(current)))}=...")
  value = coerce(full, _parse_literal(text), _resolved_hints(cfg)[head])
  return dataclasses.replace(cfg, **{head: value})


def check_types(cfg: Config) -> None:
  """Every field of a config built in Python holds a value of its declared type: an experiment
  file's get_config() is held to what a --set would be."""
  if not isinstance(cfg, Config):
    raise UserError(f"expected dcmodel.config.Config, got {type(cfg).__name__}")
  hints = typing.get_type_hints(Config)
  for f in dataclasses.fields(Config):
    value = getattr(cfg, f.name)
    if f.name == "name":
      coerce("name", value, str)
      continue
    if f.name == "model":
      if not (dataclasses.is_dataclass(value) and hasattr(value, "batch_spec") and hasattr(value, "make")):
        raise UserError(f"model must be a model config (dcmodel.models.get_config(NAME, ...)), got {type(value).__name__}")
    elif not isinstance(value, hints[f.name]):
      raise UserError(f"{f.name} must be a {hints[f.name].__name__}, got {type(value).__name__}")
    section = typing.get_type_hints(type(value))
    for field in dataclasses.fields(value):
      coerce(f"{f.name}.{field.name}", getattr(value, field.name), section[field.name])


def apply_overrides(cfg: Config, assignments: list[str]) -> Config:
  for item in assignments:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise UserError(f"--set expects KEY=VALUE (e.g. train.steps=200), got '{item}'")
    cfg = override(cfg, key.strip(), text.strip())
  validate(cfg)
  return cfg


# ---------------------------------------------------------------------------- validation

MAX_READ_THREADS = 64     # Grain read threads (each a thread of this process)
MAX_PREFETCH = 1024       # batches Grain reads ahead (each a batch of host memory; checked against it too)


def profile_steps(train: TrainConfig) -> tuple[int, int] | None:
  """train.profile_steps "A:B" as (A, B): trace the steps after step A up to step B."""
  text = train.profile_steps.strip()
  if not text:
    return None
  first, sep, last = text.partition(":")
  try:
    a, b = int(first), int(last)
  except ValueError:
    a = b = -1
  if not sep or not 0 <= a < b <= train.steps:
    raise UserError(f"train.profile_steps (--profile-steps) must be A:B with 0 <= A < B <= train.steps={train.steps} "
                    f"(the steps after step A up to step B), got '{train.profile_steps}'")
  return a, b

def validate(cfg: Config) -> None:
  """Checks that need no devices; mesh/device checks live in dcmodel.mesh."""
  positive = {
      "data.global_batch_size": cfg.data.global_batch_size,
      "data.eval_batch_size": cfg.data.eval_batch_size,
      "train.steps": cfg.train.steps,
      "train.log_every": cfg.train.log_every,
      "checkpoint.max_to_keep": cfg.checkpoint.max_to_keep,
      "train.grad_accum_steps": cfg.train.grad_accum_steps,
      "train.steps_per_dispatch": cfg.train.steps_per_dispatch,
      "train.dispatch_unroll": cfg.train.dispatch_unroll,
  }
  for key, value in positive.items():
    if value <= 0:
      raise UserError(f"{key} must be a positive integer, got {value}")
  if cfg.data.on_bad_record not in ("error", "skip"):
    raise UserError(f"data.on_bad_record must be 'error' or 'skip', got '{cfg.data.on_bad_record}'")
  if cfg.data.min_doc_bytes < 0 or cfg.data.max_doc_bytes < 0:
    raise UserError("data.min_doc_bytes and data.max_doc_bytes must be 0 or more")
  if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.every_seconds < 0:
    raise UserError(f"checkpoint.every_steps and checkpoint.every_seconds must be 0 or more, got "
                    f"{cfg.checkpoint.every_steps} and {cfg.checkpoint.every_seconds}")
  if cfg.checkpoint.enabled and not (cfg.checkpoint.every_steps or cfg.checkpoint.every_seconds):
    raise UserError("checkpoint.every_steps and checkpoint.every_seconds are both 0: set one (or checkpoint.enabled=false)")
  # Threads and buffered batches are work the machine must hold: bounded by what is sensible on any host.
  for key, value, high in (("data.read_threads", cfg.data.read_threads, MAX_READ_THREADS),
                           ("data.prefetch", cfg.data.prefetch, MAX_PREFETCH)):
    if not 0 <= value <= high:   # 0 read threads: Grain reads in the consuming thread
      raise UserError(f"{key} must be between 0 and {high}, got {value}")
  profile_steps(cfg.train)
  k = cfg.train.steps_per_dispatch
  for key, value in {"train.steps": cfg.train.steps, "train.log_every": cfg.train.log_every,
                     "train.eval_every": cfg.train.eval_every,
                     "checkpoint.every_steps": cfg.checkpoint.every_steps if cfg.checkpoint.enabled else 0}.items():
    if value % k:
      raise UserError(f"{key}={value} must be a multiple of train.steps_per_dispatch={k} (steps run {k} at a time)")
  if cfg.train.max_seconds < 0:
    raise UserError(f"train.max_seconds must be 0 (no budget) or more, got {cfg.train.max_seconds}")
  if not 0.0 < cfg.data.test_fraction < 1.0:
    raise UserError(f"data.test_fraction must be in (0, 1), got {cfg.data.test_fraction}")
  if cfg.optimizer.learning_rate <= 0:
    raise UserError(f"optimizer.learning_rate must be > 0, got {cfg.optimizer.learning_rate}")
  for axis in ("data", "fsdp", "model", "stage"):
    size = getattr(cfg.mesh, axis)
    if size == 0 or size < -1:
      raise UserError(f"mesh.{axis} must be a positive size or -1 (fill), got {size}")
  if sum(getattr(cfg.mesh, a) == -1 for a in ("data", "fsdp", "model", "stage")) > 1:
    raise UserError("at most one mesh axis may be -1 (fill with the remaining devices)")
  check = getattr(cfg.model, "validate", None)
  if check is not None:
    check()


# ---------------------------------------------------------------------------- saving

def to_dict(cfg) -> dict:
  out = {}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
  if isinstance(cfg, Config):
    out["model"] = {"name": cfg.model.name, **to_dict(cfg.model)} if hasattr(cfg.model, "name") else to_dict(cfg.model)
  return out


def to_json(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True, default=list)


def config_hash(cfg: Config) -> str:
  return hashlib.sha256(to_json(cfg).encode()).hexdigest()[:16]


RUN_FACTS = "_run"   # config.json's record of facts derived at run time (not config fields)


def save(cfg: Config, workdir: Path, tokenizer_sha256: str | None = None) -> Path:
  """The resolved config as WORKDIR/config.json, with the tokenizer it was trained with (a
  workdir refuses a run with another tokenizer: its token ids would mean other text) and the host
  allocator the process ran with (hostenv: it moves CPU step times by up to 1.5x)."""
  path = Path(workdir) / "config.json"
  record = {**to_dict(cfg), RUN_FACTS: {"tokenizer_sha256": tokenizer_sha256, "host_malloc": hostenv.active()}}
  record["data"]["tokenizer"] = _relative_to(cfg.data.tokenizer, Path(workdir))
  tmp = path.with_name("config.json.tmp")
  tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=list) + "\n")
  tmp.replace(path)
  return path


def _relative_to(file: str, workdir: Path) -> str:
  """A file inside the workdir (import-hf's tokenizer.json) is recorded relative to it, so the
  workdir can move; loading its config.json resolves it against the file's own directory."""
  if file in ("", "bytes"):
    return file
  try:
    return str(Path(file).resolve().relative_to(workdir.resolve()))
  except ValueError:
    return file


def saved(workdir: Path) -> dict | None:
  """The config saved in `workdir` by training (or import-hf), if any."""
  path = Path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    raise UserError(f"{path} is not valid JSON; move the workdir aside or pick another --workdir")


def saved_model(workdir: Path) -> dict | None:
  """The model section of the config saved in `workdir`, if any."""
  got = saved(workdir)
  return None if got is None else got.get("model")


def saved_tokenizer(workdir: Path) -> str | None:
  got = saved(workdir)
  return None if got is None else (got.get(RUN_FACTS) or {}).get("tokenizer_sha256")


def same_model(cfg: Config, saved: dict) -> bool:
  # Fields that choose only how the model is computed (a model config's COMPUTE_ONLY: convolution
  # kernels, remat, scan unrolling) do not make another model: the parameters are the same.
  skip = getattr(type(cfg.model), "COMPUTE_ONLY", ())
  now = {k: v for k, v in json.loads(json.dumps(to_dict(cfg)["model"], default=list)).items() if k not in skip}
  saved = {k: v for k, v in saved.items() if k not in skip}
  # A field added to the model config after the checkpoint was written (e.g. dtype) counts as
  # unchanged while it keeps its default.
  defaults = {f.name: f.default for f in dataclasses.fields(cfg.model) if f.default is not dataclasses.MISSING}
  added = {k: v for k, v in now.items() if k not in saved}
  return ({k: v for k, v in now.items() if k in saved} == saved
          and all(k in defaults and json.loads(json.dumps(defaults[k], default=list)) == v for k, v in added.items()))
