"""Profile one bare_gpt candidate (or dcmodel's step) and attribute its step time op by op:
  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.profile_bare '{"dense": "ynn"}' NAME
writes benchmarks/results/raw/NAME.hlo and the trace under benchmarks/results/raw/trace_NAME."""

import json
import sys

from benchmarks.experiments_gpt_speed import attribute, bare_gpt  # attribute imports xla_ops first (traceme flag)

import jax  # noqa: E402


def main():
  knobs, name = json.loads(sys.argv[1]), sys.argv[2]
  k = {**bare_gpt.DEFAULTS, **knobs}
  if k["impl"] == "dcmodel":
    step, state, batch = bare_gpt.dcmodel_step(k)
  else:
    step, tx = bare_gpt.make_step(k)
    params = bare_gpt.init(k, jax.random.key(0))
    state = (params, tx.init(params))
    batch = bare_gpt.batch_for(k)
  hlo = step.lower(state, batch).compile().as_text()
  attribute.report(attribute.attribute_step(step, state, batch, hlo, name), top=15)

if __name__ == "__main__":
  main()
