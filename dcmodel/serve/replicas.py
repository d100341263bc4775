"""Scale-out on an existing engine: many serving replicas behind Ray Serve's proxy.

Each replica is the same ASGI app `dcmodel serve` runs (its own Service: model, engine,
metrics), in its own Ray actor process with its own devices (on CPU, `host_devices` simulated
ones set through the actor's environment before JAX starts). Ray's HTTP proxy routes each
request to a replica (power of two choices over their queue lengths) and its autoscaler adds
or removes replicas between `replicas` and `max_replicas` to keep about
`target_ongoing_requests` in flight on each. dcmodel writes no balancer of its own.

With `--results DIR`, each replica appends to its own store, DIR/<replica id> (one writer per
store); `dcmodel query` reads each.

Needs the optional extra: pip install 'dcmodel[serve-ray]'.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path

import ray
from ray import serve

from dcmodel.config import Config
from dcmodel.serve.app import Options, Service, build_app, share_the_gil

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])   # the directory holding `dcmodel`


class Replica:
  """One Ray Serve replica: the Service is built in the actor's process, then its app."""

  def __init__(self, cfg: Config, workdir: str, options: Options, step: int | None):
    if options.results:
      tag = serve.get_replica_context().replica_tag
      options = dataclasses.replace(options, results=os.path.join(options.results, tag))
    self.service = Service.load(cfg, workdir, options, step)
    share_the_gil()

  def __serve_build_asgi_app__(self):
    return build_app(self.service)


def deployment(options: Options, replicas: int = 2, max_replicas: int | None = None, target_ongoing_requests: float | None = None,
               host_devices: int = 1, cpus_per_replica: float | None = None):
  """The Ray Serve deployment of `Replica` with these scaling settings."""
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={host_devices}",
         "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)}
  scaling = ({"num_replicas": replicas} if not max_replicas else
             {"autoscaling_config": {"min_replicas": replicas, "initial_replicas": replicas, "max_replicas": max_replicas,
                                     "target_ongoing_requests": target_ongoing_requests or options.slots}})
  cpus = cpus_per_replica if cpus_per_replica is not None else max(0.1, (os.cpu_count() or 1) / (max_replicas or replicas))
  return serve.deployment(
      serve.ingress()(Replica), name="dcmodel",
      # A replica takes its slots plus its queue. The proxy holds up to what all replicas take
      # together (a burst within capacity waits to be routed instead of being shed), then 503s.
      max_ongoing_requests=options.slots + options.queue,
      max_queued_requests=(options.slots + options.queue) * (max_replicas or replicas),
      ray_actor_options={"num_cpus": cpus, "runtime_env": {"env_vars": env}},
      health_check_period_s=10, graceful_shutdown_timeout_s=120, **scaling)


def start(cfg: Config, workdir, options: Options, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2,
          max_replicas: int | None = None, target_ongoing_requests: float | None = None, host_devices: int = 1,
          step: int | None = None, address: str | None = None):
  """Start Ray (or join `address`), its proxy on host:port and the replicas; returns once they
  are up. `stop()` ends them."""
  if not ray.is_initialized():
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             **({} if address else {"num_cpus": os.cpu_count()}))
  serve.start(http_options={"host": host, "port": port})
  app = deployment(options, replicas, max_replicas, target_ongoing_requests, host_devices).bind(
      cfg, str(Path(workdir).absolute()), options, step)
  return serve.run(app, name="dcmodel", route_prefix="/")


def stop() -> None:
  serve.shutdown()
  ray.shutdown()


def serve_replicas(args, cfg: Config) -> int:
  """`dcmodel serve ... --replicas N [--max-replicas M]`: run until SIGTERM / SIGINT."""
  options = Options(args.slots, args.queue, args.results)
  start(cfg, args.workdir, options, args.host, args.port, args.replicas, args.max_replicas, args.target_ongoing_requests,
        args.host_devices, args.step, args.ray_address)
  scale = (f"{args.replicas} replicas" if not args.max_replicas else
           f"{args.replicas} to {args.max_replicas} replicas (autoscaling)")
  print(f"[dcmodel] serving {cfg.name} on http://{args.host}:{args.port} through Ray Serve's proxy: {scale}, "
        f"{args.host_devices} device(s) and {args.slots} slots each", flush=True)
  done = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: done.set())
  done.wait()
  print("[dcmodel] stopping the replicas (each drains its in-flight requests)", flush=True)
  stop()
  return 0
