"""The data flow around the step: input pipeline and checkpoint I/O, measured against the
performance model.

1. Input: the Grain train iterator of `stdlib_gpt` (byte windows) and `clicks_dlrm` (tabular rows)
   delivering batches at 0/1/2/4 read threads, against the rate the train step needs (batches
   per second = 1 / measured step time, from `benchmarks/results/step_time.json` where it exists,
   else measured here), and host-to-device transfer time of one batch vs bytes / bandwidth.
2. Checkpoints: Orbax save (committed) and restore of states of 1-256 MiB, against
   bytes / storage bandwidth, the bandwidth calibrated by writing and reading a separate 64 MiB
   file with fsync (not a checkpoint).
Writes benchmarks/results/dataflow.json and dataflow.png.
Run: python -m benchmarks.dataflow [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from benchmarks.common import RESULTS, write  # noqa: E402
from dcmodel import hostenv  # noqa: E402
from dcmodel import experiment as experiment_lib  # noqa: E402
from dcmodel.data import pipeline  # noqa: E402
from dcmodel.data.dataset import Dataset  # noqa: E402
from dcmodel.mesh import batch_sharding, build_mesh  # noqa: E402
from dcmodel.perf import optimize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def storage_bandwidth(directory: Path, mib: int = 64) -> tuple[float, float]:
  """(write, read) bytes/s of one file written with fsync and read back: the calibration."""
  data = np.random.default_rng(0).integers(0, 255, mib * 2 ** 20, dtype=np.uint8).tobytes()
  path = directory / "calibration.bin"
  t = time.perf_counter()
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  write_bw = len(data) / (time.perf_counter() - t)
  t = time.perf_counter()
  with open(path, "rb") as f:
    f.read()
  read_bw = len(data) / (time.perf_counter() - t)
  path.unlink()
  return write_bw, read_bw


def input_rates(name: str, threads: list[int], batches: int) -> list[dict]:
  cfg = experiment_lib.load(ROOT / "experiments" / f"{name}.py")
  dataset = Dataset.load(cfg.data, cfg.model.batch_spec())
  sharding = batch_sharding(build_mesh(cfg.mesh))
  rows = []
  for n in threads:
    it = dataset.train_iterator(cfg.data.global_batch_size, cfg.data.shuffle_seed, read_threads=n, prefetch=4 if n else 0)
    for _ in range(5):
      host = next(it)
    t = time.perf_counter()
    for _ in range(batches):
      host = next(it)
    rate = batches / (time.perf_counter() - t)
    keys = [k for k in host if k != "id"]
    nbytes = sum(host[k].nbytes for k in keys)
    times = []
    for _ in range(20):
      t = time.perf_counter()
      jax.block_until_ready(pipeline.to_device(host, sharding, keys))
      times.append(time.perf_counter() - t)
    rows.append({"experiment": name, "read_threads": n, "batches_per_s": rate, "batch_bytes": nbytes,
                 "transfer_s": statistics.median(times)})
  return rows


def checkpoint_io(directory: Path, sizes_mib: list[int], write_bw: float, read_bw: float) -> list[dict]:
  rows = []
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  for mib in sizes_mib:
    n = mib * 2 ** 20 // 4
    state = {"w": jax.device_put(jnp.arange(n, dtype=jnp.float32) * 1e-3, sharding)}
    target = {"w": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sharding)}
    saves, restores = [], []
    for rep in range(3):
      path = directory / f"ckpt-{mib}-{rep}"
      ckptr = ocp.StandardCheckpointer()
      t = time.perf_counter()
      ckptr.save(path, state)
      ckptr.wait_until_finished()
      saves.append(time.perf_counter() - t)
      t = time.perf_counter()
      jax.block_until_ready(ckptr.restore(path, target))
      restores.append(time.perf_counter() - t)
      ckptr.close()
    nbytes = 4 * n
    rows.append({"state_mib": mib, "save_s": statistics.median(saves), "restore_s": statistics.median(restores),
                 "predicted_save_s": optimize.transfer_time_s(nbytes, write_bw),
                 "predicted_restore_s": optimize.transfer_time_s(nbytes, read_bw),
                 "save_bw": nbytes / statistics.median(saves), "restore_bw": nbytes / statistics.median(restores)})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  args = p.parse_args(argv)
  threads = [0, 1, 2] if args.quick else [0, 1, 2, 4]
  inputs = input_rates("stdlib_gpt", threads, 50 if args.quick else 200) + input_rates("clicks_dlrm", threads, 50 if args.quick else 200)
  steps = {}
  measured = RESULTS / "step_time.json"
  with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").exists() else None) as tmp:
    write_bw, read_bw = storage_bandwidth(Path(tmp))
    ckpt = checkpoint_io(Path(tmp), [1, 16, 64] if args.quick else [1, 4, 16, 64, 256], write_bw, read_bw)
  if measured.exists():
    import json
    for r in json.loads(measured.read_text())["rows"]:
      steps.setdefault(r["model"], r["measured_s"])
  write("dataflow" + ("_quick" if args.quick else ""), {"storage_calibration": {"write_bw": write_bw, "read_bw": read_bw},
                                                        "input": inputs, "checkpoint": ckpt, "train_step_s": steps})
  for r in inputs:
    print(f"input {r['experiment']:12s} threads {r['read_threads']}: {r['batches_per_s']:8.1f} batches/s; "
          f"host->device {1e3 * r['transfer_s']:.2f} ms for {r['batch_bytes'] / 2**10:.0f} KiB")
  for r in ckpt:
    print(f"checkpoint {r['state_mib']:4d} MiB: save {r['save_s']:.3f}s (predicted {r['predicted_save_s']:.3f}), "
          f"restore {r['restore_s']:.3f}s (predicted {r['predicted_restore_s']:.3f})")
  print(f"storage calibration: write {write_bw / 1e9:.2f} GB/s, read {read_bw / 1e9:.2f} GB/s")
  plot(inputs, ckpt, "_quick" if args.quick else "")
  return 0


def plot(inputs, ckpt, suffix: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for name in sorted({r["experiment"] for r in inputs}):
    sel = [r for r in inputs if r["experiment"] == name]
    ax[0].plot([r["read_threads"] for r in sel], [r["batches_per_s"] for r in sel], "o-", label=name)
  ax[0].set(xlabel="Grain read threads", ylabel="batches / s delivered", title="input pipeline throughput", yscale="log")
  ax[0].legend()
  mib = [r["state_mib"] for r in ckpt]
  ax[1].loglog(mib, [r["save_s"] for r in ckpt], "o-", label="save (measured)")
  ax[1].loglog(mib, [r["predicted_save_s"] for r in ckpt], "--", label="save (bytes / write bw)")
  ax[1].loglog(mib, [r["restore_s"] for r in ckpt], "s-", label="restore (measured)")
  ax[1].loglog(mib, [r["predicted_restore_s"] for r in ckpt], ":", label="restore (bytes / read bw)")
  ax[1].set(xlabel="state size (MiB)", ylabel="seconds", title="checkpoint I/O vs size")
  ax[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(RESULTS / f"dataflow{suffix}.png", dpi=110)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
