"""A family's mapping table: one row per Hugging Face tensor, naming the `gpt` parameter(s) it
holds and the two layout functions between them (numpy, on the host, one tensor at a time).

Parameter names are dotted paths in the model's state (`trunk.blocks.3.attn.wq`). A row may hold
several of ours (GPT-2's fused c_attn is Q, K and V); the functions are inverse to each other,
which the round-trip tests hold bitwise.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dcmodel.errors import UserError


@dataclasses.dataclass(frozen=True)
class Row:
  hf: str                                            # tensor name in the safetensors files
  ours: tuple[str, ...]                              # gpt parameter path(s)
  hf_shape: tuple[int, ...]                          # what config.json says the tensor's shape is
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]


def same(name: str, ours: str, shape) -> Row:
  return Row(name, (ours,), tuple(shape), lambda w: (w,), lambda w: w)


def transposed(name: str, ours: str, shape) -> Row:
  """torch.nn.Linear stores (out, in); gpt's kernels are (in, out)."""
  return Row(name, (ours,), tuple(shape), lambda w: (w.T,), lambda w: w.T)


def reshaped(name: str, ours: str, shape, our_shape, transpose: bool = False) -> Row:
  """A kernel whose flat (heads x head_dim) axis gpt keeps as two axes; `transpose` for a
  torch Linear's (out, in) storage."""
  shape, our_shape = tuple(shape), tuple(our_shape)
  if transpose:
    flat = (shape[1], shape[0])
    return Row(name, (ours,), shape, lambda w: (w.T.reshape(our_shape),), lambda w: w.reshape(flat).T)
  return Row(name, (ours,), shape, lambda w: (w.reshape(our_shape),), lambda w: w.reshape(shape))


def fused(name: str, ours: tuple[str, ...], shape, our_shapes, axis: int) -> Row:
  """One tensor holding several of ours side by side along `axis` (GPT-2's c_attn: Q | K | V)."""
  shape, our_shapes = tuple(shape), [tuple(s) for s in our_shapes]
  sizes = [int(np.prod(s)) // int(np.prod(shape[:axis] + shape[axis + 1:])) for s in our_shapes]
  cuts = np.cumsum(sizes)[:-1]

  def to_ours(w):
    return tuple(p.reshape(s) for p, s in zip(np.split(w, cuts, axis=axis), our_shapes))

  def to_hf(*parts):
    flat = [p.reshape(shape[:axis] + (n,) + shape[axis + 1:]) for p, n in zip(parts, sizes)]
    return np.concatenate(flat, axis=axis)
  return Row(name, tuple(ours), shape, to_ours, to_hf)


def refuse(family: str, what: str) -> None:
  raise UserError(f"{family}: {what}; gpt cannot express it, so this checkpoint cannot be imported")
