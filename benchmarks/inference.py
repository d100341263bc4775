"""Generation speed of the default `gpt` experiment vs the performance model's prefill
(compute-bound) and decode (memory-bound) predictions, on this host as calibrated in the same run.

Measured: time to first token (the prefill of the prompts plus the first pick), decode tokens
per second and per-token latency, each the median of repeats after a warm-up call (compiles
excluded), blocked on. Weights are freshly initialised: speed does not depend on their values.
Run: python -m benchmarks.inference [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

from benchmarks.common import write  # noqa: E402
from dcmodel import hostenv  # noqa: E402
from dcmodel import experiment as experiment_lib  # noqa: E402
from dcmodel.infer.generate import Generator, Sampling  # noqa: E402
from dcmodel.perf import accounting, calibrate  # noqa: E402
from dcmodel.train import state as state_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cfg, devices, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
  placed = state_lib.place(cfg, devices)
  mesh = placed.mesh
  gen = Generator(placed, placed.init())
  prompts = [bytes((97 + (i + j) % 26) for j in range(prompt_len)) for i in range(batch)]
  sampling = Sampling(max_new_tokens=new)
  gen(prompts, sampling)                                    # compile prefill and decode
  runs = [gen(prompts, sampling) for _ in range(repeats)]
  ttft = [r.prefill_s for r in runs]
  per_token = [r.decode_s / (new - 1) for r in runs]
  return {"mesh": dict(mesh.shape), "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new,
          "time_to_first_token_s": statistics.median(ttft), "ttft_spread": (max(ttft) - min(ttft)) / statistics.median(ttft),
          "per_token_latency_s": statistics.median(per_token),
          "per_token_spread": (max(per_token) - min(per_token)) / statistics.median(per_token),
          "decode_tokens_per_s": batch / statistics.median(per_token)}


def predict(cfg, batch: int, prompt_len: int, new: int, peak: float, bw: float) -> dict:
  m = cfg.model
  params = accounting.transformer_params(m)
  param_bytes = 4 * params                                  # float32 weights read once per step
  # decode: at the mean context length the cache is read once per token; the matmuls are 2·B·N FLOPs
  kv = accounting.kv_cache_bytes(m, batch, prompt_len + new // 2)
  decode = accounting.decode_step_s(param_bytes, kv, bw, 2 * batch * params, peak)
  prefill_cfg = dataclasses.replace(m, max_len=prompt_len)
  fwd, _ = accounting.transformer_flops(prefill_cfg, batch)
  return {"param_bytes": param_bytes, "kv_cache_bytes": kv, "decode_step_s": decode,
          "decode_tokens_per_s": batch / decode, "decode_bound": "memory" if (kv + param_bytes) / bw >= 2 * batch * params / peak else "compute",
          "prefill_s": accounting.prefill_s(fwd, peak, param_bytes, bw), "prefill_flops": fwd}


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  args = p.parse_args(argv)
  cfg = experiment_lib.load(os.path.join(ROOT, "experiments", "stdlib_gpt.py"))
  # decoding reads weights and cache: the read bandwidth of this host is its memory bound
  peak, bw = calibrate.matmul_peak((512, 1024)), calibrate.read_bandwidth(256)
  prompt_len, new = 64, 64
  rows = []
  for devices, batch in [(None, 8), (jax.devices()[:1], 1), (jax.devices()[:1], 8)][: 1 if args.quick else 3]:
    c = cfg if devices is None else dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1))
    got = run(c, devices, batch, prompt_len, new, repeats=3 if args.quick else 5)
    pred = predict(c, batch, prompt_len, new, peak, bw)
    got.update({"predicted": pred, "decode_measured_over_predicted_throughput": got["decode_tokens_per_s"] / pred["decode_tokens_per_s"],
                "prefill_measured_over_predicted_time": got["time_to_first_token_s"] / pred["prefill_s"]})
    rows.append(got)
  write("inference" + ("_quick" if args.quick else ""), {"experiment": "stdlib_gpt", "calibration": {"matmul_flops": peak, "read_bw": bw},
                                                          "rows": rows})
  for r in rows:
    pr = r["predicted"]
    print(f"mesh {r['mesh']} batch {r['batch']}: first token {1e3 * r['time_to_first_token_s']:.1f} ms (predicted {1e3 * pr['prefill_s']:.2f}), "
          f"decode {r['decode_tokens_per_s']:.0f} tokens/s, {1e3 * r['per_token_latency_s']:.2f} ms/token "
          f"(memory-bound prediction {pr['decode_tokens_per_s']:.0f} tokens/s; measured/predicted "
          f"{r['decode_measured_over_predicted_throughput']:.3f})")
  return 0


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
