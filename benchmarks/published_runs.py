"""The planner against published training runs (benchmarks/published_runs.json, sources there).

For each run: the model shape and the layout the run used, predicted by the same step model
`dcmodel plan` uses (`perf.layouts.predict` on the catalog chip), nothing fitted to these
figures. Megatron-LM's Table 1 compares TFLOP/s per GPU as the paper counts them (eq. 3,
which includes the recomputed forward): their eq.-3 FLOPs over our predicted step time. The
held-out runs compare MFU (model FLOPs, no recompute, PaLM's definition).
Writes benchmarks/results/published_runs.json. Run: python -m benchmarks.published_runs
"""

from __future__ import annotations

import json
from pathlib import Path

from dcmodel import hostenv
from dcmodel import models
from dcmodel.perf import hardware
from dcmodel.perf.accounting import megatron_flops, transformer_accounting
from dcmodel.perf.layouts import Layout, predict

DATA = Path(__file__).resolve().parent / "published_runs.json"
RESULTS = Path(__file__).resolve().parent / "results"


def load() -> dict:
  return json.loads(DATA.read_text())


def _predict(model: dict, batch: int, mesh: dict, chip: str, microbatches: int = 1, interleave: int = 1, attention: str = "dense"):
  cfg = models.get_config("gpt", **model)
  acc = transformer_accounting(cfg, batch)
  layout = Layout(mesh["data"], mesh["fsdp"], mesh["model"], mesh["stage"], microbatches, interleave)
  return cfg, acc, predict(acc, cfg, layout, hardware.get(chip), attention=attention)


def megatron(data: dict | None = None) -> list[dict]:
  """Table 1: each row's predicted TFLOP/s per GPU (eq.-3 FLOPs / predicted step / GPUs)."""
  table = (data or load())["megatron_table1"]
  rows = []
  for values in table["rows"]:
    r = dict(zip(table["columns"], values))
    h, t, p, n, b = r["hidden"], r["t"], r["p"], r["gpus"], r["batch"]
    d = n // (t * p)
    model = {**table["model"], "d_model": h, "num_heads": r["heads"], "d_ff": 4 * h, "num_layers": r["layers"]}
    micro = b // d                                    # microbatch of one sequence (see 'assumed')
    cfg, acc, pred = _predict(model, b, {"data": d, "fsdp": 1, "model": t, "stage": p}, table["hardware"], micro,
                              attention=table["attention"])
    tflops = megatron_flops(cfg, b) / pred.step_s / n / 1e12
    rows.append({"params_b": r["params_b"], "layout": pred.layout.name(), "published_tflops": r["tflops_per_gpu"],
                 "predicted_tflops": tflops, "error": tflops / r["tflops_per_gpu"] - 1, "predicted_step_s": pred.step_s,
                 "breakdown_s": _breakdown(pred)})
  return rows


def held_out(data: dict | None = None) -> list[dict]:
  rows = []
  for run in (data or load())["held_out"]:
    _, acc, pred = _predict(run["model"], run["batch"], run["mesh"], run["hardware"], run.get("microbatches", 1),
                            run.get("interleave", 1), run.get("attention", "dense"))
    rows.append({"name": run["name"], "layout": pred.layout.name(), "published_mfu": run["mfu"], "predicted_mfu": pred.mfu,
                 "error": pred.mfu / run["mfu"] - 1, "predicted_step_s": pred.step_s, "breakdown_s": _breakdown(pred)})
  return rows


def _breakdown(pred) -> dict:
  return {"compute": pred.compute_s, "recompute": pred.recompute_s, "memory": pred.memory_s,
          "exposed_comm": pred.exposed_comm_s, "bubble": pred.bubble_s, "exposed_by_collective": pred.exposed_s}


def main(argv=None) -> int:
  data = load()
  meg, extra = megatron(data), held_out(data)
  print(f"Megatron-LM Table 1 (A100, TFLOP/s per GPU incl. recompute, eq. 3)\n{'params':>8s} {'layout':28s} {'published':>9s} "
        f"{'predicted':>9s} {'error':>7s}  compute/recompute/memory/comm/bubble (s)")
  for r in meg:
    b = r["breakdown_s"]
    print(f"{r['params_b']:7.1f}B {r['layout']:28s} {r['published_tflops']:9.0f} {r['predicted_tflops']:9.1f} {r['error']:+6.1%}  "
          f"{b['compute']:.2f}/{b['recompute']:.2f}/{b['memory']:.2f}/{b['exposed_comm']:.2f}/{b['bubble']:.2f}")
  print(f"\nHeld-out runs (MFU)\n{'run':34s} {'layout':30s} {'published':>9s} {'predicted':>9s} {'error':>7s}")
  for r in extra:
    print(f"{r['name']:34s} {r['layout']:30s} {r['published_mfu']:9.1%} {r['predicted_mfu']:9.1%} {r['error']:+6.1%}")
  worst_meg = max(abs(r["error"]) for r in meg)
  worst_extra = max(abs(r["error"]) for r in extra)
  summary = {"megatron_max_abs_error": worst_meg, "held_out_max_abs_error": worst_extra, "pass": worst_meg <= 0.20}
  print(f"\nMegatron worst |error| {worst_meg:.1%} (target <= 20%); held-out worst |error| {worst_extra:.1%}")
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "published_runs.json").write_text(json.dumps({"summary": summary, "megatron_table1": meg, "held_out": extra}, indent=2) + "\n")
  return 0 if summary["pass"] else 1


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
