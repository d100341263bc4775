"""Serving under load: `dcmodel serve` answering an async HTTP client (aiohttp) at concurrency 1, 4,
16 and 64, for the default `gpt` (stdlib_gpt, 0.8M parameters) and a larger one (25M).

Each server is a `dcmodel serve` process on one CPU device (`--host-devices 1`: slots=1 must
be possible, and one device is this 2-core host's fastest layout for a batch this small), with
randomly initialised weights (speed does not depend on their values; the workdirs are made
here). Every request streams 64 tokens after a 16-64 byte prompt of Python source, greedy,
with token ids, so the client sees each token's arrival: time to first token is the first
event, latency the last. A closed loop: `concurrency` clients, each sending its next request
when the last is answered, from a process of its own at a lower priority than the servers
(`client`: on 2 cores it would otherwise take CPU a remote client would not).

Reported per model and concurrency: requests/s, output tokens/s, p50/p99 latency and time to
first token, failed requests. Beside them:
- continuous batching (16 slots) against one request at a time (1 slot) at concurrency 16,
  interleaved, streamed and as whole answers: three rounds of 256 requests for the default gpt,
  two of 32 for the 25M one; beside the end-to-end ratio, the ratio of tokens per decode step
  time as the servers timed their steps (what the engine alone allows);
- the decode step the server timed (its /metrics) against the memory-bound prediction
  `perf.accounting.decode_step_s`: every weight plus the whole slot pool's KV cache read once
  per step (the step covers all slots at full context), at this host's read bandwidth
  (`perf.calibrate.read_bandwidth`), or the matmuls if slower: at the calibrated square-matmul
  peak, and at the measured rate of a 16-row matmul (a decode step's shape);
- two Ray Serve replicas (one device each) against one, through Ray's proxy, at concurrency
  16 and 64, and how the requests spread (from each replica's own /metrics).
Run: python -m benchmarks.serve [--quick]   (writes results/serve[_quick].json and .png)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")   # as each server replica

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, write  # noqa: E402
from dcmodel import hostenv  # noqa: E402
from dcmodel import experiment as experiment_lib  # noqa: E402
from dcmodel.infer.load import init_workdir  # noqa: E402
from dcmodel.perf import accounting, calibrate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "gpt": [],                                                        # experiments/stdlib_gpt.py as it is
    "gpt_25m": ["model.d_model=512", "model.num_layers=8", "model.num_heads=8", "model.d_ff=2048", "model.max_len=256"],
}
MAX_TOKENS = 64


def prompts(n: int, seed: int = 0) -> list[str]:
  """Windows of 16-64 bytes of the standard library's source (ASCII files only)."""
  rng = np.random.default_rng(seed)
  files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
  texts = [t for t in (f.read_text(errors="ignore") for f in files[:200]) if t.isascii() and len(t) > 200]
  out = []
  for _ in range(n):
    t = texts[rng.integers(len(texts))]
    length = int(rng.integers(16, 65))
    at = int(rng.integers(0, len(t) - length))
    out.append(t[at:at + length])
  return out


def workdir(root: Path, name: str):
  cfg = experiment_lib.load(ROOT / "experiments" / "stdlib_gpt.py", ["train.progress=false", *MODELS[name]])
  path = root / name
  if not (path / "checkpoints").exists():
    init_workdir(cfg, path)
  return cfg, path


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """A `dcmodel serve` process on one device."""

  def __init__(self, path: Path, slots: int, queue: int = 512):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "dcmodel.cli", "--host-devices", "1", "serve", str(path / "config.json"), "--workdir", str(path),
         "--port", str(self.port), "--slots", str(slots), "--queue", str(queue)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""})
    wait_healthy(self.url, self.proc)

  def stop(self):
    self.proc.send_signal(signal.SIGTERM)
    self.proc.communicate(timeout=120)


