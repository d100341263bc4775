"""Which kernel library XLA:CPU hands a dot to under each library flag this jaxlib names: one
(4096, 512) x (512, 2048) dot and its GELU compiled with each option set, and the custom fusions
(`__ynn_fusion`, oneDNN, XNNPACK) and plain dots (Eigen) found in the compiled HLO. Compiles only.

  PYTHONPATH=$PWD python -m benchmarks.experiments_gpt_speed.library_flags
"""

import collections
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
OPTIONS = {
    "none": {},
    "ynn_dot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "no_ynn": NO_YNN,
    "onednn_dot": {**NO_YNN, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "onednn_dot_eltwise": {**NO_YNN, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"},
    "onednn_custom_call": {"xla_cpu_experimental_onednn_custom_call": True},
    "use_onednn": {**NO_YNN, "xla_cpu_use_onednn": True},
    "xnn_dot": {**NO_YNN, "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "use_xnnpack": {**NO_YNN, "xla_cpu_use_xnnpack": True},
}


def main():
  x, w = jnp.ones((4096, 512)), jnp.ones((512, 2048))
  lowered = jax.jit(lambda x, w: jax.nn.gelu(x @ w)).lower(x, w)
  for name, options in OPTIONS.items():
    try:
      hlo = lowered.compile(compiler_options=options or None).as_text()
    except Exception as e:   # a name this build does not accept
      print(f"{name:20s} refused: {str(e).splitlines()[0][:100]}")
      continue
    found = collections.Counter(re.findall(r'"kind":"(__\w+)"', hlo))
    entry = re.search(r"^ENTRY.*?\n\}", hlo, re.M | re.S).group(0)    # a dot left in it runs on Eigen
    found.update(custom_call=len(re.findall(r" custom-call\(", entry)), eigen_dot=len(re.findall(r" dot\(", entry)))
    print(f"{name:20s} {dict((k, v) for k, v in found.items() if v)}")


if __name__ == "__main__":
  main()
