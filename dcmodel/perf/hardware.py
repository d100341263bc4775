"""Published accelerator figures. Sources: the JAX scaling book (jax-ml/scaling-book), tpus.md
(TPU table) and gpus.md (GPU table), as quoted in shared/perf-reference.md section 7."""

from __future__ import annotations

import dataclasses
import difflib

from dcmodel.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float          # peak dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bw: float              # bytes/s
  link_bw: float             # one-way bytes/s per device on the fast interconnect (ICI link / NVLink)
  dcn_bw: float              # one-way bytes/s per device across the data-center network
  source: str
  # Share of the peak that large matmuls reach in practice: "H100s and B200s can usually only
  # achieve around 80-85% of the claimed peak FLOPs, while TPUs can get closer to 95%" (SB roofline.md:92).
  achievable: float = 0.95

  @property
  def critical_intensity(self) -> float:
    """FLOPs per HBM byte above which a kernel is compute-bound (peak / bandwidth)."""
    return self.bf16_flops / self.hbm_bw


CATALOG = {c.name: c for c in [
    # TPU: SB tpus.md:192-214 (ICI one-way per link; DCN per chip from tpus.md:214).
    Chip("tpu-v4", 2.75e14, 32e9, 1.2e12, 4.5e10, 6.25e9, "scaling-book tpus.md:192-214 (v4p)"),
    Chip("tpu-v5e", 1.97e14, 16e9, 8.2e11, 4.5e10, 3.125e9, "scaling-book tpus.md:192-214"),
    Chip("tpu-v5p", 4.59e14, 96e9, 2.8e12, 9.0e10, 6.25e9, "scaling-book tpus.md:192-214"),
    Chip("tpu-v6e", 9.20e14, 32e9, 1.6e12, 9.0e10, 12.5e9, "scaling-book tpus.md:192-214"),
    # GPU: SB gpus.md:143-159 (HBM, FLOPs), 280-282 and 349-353 (NVLink per GPU, node egress 400e9/8).
    Chip("a100", 3.1e14, 80e9, 2.0e12, 3.0e11, 400e9 / 8, "scaling-book gpus.md:143-159,280-282", 0.825),
    Chip("h100", 9.9e14, 80e9, 3.4e12, 4.5e11, 400e9 / 8, "scaling-book gpus.md:143-159,349-353", 0.825),
    Chip("h200", 9.9e14, 141e9, 4.8e12, 4.5e11, 400e9 / 8, "scaling-book gpus.md:143-159", 0.825),
]}


def get(name: str) -> Chip:
  if name not in CATALOG:
    close = difflib.get_close_matches(name, CATALOG, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown hardware '{name}'; {hint}known: {', '.join(CATALOG)}")
  return CATALOG[name]


# jax's device_kind strings, as TPU and CUDA runtimes report them, to catalog entries.
DEVICE_KINDS = (("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("tpu v5", "tpu-v5p"),
                ("v6 lite", "tpu-v6e"), ("v6e", "tpu-v6e"), ("tpu v4", "tpu-v4"),
                ("h200", "h200"), ("h100", "h100"), ("a100", "a100"))


def for_device_kind(kind: str) -> Chip | None:
  """The catalog chip a device reports itself as (jax `device.device_kind`), if any."""
  kind = kind.lower()
  return next((CATALOG[name] for key, name in DEVICE_KINDS if key in kind), None)