def wait_healthy(url: str, proc=None, timeout: float = 600):
  t = time.time()
  while time.time() - t < timeout:
    if proc is not None and proc.poll() is not None:
      raise RuntimeError(f"server exited: {proc.stdout.read()[-2000:]}")
    try:
      if httpx.get(url + "/healthz", timeout=5).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  raise RuntimeError(f"{url} not healthy after {timeout}s")


async def _load(url: str, concurrency: int, texts: list[str], stream: bool) -> tuple[list[dict], float]:
  todo = list(enumerate(texts))
  records = []
  connector = aiohttp.TCPConnector(limit=concurrency + 4)
  async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
    async def worker():
      while todo:
        _, text = todo.pop()
        body = {"prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream, "return_token_ids": True}
        t0, first, tokens, status = time.perf_counter(), None, 0, None
        try:
          async with session.post(url + "/v1/completions", json=body) as r:
            status = r.status
            if not stream:
              tokens = len((await r.json())["choices"][0]["token_ids"])
            else:
              async for line in r.content:
                if line.startswith(b"data: {"):
                  got = json.loads(line[6:])
                  n = sum(len(c.get("token_ids") or []) for c in got.get("choices", []))
                  if n and first is None:
                    first = time.perf_counter()
                  tokens += n
        except aiohttp.ClientError as e:
          status = type(e).__name__
        end = time.perf_counter()
        records.append({"status": status, "latency_s": end - t0, "ttft_s": (first or end) - t0, "tokens": tokens})
    t = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return records, time.perf_counter() - t


def _run_load(url: str, concurrency: int, texts: list[str], stream: bool) -> tuple[list[dict], float]:
  return asyncio.run(_load(url, concurrency, texts, stream))


@functools.cache
def client() -> concurrent.futures.ProcessPoolExecutor:
  """The load generator's own process, at a lower priority (nice 10) than the servers. It shares
  this host's 2 cores with the servers it measures; lowered, it takes the CPU they leave, as
  clients on other machines would. At equal priority, in one interleaved run of 3 rounds (256
  requests, 16 clients), it held the 16-slot server to 0.86x its tokens/s streamed (0.93x whole
  answers) and the 1-slot server to 1.01x / 0.99x."""
  return concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice,
                                               initargs=(10,))


def load(url: str, concurrency: int, requests: int, seed: int = 0, stream: bool = True) -> dict:
  """A closed loop of `concurrency` clients (in the client process); streamed (time to first token
  seen) or not."""
  records, wall = client().submit(_run_load, url, concurrency, prompts(requests, seed), stream).result()
  ok = [r for r in records if r["status"] == 200 and r["tokens"] == MAX_TOKENS]
  lat, ttft = np.array([r["latency_s"] for r in ok]), np.array([r["ttft_s"] for r in ok] if stream else [])
  pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")
  return {"concurrency": concurrency, "requests": requests, "stream": stream, "failed": len(records) - len(ok), "wall_s": wall,
          "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
          "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99), "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}


def scrape(url: str) -> str:
  return httpx.get(url + "/metrics", timeout=30).text


def series(text: str, name: str, **labels) -> float:
  """Sum of a metric's samples whose labels include `labels`."""
  total = 0.0
  for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
    got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    if all(got.get(k) == v for k, v in labels.items()):
      total += float(m.group(2))
  return total


def decode_window(before: str, after: str) -> dict:
  """The server's decode steps between two scrapes: steps, mean step time, mean busy slots."""
  d = lambda name: series(after, name, kind="decode") - series(before, name, kind="decode")
  steps, seconds, rows = d("dcmodel_step_seconds_count"), d("dcmodel_step_seconds_sum"), d("dcmodel_step_rows_total")
  return {"decode_steps": steps, "decode_step_s": seconds / max(steps, 1), "mean_busy_slots": rows / max(steps, 1),
          "decode_tokens_per_s": rows / max(seconds, 1e-9)}


