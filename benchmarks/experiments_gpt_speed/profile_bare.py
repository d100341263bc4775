"""Profile one bare_gpt candidate (or dcmodel's step) and attribute its step time op by op:
  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.profile_bare '{"dense": "ynn"}' NAME
writes benchmarks/results/raw/NAME.hlo and the trace under benchmarks/results/raw/trace_NAME."""

import json
import sys

from benchmarks.experiments_gpt_speed import xla_ops  # sets the traceme flag before jax loads
from benchmarks.experiments_gpt_speed import attribute, bare_gpt

import jax  # noqa: E402


def main():
  knobs, name = json.loads(sys.argv[1]), sys.argv[2]
  k = {**bare_gpt.DEFAULTS, **knobs}
  if k["impl"] == "dcmodel":
    step, state, batch = bare_gpt.dcmodel_step(k)
    hlo = None
  else:
    step, tx = bare_gpt.make_step(k)
    params = bare_gpt.init(k, jax.random.key(0))
    state = (params, tx.init(params))
    batch = bare_gpt.batch_for(k)
    hlo = step.lower(state, batch).compile().as_text()
  raw = "benchmarks/results/raw"
  open(f"{raw}/{name}.hlo", "w").write(hlo)
  holder = [state]

  def run(b):
    holder[0], out = step(holder[0], b)
    return out

  xla_ops.profile(run, (batch,), calls=2, trace_dir=f"{raw}/trace_{name}")
  out = attribute.attribute(f"{raw}/trace_{name}", hlo, 2)
  print(f"step wall {out['wall_ms']:.0f} ms per call")
  for c, v in out["by_class_ms"].items():
    print(f"  {c:45s} {v:8.1f} ms  {v / out['wall_ms']:6.1%}")
  for c, v in list(out["top_ops_ms"].items())[:15]:
    print(f"  {c[:110]:110s} {v:7.1f} ms")


if __name__ == "__main__":
  main()
