"""Result storage: one chunked, zstd-compressed zarr v3 array per column (TensorStore), plus
two small JSON records beside them: `meta.json` (what produced the results) and
`progress.json` (how many rows are committed).

Two writers share the format. `ResultsWriter` (predict) writes a split positionally (row i is
example i) one batch at a time, the chunk being the batch, so a batch never rewrites another's
chunk. `ResultsAppender` (serve) adds rows at the end as requests finish, growing the arrays
with `resize` a chunk at a time. Either way `progress.json` moves forward only after a write's
columns are all written (and the arrays grown): a crash leaves every committed row readable,
never a torn one, and the next writer continues from the first uncommitted row; a row written
twice lands in the same place, so there are never duplicates. A text column (numpy `S<W>`) is
stored as W bytes per row and read back as text. Paths may be local or any TensorStore kvstore
URL (`gs://bucket/x`, `s3://bucket/x`); only local paths are tested here.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorstore as ts

from dcmodel.errors import UserError

META, PROGRESS = "meta.json", "progress.json"


def _kvstore(path: str) -> str:
  """A kvstore URL for a path or URL (the directory, with a trailing slash)."""
  if "://" in path:
    return path.rstrip("/") + "/"
  return "file://" + os.path.abspath(path) + "/"


def _store(path: str) -> ts.KvStore:
  return ts.KvStore.open(_kvstore(path)).result()


def _read_json(store: ts.KvStore, key: str) -> dict | None:
  got = store.read(key).result()
  return json.loads(got.value) if got.state == "value" else None


def _spec(path: str, column: str) -> dict:
  return {"driver": "zarr3", "kvstore": _kvstore(path) + column + "/"}


def check_out(path: str) -> None:
  """A results store goes to a new directory, an empty one, or one that is a results store:
  never over a user's file or into a directory of other things."""
  if "://" in str(path):
    return
  p = os.path.abspath(path)
  if os.path.exists(p) and not os.path.isdir(p):
    raise UserError(f"--out {path} is a file; a results store is a directory of its own (nothing is overwritten)")
  if os.path.isdir(p) and os.listdir(p) and not os.path.exists(os.path.join(p, META)):
    raise UserError(f"--out {path} is a directory of other things (no {META}); pick a new or empty directory")


def _dtype_name(dtype) -> str:
  dtype = np.dtype(dtype)
  return f"S{dtype.itemsize}" if dtype.kind == "S" else dtype.name


def _stored(dtype, shape) -> tuple[np.dtype, tuple]:
  """How a column is kept: text (numpy S<W>) as W uint8 bytes per row (zarr v3 has no strings)."""
  dtype = np.dtype(dtype)
  return (np.dtype(np.uint8), (*shape, dtype.itemsize)) if dtype.kind == "S" else (dtype, tuple(shape))


def _to_stored(values, dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  if dtype.kind != "S":
    return np.asarray(values)
  text = np.ascontiguousarray(np.asarray(values, dtype))      # longer text is cut at W bytes
  return np.frombuffer(text.tobytes(), np.uint8).reshape(*text.shape, dtype.itemsize)


def _from_stored(values: np.ndarray, dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  if dtype.kind != "S":
    return values
  return np.ascontiguousarray(values).view(dtype).reshape(values.shape[:-1])


def _create(path: str, name: str, dtype, shape, rows: int, chunk_rows: int):
  dtype, shape = _stored(dtype, shape)
  fill = 0 if dtype == np.uint8 else -1 if dtype.kind in "iu" else float("nan")
  spec = {**_spec(path, name), "metadata": {
      "shape": [rows, *shape], "data_type": dtype.name,
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, *shape]}},
      "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 3}}],
      "fill_value": fill, "dimension_names": ["row", *[f"{name}_{i}" for i in range(len(shape))]]}}
  return ts.open(spec, create=True, delete_existing=True).result()


def _check_meta(store: ts.KvStore, path: str, meta: dict, option: str) -> dict | None:
  """The stored meta.json, if any; a store made by something else is refused, untouched."""
  old = _read_json(store, META)
  same = {k: v for k, v in meta.items() if k != "created"}
  if old is not None and {k: v for k, v in old.items() if k != "created"} != same:
    diff = sorted(k for k in same if old.get(k) != same[k])
    raise UserError(f"{path} already holds other results (differs in {', '.join(diff)}: "
                    f"{', '.join(f'{k}={old.get(k)!r}' for k in diff)}); choose another {option} or delete it")
  return old


def _describe(columns: dict[str, tuple[str, tuple]]) -> dict:
  return {k: [_dtype_name(d), list(s)] for k, (d, s) in columns.items()}


