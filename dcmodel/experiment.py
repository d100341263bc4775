"""An experiment, from where a user keeps it: a Python file with `get_config()` (experiments/*.py)
or a workdir's `config.json` (what train and import-hf write), plus `--set` overrides.
Any exception raised by a user's experiment file is the one-line error naming the file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import typing
from pathlib import Path

from dcmodel import config as config_lib
from dcmodel import models
from dcmodel.config import Config
from dcmodel.errors import UserError

# The experiment files this process has loaded: an exception raised from their code (a model
# they define, a source they register) is the user's, reported as one line naming the line.
USER_FILES: set[str] = set()


def load(path: str | Path, overrides: list[str] = ()) -> Config:
  path = Path(path)
  if not path.is_file():
    raise UserError(f"experiment file not found: {path} (expected a Python file in experiments/ or a workdir's config.json)")
  cfg = from_json(path) if path.suffix == ".json" else from_python(path)
  return config_lib.apply_overrides(cfg, list(overrides))


def from_python(path: Path) -> Config:
  """Import an experiment file and call its `get_config()`."""
  spec = importlib.util.spec_from_file_location(f"_dcmodel_experiment_{path.stem}", path.resolve())
  module = importlib.util.module_from_spec(spec)
  USER_FILES.add(str(path.resolve()))
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"experiment file {path} is not valid Python: line {e.lineno}: {e.msg}") from e
  except UserError:
    raise
  except SystemExit as e:     # sys.exit() in a file we import is not the command's exit
    raise UserError(f"experiment file {path} called sys.exit({e.code!r}) while being imported") from e
  except Exception as e:
    raise UserError(f"experiment file {path} failed to import: {type(e).__name__}: {_first_line(e)}") from e
  if not hasattr(module, "get_config"):
    raise UserError(f"experiment file {path} has no get_config() function returning a dcmodel Config")
  try:
    cfg = module.get_config()
  except UserError:
    raise
  except SystemExit as e:
    raise UserError(f"experiment file {path}: get_config() called sys.exit({e.code!r})") from e
  except Exception as e:
    raise UserError(f"experiment file {path}: get_config() raised {type(e).__name__}: {_first_line(e)}") from e
  if not isinstance(cfg, Config):
    raise UserError(f"{path}: get_config() returned {type(cfg).__name__}, expected dcmodel.config.Config")
  try:
    config_lib.check_types(cfg)
  except UserError as e:
    raise UserError(f"{path}: get_config() returned a config whose {e}") from None
  return cfg


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""


def raised_in_user_file(e: BaseException) -> str | None:
  """'experiment file F, line N' when `e` (or an exception it was raised from, e.g. in a data
  loader's thread) came from the code of a loaded experiment file (the innermost such frame)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    where, tb = None, e.__traceback__
    while tb is not None:
      if tb.tb_frame.f_code.co_filename in USER_FILES:
        where = f"experiment file {tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno}"
      tb = tb.tb_next
    if where:
      return where
    e = e.__cause__ or e.__context__
  return None


def describe_user_error(e: BaseException) -> str | None:
  """The one line for an exception from a user's experiment code, or None if it is not one."""
  where = raised_in_user_file(e)
  return None if where is None else f"{where}: {type(e).__name__}: {_first_line(e)}"


def _section(cls, values: dict, where: str):
  """A config dataclass from its JSON dict: every value checked against the field's type."""
  if not isinstance(values, dict):
    raise UserError(f"{where}: expected an object, got {type(values).__name__}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(values) - names)
  if unknown:
    raise UserError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(names))}")
  return {k: config_lib.coerce(f"{where}.{k}", v, hints[k]) for k, v in values.items()}


def from_json(path: Path) -> Config:
  """A workdir's config.json (the resolved config of a run) back as a Config."""
  try:
    d = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(d, dict) or "model" not in d or "name" not in d.get("model", {}):
    raise UserError(f"{path} is not a dcmodel config (expected the config.json that train or import-hf writes)")
  d = {k: v for k, v in d.items() if k != config_lib.RUN_FACTS}
  model = dict(d.pop("model"))
  name = model.pop("name")
  model_cls = type(models.get_config(name)) if name in models.names() else None
  if model_cls is None:
    models.get_config(name)                       # the one-line unknown-model error
  sections = {f.name: f.type for f in dataclasses.fields(Config)}
  hints = typing.get_type_hints(Config)
  kwargs = {}
  for key, values in d.items():
    if key not in sections:
      raise UserError(f"{path}: unknown section '{key}'; known: {', '.join(sorted(sections))}")
    if key == "name":
      kwargs["name"] = config_lib.coerce("name", values, str)
    else:
      kwargs[key] = hints[key](**_section(hints[key], values, f"{path}: {key}"))
  cfg = Config(model=model_cls(**_section(model_cls, model, f"{path}: model")), **kwargs)
  # A tokenizer recorded relative to the workdir (config.save does that for one inside it) is
  # found beside this config.json wherever the directory now is.
  tok = Path(cfg.data.tokenizer)
  if cfg.data.tokenizer not in ("", "bytes") and not tok.is_absolute() and (path.parent / tok).is_file():
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str((path.parent / tok).resolve())))
  return cfg
