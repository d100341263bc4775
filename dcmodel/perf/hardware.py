"""Published accelerator figures. Sources: the JAX scaling book (jax-ml/scaling-book), tpus.md
(TPU table) and gpus.md (GPU table), as quoted in shared/perf-reference.md section 7; the
achievable shares below cite their own sources.

A chip is also what a calibrated host looks like to the step model (`from_calibration`): the
same fields, measured instead of published, so the host and the catalog chips share one path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from dcmodel.errors import UserError

# Achievable shares, few and physical (never fitted to a published training run):
# - Large bf16 matmuls: "H100s and B200s can usually only achieve around 80-85% of the claimed
#   peak FLOPs, while TPUs can get closer to 95%" (SB roofline.md:92). Measured maximum achievable
#   matmul FLOPS (stas00/ml-engineering compute/accelerator/README.md, MAMF table): A100 SXM 267.9 of
#   312 TFLOP/s (85.9%), H100 SXM 792.1 of 989 (80.1%).
# - HBM: streaming copies reach ~90% of the rated bandwidth (STREAM-style measurements; we use 0.9).
# - Collectives: "difficult in practice to exceed 370 GB/s" on H100's 450 GB/s NVLink (SB gpus.md:435),
#   0.82 of the link; we use 0.8 for every fabric.
HBM_EFFICIENCY = 0.9
LINK_EFFICIENCY = 0.8


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float          # peak dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bw: float              # bytes/s
  link_bw: float             # one-way bytes/s per device on the fast interconnect (ICI link / NVLink)
  dcn_bw: float              # one-way bytes/s per device across the data-center network
  source: str
  achievable: float = 0.95   # share of the peak that large matmuls reach (see the sources above)
  # Matmul efficiency by shape: achievable x n / (n + matmul_half_dim), n the smaller output
  # dimension. A matmul narrower than the hardware tile (TPU MXU 128x128, 256x256 on v6e; a GPU
  # thread block's 128-256 wide tile) leaves the rest of the tile idle; the half-efficiency point
  # sits at the tile edge. The contraction dimension enters through the roofline (operand bytes).
  # Checked against XLA's measured H100 bf16 matmul table (openxla, xla/service/gpu/model/
  # matmul_interpolator_data.h, sm_90), m x n x k -> measured vs this curve: 4096x512x4096 650 vs
  # 634 TFLOP/s, 4096x1024x4096 738 vs 704, 4096^3 783 vs 768. Its small matmuls (a few GFLOP) run
  # further below, by a few microseconds of launch latency the curve leaves out; a training
  # step's matmuls take milliseconds.
  matmul_half_dim: float = 128.0
  hbm_efficiency: float = HBM_EFFICIENCY
  link_efficiency: float = LINK_EFFICIENCY
  domain: int = 8            # chips on the fast interconnect: a GPU node (NVSwitch) or a TPU slice/pod (ICI)
  torus_dims: int = 0        # 0: a switch (every GPU reaches every other at link_bw); 2 or 3: a TPU torus
  operand_bw: float | None = None   # bandwidth matmul operands stream at (None: HBM)
  overlap: bool = True       # collectives may run under compute (False on a host whose devices share cores)
  collectives: dict | None = None   # fitted {name: {"alpha_s", "bw"}} per collective (a calibrated host)

  @property
  def critical_intensity(self) -> float:
    """FLOPs per HBM byte above which a kernel is compute-bound (peak / bandwidth)."""
    return self.bf16_flops / self.hbm_bw

  def matmul_efficiency(self, narrow: float) -> float:
    """Share of the peak a matmul whose smaller output dimension is `narrow` reaches."""
    return self.achievable * narrow / (narrow + self.matmul_half_dim)

  def axis_bandwidth(self, size: int, inner: int) -> float:
    """One-way bytes/s per device for a collective over a mesh axis of `size` devices whose
    neighbours along the axis are `inner` devices apart (the product of the axes inside it).
    Inside the fast domain: a switch gives each GPU its link; a torus gives each axis a
    bidirectional ring per physical dimension it spans (SB sharding.md:326-336). An axis that
    leaves the domain crosses the data-center network: its k members per domain pool their
    network ports, so k x dcn_bw (a DGX node's 8 rails; one slice's chips on DCN), unless the
    k-way in-domain phase is slower."""
    if size <= 1:
      return math.inf
    if inner * size <= self.domain:
      if not self.torus_dims:
        return self.link_bw * self.link_efficiency
      side = round(self.domain ** (1 / self.torus_dims))
      spans = min(self.torus_dims, max(1, math.ceil(math.log(size) / math.log(side) - 1e-9)))
      return 2 * self.link_bw * spans * self.link_efficiency
    per_domain = min(max(1, self.domain // inner), size)
    # hierarchical: the network phase at the pooled ports, the in-domain phase at ICI; the slower one sets the pace
    return min(per_domain * self.dcn_bw * self.link_efficiency, self.axis_bandwidth(per_domain, inner))


CATALOG = {c.name: c for c in [
    # TPU: SB tpus.md:192-214 (ICI one-way per link; DCN per chip from tpus.md:214). Domain = the
    # largest slice on ICI (v4 16x16x16, v5p 16x20x28, v5e and v6e 16x16).
    Chip("tpu-v4", 2.75e14, 32e9, 1.2e12, 4.5e10, 6.25e9, "scaling-book tpus.md:192-214 (v4p)",
         domain=4096, torus_dims=3),
    Chip("tpu-v5e", 1.97e14, 16e9, 8.2e11, 4.5e10, 3.125e9, "scaling-book tpus.md:192-214", domain=256, torus_dims=2),
    Chip("tpu-v5p", 4.59e14, 96e9, 2.8e12, 9.0e10, 6.25e9, "scaling-book tpus.md:192-214", domain=8960, torus_dims=3),
    # v6e's MXU is 256x256 (SB tpus.md), so narrow matmuls lose twice as much of it.
    Chip("tpu-v6e", 9.20e14, 32e9, 1.6e12, 9.0e10, 12.5e9, "scaling-book tpus.md:192-214", matmul_half_dim=256.0,
         domain=256, torus_dims=2),
    # GPU: SB gpus.md:143-159 (HBM, FLOPs), 280-282 and 349-353 (NVLink per GPU); 8 GPUs per node.
    # A100 network: DGX A100 has 8 x 200 Gb/s HDR InfiniBand, 25 GB/s per GPU (arXiv:2104.04473 s5);
    # H100/H200: 400 Gb/s per GPU, node egress 400e9 / 8 GPUs (SB gpus.md:459).
    Chip("a100", 3.12e14, 80e9, 2.0e12, 3.0e11, 25e9, "scaling-book gpus.md:143-159,280-282; MAMF 267.9/312", 0.859),
    Chip("h100", 9.89e14, 80e9, 3.35e12, 4.5e11, 400e9 / 8, "scaling-book gpus.md:143-159,349-353; MAMF 792.1/989", 0.801),
    Chip("h200", 9.89e14, 141e9, 4.8e12, 4.5e11, 400e9 / 8, "scaling-book gpus.md:143-159", 0.801),
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


def from_calibration(cal) -> Chip:
  """This host as `perf.calibrate` measured it, per simulated device: the measured matmul rate
  and its shape curve, the rate XLA's elementwise fusions move bytes, each collective's fitted
  alpha-beta. The devices share the cores, so nothing overlaps; matmul operands stream from
  cache (the fitted curve already holds what they cost)."""
  n, half = cal.devices, cal.matmul_half_dim
  # the curve is 1 at the calibration's wide matmuls (calibrate.SHAPE_DEPTH = 1024), where the peak was measured
  return Chip("host", cal.matmul_flops / n, math.inf, cal.mem_bw / n, math.inf, math.inf, f"calibrated ({cal.platform})",
              achievable=(1024 + half) / 1024, matmul_half_dim=half, hbm_efficiency=1.0, link_efficiency=1.0,
              domain=n, operand_bw=math.inf, overlap=False, collectives=cal.collectives)
