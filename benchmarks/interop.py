"""Importing a Hugging Face checkpoint of >= 1 GB (`dcmodel import-hf`): peak resident memory
against the checkpoint's size, and time against bytes / storage bandwidth.

1. Build (its own process): a random Llama-shaped model (GQA, SwiGLU, untied head) made by
   transformers from a config, `save_pretrained` in safetensors shards with their index.
2. Import (its own process, 8 simulated CPU devices, import-hf's default FSDP layout, so the
   devices together hold one copy of the weights): a thread samples resident memory every 20 ms;
   the baseline is the process with JAX and dcmodel up, before any weight is read; the peak is
   the kernel's (ru_maxrss). On CPU the devices' memory is this process's memory.
3. Predictions (dcmodel.perf.optimize.transfer_time_s) from the storage bandwidth that
   benchmarks.dataflow calibrates (a 64 MiB file, written with fsync and read back, in the same
   directory): reading = bytes / read bandwidth; the checkpoint = bytes / write bandwidth +
   bytes / read bandwidth (Orbax writes it, then dcmodel reads it back to verify it).
Writes benchmarks/results/interop.json and interop.png (--quick: interop_quick.*, a ~130 MB model).
Run: python -m benchmarks.interop [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dcmodel import hostenv

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

ROOT = Path(__file__).resolve().parents[1]
# Llama-shaped: GQA (16 query heads on 8 KV heads), intermediate ~2.75 x hidden, untied head.
FULL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=8, max_position_embeddings=2048)
QUICK = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048)


def build(hf_dir: Path, quick: bool) -> None:
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**(QUICK if quick else FULL), tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg)
  model.save_pretrained(hf_dir, max_shard_size="50MB" if quick else "400MB")


def child_import(hf_dir: Path, workdir: Path, out: Path) -> None:
  import jax
  import psutil
  from dcmodel.interop import hf as interop
  jax.devices()
  proc, samples, stop = psutil.Process(), [], threading.Event()

  def sample():
    while not stop.is_set():
      samples.append((time.perf_counter(), proc.memory_info().rss))
      time.sleep(0.02)
  baseline = proc.memory_info().rss
  thread = threading.Thread(target=sample, daemon=True)
  start = time.perf_counter()
  thread.start()
  got = interop.import_hf(hf_dir, workdir, ["data.tokenizer=bytes"])
  stop.set()
  thread.join()
  t = got.times
  during = lambda a, b: max((r for s, r in samples if a <= s <= b), default=0)
  out.write_text(json.dumps({
      "params": got.params, "bytes_read": got.bytes_read, "mesh": got.mesh, "baseline_rss": baseline,
      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "peak_rss_checks": during(start, t["checked"]), "peak_rss_read": during(t["checked"], t["loaded"]),
      "peak_rss_save": during(t["loaded"], t["saved"]), "check_s": t["checked"] - start, "read_s": got.read_s,
      "save_s": got.save_s, "timeline": [(s - start, r) for s, r in samples],
      "phase_ends_s": {k: v - start for k, v in t.items()}}))


def _run(args: list[str]) -> None:
  env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  subprocess.run([sys.executable, "-m", "benchmarks.interop", *args], check=True, cwd=ROOT, env=env)


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--child-build", nargs=1, metavar="HF_DIR")
  p.add_argument("--child-import", nargs=3, metavar=("HF_DIR", "WORKDIR", "OUT_JSON"))
  args = p.parse_args(argv)
  if args.child_build:
    build(Path(args.child_build[0]), args.quick)
    return 0
  if args.child_import:
    child_import(*map(Path, args.child_import))
    return 0

  from benchmarks.common import RESULTS, write
  from benchmarks.dataflow import storage_bandwidth
  from dcmodel.interop.files import dir_bytes
  from dcmodel.perf.optimize import transfer_time_s
  base = ROOT / "runs" if (ROOT / "runs").exists() else None
  with tempfile.TemporaryDirectory(dir=base) as tmp:
    tmp = Path(tmp)
    t = time.perf_counter()
    _run(["--child-build", str(tmp / "hf"), *(["--quick"] if args.quick else [])])
    build_s = time.perf_counter() - t
    os.sync()   # the build's dirty pages, flushed now, would otherwise compete with the import's writes
    ckpt_bytes = sum(f.stat().st_size for f in (tmp / "hf").glob("*.safetensors"))
    write_bw, read_bw = storage_bandwidth(tmp)
    _run(["--child-import", str(tmp / "hf"), str(tmp / "work"), str(tmp / "import.json")])
    got = json.loads((tmp / "import.json").read_text())
    orbax_bytes = dir_bytes(tmp / "work" / "checkpoints")
  predicted_read = transfer_time_s(got["bytes_read"], read_bw)
  predicted_save = transfer_time_s(orbax_bytes, write_bw) + transfer_time_s(orbax_bytes, read_bw)
  extra = got["peak_rss"] - got["baseline_rss"]
  result = {
      "model": QUICK if args.quick else FULL, "params": got["params"], "safetensors_bytes": ckpt_bytes,
      "orbax_checkpoint_bytes": orbax_bytes, "mesh": got["mesh"], "build_s": build_s,
      "storage_calibration": {"write_bw": write_bw, "read_bw": read_bw},
      "baseline_rss": got["baseline_rss"], "peak_rss": got["peak_rss"], "peak_rss_over_baseline": extra,
      "peak_rss_over_baseline_per_checkpoint_byte": extra / ckpt_bytes,
      "peak_rss_by_phase": {k: got[f"peak_rss_{k}"] for k in ("checks", "read", "save")},
      "check_s": got["check_s"], "read_s": got["read_s"], "predicted_read_s": predicted_read,
      "save_s": got["save_s"], "predicted_save_s": predicted_save,
  }
  suffix = "_quick" if args.quick else ""
  write("interop" + suffix, result)
  gb = lambda b: f"{b / 1e9:.2f} GB"
  print(f"import of {got['params'] / 1e6:.0f}M parameters, {gb(ckpt_bytes)} of safetensors, onto mesh {got['mesh']}:")
  print(f"  peak RSS {gb(got['peak_rss'])} = baseline {gb(got['baseline_rss'])} + {gb(extra)} "
        f"({extra / ckpt_bytes:.2f}x the checkpoint); by phase: "
        + ", ".join(f"{k} {gb(v)}" for k, v in result["peak_rss_by_phase"].items()))
  print(f"  read + place {got['read_s']:.2f}s vs bytes / read bandwidth {predicted_read:.2f}s "
        f"({read_bw / 1e9:.2f} GB/s); checkpoint write + verify {got['save_s']:.2f}s vs {predicted_save:.2f}s "
        f"({gb(orbax_bytes)}, write {write_bw / 1e9:.2f} GB/s)")
  plot(got, ckpt_bytes, RESULTS / f"interop{suffix}.png")
  return 0


def plot(got: dict, ckpt_bytes: int, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4))
  ts = [t for t, _ in got["timeline"]]
  ax.plot(ts, [r / 1e9 for _, r in got["timeline"]], label="resident memory")
  for k, style in (("baseline", ":"), ("baseline + checkpoint", "--"), ("baseline + 2 x checkpoint", "-.")):
    level = got["baseline_rss"] + ckpt_bytes * (0 if k == "baseline" else 1 if "2" not in k else 2)
    ax.axhline(level / 1e9, ls=style, color="gray", lw=1, label=k)
  for name, t in got["phase_ends_s"].items():
    ax.axvline(t, color="k", lw=0.5)
    ax.text(t, ax.get_ylim()[1] * 0.98, f" {name}", fontsize=8, va="top")
  ax.set(xlabel="seconds since import_hf started", ylabel="GB", title="import-hf: resident memory")
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