def skinny_matmul_flops(rows: int, d: int, f: int) -> float:
  """FLOP/s of (rows x d) @ (d x f), the shape of a decode step's weight matmuls (8 chained in
  one call, so dispatch is not what is timed). The square-matmul peak overstates it: XLA:CPU
  runs a 16-row matmul far below its peak."""
  x, ws = jnp.ones((rows, d)), [jnp.ones((d, f)) * (i + 1) for i in range(8)]
  fn = jax.jit(lambda x, ws: sum(jnp.sum(x @ w) for w in ws))
  return 8 * 2 * rows * d * f / float(np.median(calibrate.timed_calls(fn, x, ws, repeats=15)))


def predicted_decode(cfg, slots: int, bw: float, peak: float) -> dict:
  """One decode step of the whole slot pool (the step always covers every slot at full
  context): read every weight and the pool's KV cache once, or the matmuls if they take
  longer, at the square-matmul peak (`decode_step_s` as perf states it) and at the measured
  rate of a `slots`-row matmul (what this CPU does with a decode step's shapes)."""
  m = cfg.model
  params = accounting.transformer_params(m)
  kv = accounting.kv_cache_bytes(m, slots, m.max_len)
  flops = 2 * slots * params + 4 * slots * m.max_len * m.num_layers * m.d_model
  step = accounting.decode_step_s(4 * params, kv, bw, flops, peak)
  rows_rate = skinny_matmul_flops(slots, m.d_model, m.d_ff)
  step_rows = accounting.decode_step_s(4 * params, kv, bw, flops, rows_rate)
  return {"params": params, "param_bytes": 4 * params, "kv_cache_bytes": kv, "flops": flops, "decode_step_s": step,
          "bound": "memory" if (4 * params + kv) / bw >= flops / peak else "compute",
          "full_pool_tokens_per_s": slots / step, "matmul_flops_at_slots_rows": rows_rate,
          "decode_step_s_at_row_rate": step_rows,
          "bound_at_row_rate": "memory" if (4 * params + kv) / bw >= flops / rows_rate else "compute"}


