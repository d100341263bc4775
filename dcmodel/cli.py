"""`dcmodel train | ...`: the command line. User errors print one line and exit 2.

On a host without accelerators the CPU is split into --host-devices simulated devices (8 by
default) so every mesh layout runs here; the flag only touches the CPU platform, so the same
command runs unchanged on TPU and GPU.
"""

from __future__ import annotations

import argparse
import os
import sys


def _set_host_devices(n: int) -> None:
  """Must run before jax is imported."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags and n > 1:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="dcmodel", description=__doc__.splitlines()[0])
  p.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
  p.add_argument("--host-devices", type=int, default=int(os.environ.get("DCMODEL_HOST_DEVICES", 8)),
                 help="simulated CPU devices when no accelerator is present (default 8)")
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train an experiment (resumes from WORKDIR's latest checkpoint)")
  t.add_argument("experiment", help="experiment file, e.g. experiments/digits_cnn.py")
  t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
  t.add_argument("--workdir", default=None, help="run directory (default runs/<experiment name>)")

  g = sub.add_parser("ingest", help="store an experiment's data source as ArrayRecord shards + manifest")
  g.add_argument("experiment")
  g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  g.add_argument("--out", required=True, help="directory to create")
  g.add_argument("--shards", type=int, default=4, help="train-split shards")

  i = sub.add_parser("inspect", help="parameter count and bytes per device, without allocating (any size)")
  i.add_argument("experiment")
  i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  i.add_argument("--compile", action="store_true", help="also AOT-compile the train step: XLA's per-device memory and FLOPs")
  i.add_argument("--json", action="store_true")

  l = sub.add_parser("launch", help="run a dcmodel command as N processes on this machine (jax.distributed, CPU collectives)")
  l.add_argument("--processes", type=int, required=True)
  l.add_argument("--devices-per-process", type=int, default=None,
                 help="simulated CPU devices per process (default: --host-devices / processes)")
  l.add_argument("experiment")
  l.add_argument("rest", nargs=argparse.REMAINDER, help="train arguments (--set ..., --workdir ...)")
  return p


def _load_config(args):
  from dcmodel import config as config_lib
  cfg = config_lib.load_experiment(args.experiment)
  return config_lib.apply_overrides(cfg, args.set)


def cmd_train(args) -> int:
  from dcmodel.train.loop import train
  cfg = _load_config(args)
  workdir = args.workdir or os.path.join("runs", cfg.name)
  result = train(cfg, workdir)
  m = result.final_eval
  acc = "".join(f" {k} {m[k]:.4f}" for k in ("accuracy", "auc", "bits_per_byte") if k in m)
  test = f"test loss {m['loss']:.4f}{acc} on {m['examples']} examples" if m else "no final evaluation"
  print(f"[dcmodel] {cfg.name}: step {result.start_step + result.steps_run}, {test}; {result.steps_run} steps in {result.wall_s:.1f}s "
        f"on mesh {dict(result.mesh.shape)}; workdir {workdir}")
  return 0


def cmd_ingest(args) -> int:
  from dcmodel.data import storage
  m = storage.ingest(_load_config(args).data, args.out, args.shards)
  counts = {s: sum(e["records"] for e in v) for s, v in m["splits"].items()}
  print(f"[dcmodel] ingested {m['source']} into {args.out}: {counts} records, "
        f"{sum(len(v) for v in m['splits'].values())} files; train with --set data.source=arrayrecord "
        f"--set data.options=\"{{'path': '{args.out}'}}\"")
  return 0


def cmd_inspect(args) -> int:
  import json
  from dcmodel.inspect import describe
  info = describe(_load_config(args), compile=args.compile)
  if args.json:
    print(json.dumps(info, indent=2))
    return 0
  gib = lambda b: f"{b / 2**30:.3f} GiB"
  print(f"{info['model']}: {info['params']:,} parameters ({gib(info['param_bytes_total'])}); mesh {info['mesh']}")
  print(f"  per device: parameters {gib(info['param_bytes_per_device'])}, parameters + optimizer state {gib(info['state_bytes_per_device'])}")
  if "compiled" in info:
    c = info["compiled"]
    print(f"  compiled step per device: arguments {gib(c['argument_bytes'])}, outputs {gib(c['output_bytes'])}, "
          f"temporaries {gib(c['temp_bytes'])}, {c['flops_per_device']:.3e} FLOPs")
  return 0


def cmd_launch(args) -> int:
  from dcmodel.errors import UserError
  from dcmodel.launch import launch
  if args.processes < 1:
    raise UserError(f"--processes must be >= 1, got {args.processes}")
  per = args.devices_per_process or args.host_devices // args.processes
  if per < 1:
    raise UserError(f"--host-devices {args.host_devices} cannot be shared by {args.processes} processes")
  return launch(args.processes, per, ["train", args.experiment, *args.rest])


COMMANDS = {"train": cmd_train, "ingest": cmd_ingest, "inspect": cmd_inspect, "launch": cmd_launch}


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  from dcmodel.errors import UserError
  try:
    if args.command != "launch":
      _set_host_devices(args.host_devices)
      from dcmodel.launch import initialize
      initialize()
    return COMMANDS[args.command](args)
  except UserError as e:
    if args.debug:
      raise
    print(f"dcmodel: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("dcmodel: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
