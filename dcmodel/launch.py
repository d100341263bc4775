"""Many processes: `dcmodel launch` on one machine, `jax.distributed` everywhere.

On one machine, `launch --processes N` starts N copies of a `dcmodel` command, each with its
share of simulated CPU devices, joined by jax.distributed with CPU (gloo) collectives. On a
cluster, start one `dcmodel train ...` per host the cluster's way (srun, a TPU pod's
`--worker=all`, ...): `initialize()` calls `jax.distributed.initialize()` with no arguments,
and JAX's own auto-detection (SLURM, TPU pods, JAX_COORDINATOR_ADDRESS/...) does the rest.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

ENV_COORDINATOR = "DCMODEL_COORDINATOR"
ENV_NUM_PROCESSES = "DCMODEL_NUM_PROCESSES"
ENV_PROCESS_ID = "DCMODEL_PROCESS_ID"
# Variables whose presence means a cluster launcher started us; JAX auto-detects from them.
CLUSTER_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS")


def initialize() -> str | None:
  """Join the process group if this process is one of several; returns what was detected."""
  import jax
  if os.environ.get(ENV_NUM_PROCESSES):
    n, i = int(os.environ[ENV_NUM_PROCESSES]), int(os.environ[ENV_PROCESS_ID])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ[ENV_COORDINATOR], num_processes=n, process_id=i)
    how = f"dcmodel launch: process {i} of {n} via {os.environ[ENV_COORDINATOR]}"
  elif any(k in os.environ for k in CLUSTER_HINTS):
    jax.distributed.initialize()
    how = f"cluster auto-detected ({', '.join(k for k in CLUSTER_HINTS if k in os.environ)})"
  else:
    return None
  print(f"[dcmodel] {how}: {jax.process_count()} processes, {jax.local_device_count()} local / "
        f"{jax.device_count()} global {jax.devices()[0].platform} devices", flush=True)
  return how


STOPPED = (128 + signal.SIGTERM, 128 + signal.SIGINT)   # a child that stopped on a signal, with a checkpoint


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(processes: int, devices_per_process: int, argv: list[str]) -> int:
  """Run `dcmodel <argv>` as `processes` cooperating processes; the first failure stops all.

  SIGTERM and SIGINT sent to the launcher are passed to every child (each stops at the same step
  with a checkpoint, train/preemption.py), and the launcher exits with their status. A child that
  gets the signal directly as well (Ctrl-C reaches the whole terminal process group) takes it once."""
  port = _free_port()
  children = []
  received: list[int] = []

  def forward(signum, frame):
    received.append(signum)
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    for i in range(processes):
      flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
      env = dict(os.environ, **{ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(processes),
                                ENV_PROCESS_ID: str(i), "XLA_FLAGS": flags.strip()})
      cmd = [sys.executable, "-m", "dcmodel.cli", "--host-devices", str(devices_per_process), *argv]
      children.append(subprocess.Popen(cmd, env=env, stdout=None if i == 0 else subprocess.DEVNULL))
      if received:                  # a signal while starting them: the new child gets it too
        children[-1].send_signal(received[0])
    code = 0
    running = list(children)
    while running:
      for child in list(running):
        rc = child.poll()
        if rc is None:
          continue
        running.remove(child)
        rc = 128 - rc if rc < 0 else rc     # killed by signal N (after its handlers were gone): the shell's 128 + N
        if rc != 0 and code == 0:
          code = rc
          if rc not in STOPPED:     # a failure, not a stop: the others cannot go on alone (and a
            for other in running:   # SIGTERM would only ask them to sync with the dead one)
              other.send_signal(signal.SIGKILL)
      time.sleep(0.1)
    return code
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
