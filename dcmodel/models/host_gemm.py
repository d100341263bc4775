"""A CPU matmul as an XLA FFI custom call into OpenBLAS (host_gemm.cc), for `layers.matmul`.

Why: XLA:CPU's matmul libraries (YNNPACK, Eigen, oneDNN) take a dot's operands row-major only, so
XLA writes a transposing copy before every dot whose operand it wants the other way round: the
weight gradients X^T dY, the input gradients dY W^T, and the norms' and attention's outputs feeding
them. On the benchmark GPT those copies were ~200 ms of a ~2 s step, against PyTorch's 13-26 ms.
BLAS takes either operand transposed as a flag, so here no copy is written.

The kernel is compiled on first use with the machine's C++ compiler against the XLA FFI headers
jaxlib ships and the `scipy-openblas32` wheel, and cached by the hash of everything that goes into
it. Float32 only; on accelerators the matmul stays XLA's (their dot emitters take any layout)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import scipy_openblas32
from jax.sharding import PartitionSpec as P

from dcmodel.errors import UserError

TARGET = "dcmodel_host_gemm"
SOURCE = Path(__file__).with_name("host_gemm.cc")
COMPILE_TIMEOUT_S = 300


def cache_dir() -> Path:
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcmodel"


def _compiler() -> str:
  return os.environ.get("CXX", "c++")


def _compile_command(out: Path) -> list[str]:
  lib_dir = scipy_openblas32.get_lib_dir()
  return [_compiler(), "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
          f"-I{jax.ffi.include_dir()}", f"-I{scipy_openblas32.get_include_dir()}", str(SOURCE), "-o", str(out),
          f"-L{lib_dir}", f"-l{scipy_openblas32.get_library()}", f"-Wl,-rpath,{lib_dir}"]


def _build() -> Path:
  """The compiled library, built once per source, jaxlib, OpenBLAS and compiler."""
  key = hashlib.sha256("\0".join([SOURCE.read_text(), jax.ffi.include_dir(), importlib.metadata.version("jaxlib"),
                                  scipy_openblas32.get_lib_dir(), _compiler()]).encode()).hexdigest()[:16]
  path = cache_dir() / f"host_gemm-{key}.so"
  if path.exists():
    return path
  compiler = _compiler()
  if shutil.which(compiler) is None:
    raise UserError(f"model.matmul=blas needs a C++ compiler to build {SOURCE.name}, and '{compiler}' was not found "
                    f"(install g++ or clang++, or set CXX; or use model.matmul=xla)")
  path.parent.mkdir(parents=True, exist_ok=True)
  # Built beside its final name and renamed into place: processes building at once never load half a file.
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = Path(tmp) / path.name
    try:
      done = subprocess.run(_compile_command(out), capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      raise UserError(f"model.matmul=blas: building {SOURCE.name} with '{compiler}' took over {COMPILE_TIMEOUT_S} s "
                      f"(or use model.matmul=xla)") from None
    if done.returncode:
      last = (done.stderr.strip().splitlines() or ["no output"])[-1]
      raise UserError(f"model.matmul=blas: building {SOURCE.name} with '{compiler}' failed: {last} "
                      f"(or use model.matmul=xla)")
    os.replace(out, path)
  return path


@functools.cache
def register() -> None:
  """Build (or find) the kernel and register it with XLA for the CPU; once per process."""
  lib = ctypes.cdll.LoadLibrary(str(_build()))
  lib.HostGemmSingleThreaded()
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.HostGemm), platform="cpu")


@functools.cache
def available() -> bool:
  """Whether the kernel builds and loads here (model.matmul=auto falls back to XLA's if not)."""
  try:
    register()
  except (UserError, OSError, subprocess.SubprocessError):
    return False
  return True


def gemm(a, b, trans_a: bool = False, trans_b: bool = False):
  """op(a) @ op(b) for 2-D float32 a, b, where op transposes when asked: no copy either way."""
  if a.dtype != jnp.float32 or b.dtype != jnp.float32 or a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"host_gemm multiplies 2-D float32 arrays, got {a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}")
  register()
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  aval = jax.typeof(a)   # inside a shard_map: the mesh axes a and b (alike) vary over, on its mesh
  out = (jax.ShapeDtypeStruct((m, n), jnp.float32) if aval.manual_axis_type.empty else
         jax.ShapeDtypeStruct((m, n), jnp.float32, sharding=jax.NamedSharding(aval.sharding.mesh, P()),
                              manual_axis_type=aval.manual_axis_type))
  return jax.ffi.ffi_call(TARGET, out)(a, b, trans_a=trans_a, trans_b=trans_b)


def matmul(x, w, contract: int):
  """x (..., *c) contracted with w (*c, *out) over the `contract` dims c, by `gemm`; the same
  product as `jnp.tensordot(x, w, contract)`. Inside a shard_map both operands are first cast to
  vary over the same mesh axes (the custom call has no rule of its own for that), so the gradient
  of an operand that did not vary, like whole weights beside a batch shard, is summed over them."""
  vx, vw = jax.typeof(x).manual_axis_type.varying, jax.typeof(w).manual_axis_type.varying
  return _matmul(jax.lax.pcast(x, tuple(sorted(vw - vx)), to="varying"),
                 jax.lax.pcast(w, tuple(sorted(vx - vw)), to="varying"), contract)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, contract: int):
  return _matmul_fwd(x, w, contract)[0]


def _split(x, w, contract: int):
  """x and w as 2-D row-major views (free), and the leading and trailing shapes of the product."""
  k = math.prod(w.shape[:contract])
  return x.reshape(-1, k), w.reshape(k, -1), x.shape[:x.ndim - contract], w.shape[contract:]


def _matmul_fwd(x, w, contract):
  x2, w2, lead, out = _split(x, w, contract)
  return gemm(x2, w2).reshape(*lead, *out), (x, w)


def _matmul_bwd(contract, res, dy):
  x, w = res
  x2, w2, _, _ = _split(x, w, contract)
  dy2 = dy.reshape(x2.shape[0], w2.shape[1])
  return gemm(dy2, w2, trans_b=True).reshape(x.shape), gemm(x2, dy2, trans_a=True).reshape(w.shape)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
