"""A Hugging Face model directory on disk: config.json and safetensors weights (one
model.safetensors, or shards named by model.safetensors.index.json).

Opening reads only headers (names, dtypes, shapes; safetensors checks that the data covers the
file), so every problem with the files is found before anything is read or written. Tensors
are then read one at a time from the memory-mapped file, each in its own `safe_open`: the
mapping's pages count in the process's resident memory until it is closed, so one long-open
mapping would hold the whole checkpoint resident beside the model being built.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dcmodel.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclasses.dataclass(frozen=True)
class Entry:
  file: Path
  dtype: str       # safetensors dtype name: F32, BF16, ...
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * FLOAT_DTYPES.get(self.dtype, 4)


@dataclasses.dataclass
class HFDirectory:
  path: Path
  config: dict
  tensors: dict[str, Entry]      # name -> where it is

  @classmethod
  def open(cls, path: str | Path) -> "HFDirectory":
    path = Path(path)
    if not path.is_dir():
      raise UserError(f"{path} is not a directory; expected a Hugging Face model directory (config.json + *.safetensors)")
    config = read_json(path / "config.json", "its config.json (the model's architecture)")
    files = _weight_files(path)
    tensors = {}
    for file in files:
      try:
        with safe_open(file, framework="numpy") as f:
          for name in f.keys():
            s = f.get_slice(name)
            tensors[name] = Entry(file, s.get_dtype(), tuple(s.get_shape()))
      except SafetensorError as e:
        raise UserError(f"{file} is not a readable safetensors file ({str(e).strip()[:200]}); "
                        f"is it truncated or still downloading?") from None
    return cls(path, config, tensors)

  def read(self, name: str) -> np.ndarray:
    """One tensor as float32 (bfloat16 and float16 widened exactly)."""
    e = self.tensors[name]
    try:
      if e.dtype == "BF16":   # numpy has no bfloat16: safetensors hands it over as a JAX array
        with safe_open(e.file, framework="flax") as f:
          return np.asarray(f.get_tensor(name)).astype(np.float32)
      with safe_open(e.file, framework="numpy") as f:
        return f.get_tensor(name).astype(np.float32, copy=False)
    except (SafetensorError, OSError) as err:
      raise UserError(f"tensor {name} in {e.file} could not be read: {str(err).strip()[:200]}") from None


def read_json(path: Path, what: str) -> dict:
  if not path.is_file():
    raise UserError(f"{path.parent} has no {path.name}; a Hugging Face model directory holds {what}")
  try:
    got = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(got, dict):
    raise UserError(f"{path} holds a {type(got).__name__}, expected a JSON object")
  return got


def _weight_files(path: Path) -> list[Path]:
  if (path / INDEX).is_file():
    index = read_json(path / INDEX, "the shard index")
    names = sorted(set((index.get("weight_map") or {}).values()))
    if not names:
      raise UserError(f"{path / INDEX} has no weight_map naming the shards")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
      raise UserError(f"{path / INDEX} names shard(s) that are not there: {', '.join(missing[:3])}")
    return [path / n for n in names]
  if (path / SINGLE).is_file():
    return [path / SINGLE]
  others = sorted(p.name for p in path.glob("*.safetensors"))
  if others:
    return [path / n for n in others]
  found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf"))
  hint = f" (found {', '.join(found[:3])}: convert them to safetensors first)" if found else ""
  raise UserError(f"{path} has no *.safetensors weights{hint}")


def write(out: Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
  """config.json + model.safetensors, with the metadata transformers requires ({"format": "pt"})."""
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / SINGLE), metadata={"format": "pt"})


def dir_bytes(path: Path) -> int:
  return sum(os.path.getsize(p) for p in Path(path).rglob("*") if p.is_file())