class ResultsWriter:
  """Create (or reopen to continue) a results store of `rows` rows with the given columns.

  `columns` maps a name to (dtype, trailing shape). `meta` says what produced the rows; a
  store made by something else (another checkpoint, config or split) is refused, untouched.
  """

  def __init__(self, path: str, rows: int, chunk_rows: int, columns: dict[str, tuple[str, tuple]], meta: dict):
    self.path, self.rows = str(path), rows
    self.store = _store(self.path)
    self.dtypes = {k: np.dtype(d) for k, (d, _) in columns.items()}
    meta = {**meta, "rows": rows, "chunk_rows": chunk_rows, "columns": _describe(columns)}
    old = _check_meta(self.store, path, meta, "--out")
    if old is None:
      self.done = 0
      self.arrays = {name: _create(self.path, name, dtype, shape, rows, chunk_rows) for name, (dtype, shape) in columns.items()}
      self.store.write(META, json.dumps({**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1)).result()
      self._commit(0)
    else:
      self.done = int((_read_json(self.store, PROGRESS) or {"rows_done": 0})["rows_done"])
      self.arrays = {name: ts.open(_spec(self.path, name), open=True, write=True).result() for name in columns}

  def _commit(self, rows_done: int) -> None:
    self.store.write(PROGRESS, json.dumps({"rows_done": rows_done})).result()
    self.done = rows_done

  def write(self, start: int, columns: dict[str, np.ndarray]) -> None:
    """Write rows [start, start + n) of every column, then commit them."""
    n = len(next(iter(columns.values())))
    stop = min(start + n, self.rows)
    futures = [self.arrays[k][start:stop].write(_to_stored(v, self.dtypes[k])[: stop - start]) for k, v in columns.items()]
    for f in futures:
      f.result()
    if stop > self.done:
      self._commit(stop)


class ResultsAppender:
  """An appendable results store (serving): rows added at the end, any number at a time. The
  arrays grow a chunk at a time (`resize`) before a write; `progress.json` commits after it.
  Reopening a store made by the same model continues after its committed rows."""

  def __init__(self, path: str, chunk_rows: int, columns: dict[str, tuple[str, tuple]], meta: dict, option: str = "--results"):
    self.path, self.chunk_rows = str(path), chunk_rows
    self.store = _store(self.path)
    self.dtypes = {k: np.dtype(d) for k, (d, _) in columns.items()}
    meta = {**meta, "rows": None, "appendable": True, "chunk_rows": chunk_rows, "columns": _describe(columns)}
    old = _check_meta(self.store, path, meta, option)
    if old is None:
      self.done = 0
      self.arrays = {name: _create(self.path, name, dtype, shape, chunk_rows, chunk_rows) for name, (dtype, shape) in columns.items()}
      self.store.write(META, json.dumps({**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1)).result()
      self._commit(0)
    else:
      self.done = int((_read_json(self.store, PROGRESS) or {"rows_done": 0})["rows_done"])
      self.arrays = {name: ts.open(_spec(self.path, name), open=True, write=True).result() for name in columns}

  @property
  def capacity(self) -> int:
    return min(a.shape[0] for a in self.arrays.values())

  def _commit(self, rows_done: int) -> None:
    self.store.write(PROGRESS, json.dumps({"rows_done": rows_done})).result()
    self.done = rows_done

  def append(self, columns: dict[str, np.ndarray]) -> int:
    """Add rows after the committed ones; returns the first new row's number."""
    n = len(next(iter(columns.values())))
    start, stop = self.done, self.done + n
    if stop > self.capacity:
      rows = -(-stop // self.chunk_rows) * self.chunk_rows
      futures = {k: a.resize(exclusive_max=[rows, *[None] * (a.rank - 1)]) for k, a in self.arrays.items()}
      self.arrays = {k: f.result() for k, f in futures.items()}
    futures = [self.arrays[k][start:stop].write(_to_stored(v, self.dtypes[k])) for k, v in columns.items()]
    for f in futures:
      f.result()
    self._commit(stop)
    return start


class Results:
  """Read side: committed rows only, fetched by slice, id, condition or top-K, chunk by chunk."""

  def __init__(self, path: str):
    self.path = str(path)
    store = _store(self.path)
    self.meta = _read_json(store, META)
    if self.meta is None:
      raise UserError(f"{path} holds no dcmodel results ({META} not found)")
    self.rows_done = int((_read_json(store, PROGRESS) or {"rows_done": 0})["rows_done"])
    self.columns = list(self.meta["columns"])
    self._arrays = {}

  def array(self, name: str):
    if name not in self.meta["columns"]:
      raise UserError(f"no column '{name}' in {self.path}; columns: {', '.join(self.columns)}")
    if name not in self._arrays:
      self._arrays[name] = ts.open(_spec(self.path, name), open=True, read=True).result()
    return self._arrays[name]

  def read(self, rows, columns=None) -> dict[str, np.ndarray]:
    """Columns at `rows` (a slice or an array of row numbers), as NumPy arrays."""
    columns = columns or self.columns
    dtype = lambda c: self.meta["columns"][c][0]
    if isinstance(rows, slice):    # never past the committed rows
      rows = slice(*rows.indices(self.rows_done))
      return {c: _from_stored(self.array(c)[rows].read().result(), dtype(c)) for c in columns}
    rows = np.asarray(rows, np.int64)
    if not len(rows):
      return {c: np.zeros((0, *self.meta["columns"][c][1]), dtype(c)) for c in columns}
    return {c: _from_stored(self.array(c).oindex[rows].read().result(), dtype(c)) for c in columns}

  def blocks(self, columns):
    """(first row, {column: values}) over the committed rows, one chunk at a time."""
    step = int(self.meta["chunk_rows"])
    for lo in range(0, self.rows_done, step):
      yield lo, self.read(slice(lo, min(lo + step, self.rows_done)), columns)


def parse_range(text: str, rows: int) -> slice:
  try:
    a, b = text.split(":")
    lo, hi = int(a) if a else 0, int(b) if b else rows
  except ValueError:
    raise UserError(f"--range must look like a:b (row numbers), got '{text}'") from None
  return slice(max(lo, 0), min(hi, rows))


_OPS = {"==": np.equal, "!=": np.not_equal, "<=": np.less_equal, ">=": np.greater_equal, "<": np.less, ">": np.greater}


def parse_where(text: str, columns: list[str], text_columns=()):
  """'COLUMN OP VALUE' or 'COLUMN OP COLUMN' (OP one of == != < <= > >=) -> (lhs, op, rhs); a
  text column's VALUE is text (quotes optional)."""
  for op in ("==", "!=", "<=", ">=", "<", ">"):
    if op in text:
      lhs, rhs = (s.strip() for s in text.split(op, 1))
      break
  else:
    raise UserError(f"--where must look like 'COLUMN OP VALUE' with OP one of == != < <= > >=, got '{text}'")
  if lhs not in columns:
    raise UserError(f"--where names unknown column '{lhs}'; columns: {', '.join(columns)}")
  if rhs not in columns and lhs in text_columns:
    rhs = rhs.strip("'\"").encode("utf-8")
  elif rhs not in columns:
    try:
      rhs = float(rhs)
    except ValueError:
      raise UserError(f"--where: '{rhs}' is neither a number nor a column ({', '.join(columns)})") from None
  return lhs, op, rhs


def query(path: str, ids=None, range: str | None = None, where: tuple[str, ...] = (), top: int | None = None,
          by: str = "score", ascending: bool = False, columns=None) -> dict[str, np.ndarray]:
  """Rows of a results store selected by ids, a row range and conditions (all must hold),
  optionally the top K of them by a column; only the chunks needed are read."""
  res = Results(path)
  scalar = [c for c in res.columns if not res.meta["columns"][c][1]]
  text = [c for c in scalar if res.meta["columns"][c][0].startswith("S")]
  numeric = [c for c in scalar if c not in text]
  conds = [parse_where(w, scalar, text) for w in where]
  if top is not None and (top < 1 or by not in numeric):
    raise UserError(f"--top needs K >= 1 and --by one of {', '.join(numeric)}; got K={top}, --by {by}")
  if top is not None and top > res.rows_done:
    raise UserError(f"--top {top} is more than the {res.rows_done} committed rows of {path}")
  window = parse_range(range, res.rows_done) if range else slice(0, res.rows_done)
  need = sorted({c[0] for c in conds} | {c[2] for c in conds if isinstance(c[2], str)} | ({by} if top else set()))
  if ids is not None:
    ids = np.asarray(ids, np.int64)
    bad = ids[(ids < 0) | (ids >= res.rows_done)]
    if len(bad):
      raise UserError(f"ids {bad[:5].tolist()} are not among the {res.rows_done} committed rows")
    rows = ids[(ids >= window.start) & (ids < window.stop)]
    candidates = [(rows, res.read(rows, need))] if need else []
  elif need:   # scan the window chunk by chunk
    candidates = ((np.arange(lo, lo + len(v[need[0]])), v) for lo, v in res.blocks(need))
  else:
    return res.read(window, columns)
  if need:
    rows = _select(candidates, window, conds, top, by, ascending)
  return res.read(rows, columns)


def _select(candidates, window: slice, conds, top, by, ascending) -> np.ndarray:
  """Rows of (rows, values) blocks inside the window that meet every condition; with `top`,
  the best K in order (ties by row order), keeping only K between blocks."""
  kept_rows, kept_keys = np.zeros(0, np.int64), np.zeros(0)
  for rows, vals in candidates:
    keep = (rows >= window.start) & (rows < window.stop)
    for lhs, op, rhs in conds:
      keep &= _OPS[op](vals[lhs], vals[rhs] if isinstance(rhs, str) else rhs)
    kept_rows = np.concatenate([kept_rows, rows[keep]])
    if top:
      kept_keys = np.concatenate([kept_keys, vals[by][keep].astype(np.float64)])
      order = np.argsort(kept_keys if ascending else -kept_keys, kind="stable")[:top]
      kept_rows, kept_keys = kept_rows[order], kept_keys[order]
  return kept_rows

