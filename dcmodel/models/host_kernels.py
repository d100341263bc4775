"""dcmodel's CPU kernels, XLA FFI custom calls in C++: the matmul (host_gemm.cc, for
`layers.matmul`) and the fused attention (host_attention.cc, for `attention.attend`). Built into
one library on first use with the machine's C++ compiler (`CXX`, default c++; ~5 s), against the
XLA FFI headers jaxlib ships and OpenBLAS from the `scipy-openblas32` wheel, cached by the hash of
everything that goes into it, and registered with XLA for the CPU once per process.

Float32 only; on accelerators XLA's own emitters and kernels run instead."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
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

HERE = Path(__file__).parent
SOURCES = (HERE / "host_gemm.cc", HERE / "host_attention.cc")
HEADERS = (HERE / "host_parallel.h",)
GEMM, ATTENTION_FORWARD, ATTENTION_BACKWARD = "dcmodel_host_gemm", "dcmodel_host_attention_fwd", "dcmodel_host_attention_bwd"
# custom-call target -> the handler symbol the library exports
TARGETS = {GEMM: "HostGemm", ATTENTION_FORWARD: "HostAttentionForward", ATTENTION_BACKWARD: "HostAttentionBackward"}
COMPILE_TIMEOUT_S = 300
WAY_OUT = "or set model.matmul=xla and model.attention=xla"


def cache_dir() -> Path:
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcmodel"


def _compiler() -> str:
  return os.environ.get("CXX", "c++")


def _compile_command(out: Path) -> list[str]:
  lib_dir = scipy_openblas32.get_lib_dir()
  return [_compiler(), "-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{HERE}",
          f"-I{jax.ffi.include_dir()}", f"-I{scipy_openblas32.get_include_dir()}", *map(str, SOURCES), "-o", str(out),
          f"-L{lib_dir}", f"-l{scipy_openblas32.get_library()}", f"-Wl,-rpath,{lib_dir}"]


def build() -> Path:
  """The compiled library, built once per sources, jaxlib, OpenBLAS and compile command."""
  texts = [p.read_text() for p in SOURCES + HEADERS]
  key = hashlib.sha256("\0".join([*texts, importlib.metadata.version("jaxlib"), *_compile_command(Path("out"))]).encode()
                       ).hexdigest()[:16]
  path = cache_dir() / f"host_kernels-{key}.so"
  if path.exists():
    return path
  compiler = _compiler()
  names = ", ".join(p.name for p in SOURCES)
  if shutil.which(compiler) is None:
    raise UserError(f"dcmodel's CPU kernels ({names}) need a C++ compiler, and '{compiler}' was not found "
                    f"(install g++ or clang++, or set CXX; {WAY_OUT})")
  path.parent.mkdir(parents=True, exist_ok=True)
  # Built beside its final name and renamed into place: processes building at once never load half a file.
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = Path(tmp) / path.name
    try:
      done = subprocess.run(_compile_command(out), capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      raise UserError(f"building dcmodel's CPU kernels ({names}) with '{compiler}' took over {COMPILE_TIMEOUT_S} s "
                      f"({WAY_OUT})") from None
    if done.returncode:
      last = (done.stderr.strip().splitlines() or ["no output"])[-1]
      raise UserError(f"building dcmodel's CPU kernels ({names}) with '{compiler}' failed: {last} ({WAY_OUT})")
    os.replace(out, path)
  return path


@functools.cache
def register() -> None:
  """Build (or find) the kernels and register them with XLA for the CPU; once per process."""
  lib = ctypes.cdll.LoadLibrary(str(build()))
  lib.HostKernelsSingleThreadedBlas()
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def available() -> bool:
  """Whether the kernels build and load here (`auto` settings fall back to XLA's if not)."""
  try:
    register()
  except (UserError, OSError, subprocess.SubprocessError):
    return False
  return True


def result(shape, like) -> jax.ShapeDtypeStruct:
  """A float32 custom-call result of `shape` for operands like `like`: inside a shard_map it varies
  over the mesh axes `like` does, on its mesh."""
  aval = jax.typeof(like)
  if aval.manual_axis_type.empty:
    return jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=jax.NamedSharding(aval.sharding.mesh, P()),
                              manual_axis_type=aval.manual_axis_type)


def vary_alike(*arrays):
  """`arrays`, each cast to vary over every mesh axis any of them varies over (inside a shard_map;
  outside, unchanged): a custom call has no rule of its own for operands that vary differently, so
  the gradient of one that did not vary, like whole weights beside a batch shard, is summed over
  the axes the others vary over."""
  varying = [jax.typeof(a).manual_axis_type.varying for a in arrays]
  every = frozenset().union(*varying)
  return tuple(jax.lax.pcast(a, tuple(sorted(every - v)), to="varying") for a, v in zip(arrays, varying))