def measure_model(name: str, cfg, path: Path, levels: list[int], slots: int, bw: float, peak: float, quick: bool) -> dict:
  server = Server(path, slots)
  rows = []
  try:
    load(server.url, 4, 8, seed=99)                                   # first requests after the compiles
    for c in levels:
      before = scrape(server.url)
      got = load(server.url, c, (4 if quick else 8) if c == 1 else max(16, 4 * c) // (2 if quick else 1), seed=c)
      got.update(decode_window(before, scrape(server.url)))
      rows.append(got)
      print(f"  {name} c={c:3d}: {got['requests_per_s']:6.2f} req/s {got['output_tokens_per_s']:8.0f} tok/s  latency p50 "
            f"{got['latency_p50_s']:.3f} p99 {got['latency_p99_s']:.3f} s  ttft p50 {got['ttft_p50_s']:.3f} p99 "
            f"{got['ttft_p99_s']:.3f} s  failed {got['failed']}  decode step {1e3 * got['decode_step_s']:.2f} ms "
            f"({got['mean_busy_slots']:.1f} busy)", flush=True)
  finally:
    server.stop()
  pred = predicted_decode(cfg, slots, bw, peak)
  for r in rows:
    r["decode_step_measured_over_predicted"] = r["decode_step_s"] / pred["decode_step_s"]
    r["decode_step_measured_over_predicted_at_row_rate"] = r["decode_step_s"] / pred["decode_step_s_at_row_rate"]
    r["predicted_decode_tokens_per_s_at_busy"] = r["mean_busy_slots"] / pred["decode_step_s"]
  return {"model": name, "overrides": MODELS[name], "slots": slots, "predicted": pred, "rows": rows}


def batching_vs_one_at_a_time(path: Path, rounds: int, requests: int) -> dict:
  """slots=16 against slots=1 at concurrency 16, interleaved; streamed (as the table) and not
  (one answer per request: what is left is the engine, not a per-token HTTP event)."""
  servers = {16: Server(path, 16), 1: Server(path, 1)}
  out = {(slots, stream): [] for slots in servers for stream in (True, False)}
  try:
    for s in servers.values():
      load(s.url, 4, 8, seed=99)
    for r in range(rounds):
      for stream in (True, False):
        for slots, s in servers.items():
          before = scrape(s.url)
          got = load(s.url, 16, requests, seed=100 + r, stream=stream)
          got.update(decode_window(before, scrape(s.url)))
          out[slots, stream].append(got)
          print(f"  slots={slots:2d} c=16 {'streamed' if stream else 'whole   '} round {r}: {got['output_tokens_per_s']:.0f} tok/s, "
                f"decode step {1e3 * got['decode_step_s']:.2f} ms ({got['mean_busy_slots']:.1f} busy), failed {got['failed']}", flush=True)
  finally:
    for s in servers.values():
      s.stop()
  mean = {k: float(np.mean([g["output_tokens_per_s"] for g in v])) for k, v in out.items()}
  result = {"concurrency": 16, "target": 4.0, "failed": sum(g["failed"] for v in out.values() for g in v)}
  for stream, name in ((True, "streamed"), (False, "whole")):
    # what the engine alone allows: tokens per decode step time, as the servers timed their steps
    step = {k: float(np.mean([g["decode_tokens_per_s"] for g in v])) for k, v in out.items()}
    result[name] = {"rounds_slots16": out[16, stream], "rounds_slots1": out[1, stream], "tokens_per_s_slots16": mean[16, stream],
                    "tokens_per_s_slots1": mean[1, stream], "speedup": mean[16, stream] / mean[1, stream],
                    "decode_step_speedup": step[16, stream] / step[1, stream]}
  return result


def ray_replicas(cfg, path: Path, requests: int) -> dict:
  """Two Ray Serve replicas against one, through Ray's proxy; the spread from each replica's /metrics."""
  from dcmodel.serve import replicas
  from dcmodel.serve.app import Options
  out = {}
  for n in (2, 1):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    replicas.start(cfg, path, Options(slots=16, queue=512), port=port, replicas=n, host_devices=1)
    try:
      seen = {}
      while len(seen) < n:                       # every replica compiled (each scrape is one replica's)
        h = httpx.get(url + "/healthz", timeout=30).json()
        if h["status"] == "ok":
          seen[h["replica"]] = True
        time.sleep(0.2)
      load(url, 8, 16, seed=99)
      base = {}
      for _ in range(400):
        text = scrape(url)
        base.setdefault(re.search(r'replica="([^"]+)"', text).group(1), text)
        if len(base) == n:
          break
      rows = [load(url, c, requests if c == 16 else 2 * requests, seed=200 + c) for c in (16, 64)]
      per = {}
      for _ in range(400):
        text = scrape(url)
        name = re.search(r'replica="([^"]+)"', text).group(1)
        served = lambda t: series(t, "dcmodel_requests_total", endpoint="/v1/completions", status="200")
        per[name] = served(text) - served(base[name])
        if len(per) == n:
          break
      out[n] = {"rows": rows, "requests_per_replica": per}
      print(f"  ray {n} replica(s): c=16 {rows[0]['output_tokens_per_s']:.0f} tok/s, c=64 {rows[1]['output_tokens_per_s']:.0f} "
            f"tok/s, failed {rows[0]['failed'] + rows[1]['failed']}; requests per replica {per}", flush=True)
    finally:
      replicas.stop()
  return {"replicas_2": out[2], "replicas_1": out[1],
          "speedup_c16": out[2]["rows"][0]["output_tokens_per_s"] / out[1]["rows"][0]["output_tokens_per_s"],
          "speedup_c64": out[2]["rows"][1]["output_tokens_per_s"] / out[1]["rows"][1]["output_tokens_per_s"]}


def plot(models: list[dict], batching: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for m in models:
    c = [r["concurrency"] for r in m["rows"]]
    a.plot(c, [r["output_tokens_per_s"] for r in m["rows"]], "o-", label=f"{m['model']} ({m['predicted']['params'] / 1e6:.1f}M), "
           f"{m['slots']} slots")
    b.plot(c, [r["latency_p99_s"] for r in m["rows"]], "o-", label=m["model"])
  for one, color in zip(batching, ("C0", "C1")):
    a.plot([16], [one["streamed"]["tokens_per_s_slots1"]], "x", color=color, ms=9,
           label=f"{one['model']}, 1 slot (one request at a time)")
  for ax, what in ((a, "output tokens/s"), (b, "p99 latency (s)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  a.set_title(f"throughput, {MAX_TOKENS} tokens per request")
  b.set_title("p99 latency (whole request)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="the default gpt at concurrency 1 and 16, no larger model, no Ray")
  p.add_argument("--workdirs", default=None, help="where the random-weight workdirs go (default: a temporary directory)")
  p.add_argument("--no-ray", action="store_true")
  args = p.parse_args(argv)
  root = Path(args.workdirs or tempfile.mkdtemp(prefix="dcmodel-bench-serve-"))
  peak, bw = calibrate.matmul_peak((512, 1024)), calibrate.read_bandwidth(256)
  print(f"calibration on {jax.device_count()} device: matmul {peak / 1e9:.0f} GFLOP/s, read {bw / 1e9:.1f} GB/s", flush=True)
  levels = [1, 16] if args.quick else [1, 4, 16, 64]
  models = []
  for name in (["gpt"] if args.quick else list(MODELS)):
    cfg, path = workdir(root, name)
    models.append(measure_model(name, cfg, path, levels, 16, bw, peak, args.quick))
  gpt_cfg, gpt_path = workdir(root, "gpt")
  batching = batching_vs_one_at_a_time(gpt_path, 1 if args.quick else 3, 16 if args.quick else 256)
  batching["model"] = "gpt"
  batching_25m = None
  if not args.quick:     # where the weights, not the slots' KV cache, are most of what a step reads
    batching_25m = {"model": "gpt_25m", **batching_vs_one_at_a_time(workdir(root, "gpt_25m")[1], 2, 32)}
  ray = None if args.quick or args.no_ray else ray_replicas(gpt_cfg, gpt_path, 48)
  client().shutdown()
  name = "serve" + ("_quick" if args.quick else "")
  plot(models, [b for b in (batching, batching_25m) if b], RESULTS / f"{name}.png")
  write(name, {"max_tokens": MAX_TOKENS, "server_devices": 1, "cores": os.cpu_count(),
               "calibration": {"matmul_flops": peak, "read_bw": bw}, "models": models, "batching_vs_one_at_a_time": batching,
               "batching_vs_one_at_a_time_25m": batching_25m, "ray": ray})
  for b in (batching, batching_25m):
    if b:
      print(f"continuous batching, {b['model']} at concurrency 16: {b['streamed']['speedup']:.1f}x (streamed), "
            f"{b['whole']['speedup']:.1f}x (whole answers) the tokens/s of one request at a time (target {b['target']:.0f}x); "
            f"per decode step as the servers timed them: {b['streamed']['decode_step_speedup']:.1f}x / {b['whole']['decode_step_speedup']:.1f}x")
  for m in models:
    for r in m["rows"]:
      pr = m["predicted"]
      print(f"{m['model']} c={r['concurrency']}: decode step {1e3 * r['decode_step_s']:.2f} ms vs {1e3 * pr['decode_step_s']:.2f} ms "
            f"predicted ({pr['bound']}-bound; measured/predicted {r['decode_step_measured_over_predicted']:.2f}); at the "
            f"{m['slots']}-row matmul rate ({pr['matmul_flops_at_slots_rows'] / 1e9:.0f} GFLOP/s) {1e3 * pr['decode_step_s_at_row_rate']:.2f} ms "
            f"({pr['bound_at_row_rate']}-bound; {r['decode_step_measured_over_predicted_at_row_rate']:.2f})")
  if ray:
    print(f"Ray Serve, 2 replicas vs 1: {ray['speedup_c16']:.2f}x at c=16, {ray['speedup_c64']:.2f}x at c=64")
  failed = sum(r["failed"] for m in models for r in m["rows"]) + batching["failed"] + (batching_25m or {}).get("failed", 0)
  return 0 if failed == 0 else 1


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
