"""`dcmodel train | import-hf | export-hf | ...`: the command line. User errors print one line and exit 2.

On a host without accelerators the CPU is split into --host-devices simulated devices (8 by
default) so every mesh layout runs here; the flag only touches the CPU platform, so the same
command runs unchanged on TPU and GPU. With DCMODEL_HOST_MALLOC=mimalloc (or hugetlb) the process
first re-executes itself once with that allocator serving XLA:CPU's per-call temporaries
(dcmodel/hostenv.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from dcmodel import hostenv


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
  t.add_argument("--profile-steps", default=None, metavar="A:B",
                 help="trace the steps after step A up to step B with jax.profiler into WORKDIR/profile/ (train.profile_steps)")

  g = sub.add_parser("ingest", help="store an experiment's data source as ArrayRecord shards + manifest")
  g.add_argument("experiment")
  g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  g.add_argument("--out", required=True, help="directory to create")
  g.add_argument("--shards", type=int, default=4, help="train-split shards (tables)")
  g.add_argument("--workers", type=int, default=None, help="tokenizer processes (corpora; default: one per core)")
  g.add_argument("--chunk-mb", type=float, default=64, help="text per committed chunk (corpora): what a kill can cost")

  tk = sub.add_parser("tokenizer", help="train a tokenizer on an experiment's training documents")
  tk_sub = tk.add_subparsers(dest="tokenizer_command", required=True)
  tt = tk_sub.add_parser("train", help="byte-level BPE (Hugging Face tokenizers) on the training split only")
  tt.add_argument("experiment")
  tt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  tt.add_argument("--vocab-size", type=int, required=True)
  tt.add_argument("--out", required=True, help="the tokenizer.json to write")

  ih = sub.add_parser("import-hf", help="a Hugging Face GPT-2 or Llama directory -> a workdir (config.json, tokenizer, step-0 checkpoint)")
  ih.add_argument("hf_dir", help="directory with config.json and *.safetensors (and tokenizer.json)")
  ih.add_argument("--workdir", required=True, help="the new workdir to write")
  ih.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field of the experiment written")

  eh = sub.add_parser("export-hf", help="a gpt workdir's newest checkpoint -> a Hugging Face directory transformers loads")
  eh.add_argument("workdir")
  eh.add_argument("--out", required=True, help="the directory to write (new or empty)")
  eh.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. the mesh to restore on")

  b = sub.add_parser("baseline", help="the baseline the experiment's model must beat, fitted on the same training data")
  b.add_argument("experiment")
  b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  b.add_argument("--json", action="store_true")

  i = sub.add_parser("inspect", help="parameter count and bytes per device, without allocating (any size)")
  i.add_argument("experiment")
  i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  i.add_argument("--compile", action="store_true", help="also AOT-compile the train step: XLA's per-device memory and FLOPs")
  i.add_argument("--json", action="store_true")

  pl = sub.add_parser("plan", help="rank meshes for a model on a target system by predicted step time")
  pl.add_argument("experiment")
  pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  pl.add_argument("--hardware", required=True, help="catalog chip, e.g. tpu-v5p, h100")
  pl.add_argument("--chips", type=int, required=True)
  pl.add_argument("--chips-per-host", type=int, default=None)
  pl.add_argument("--compression", default="none", choices=("none", "bf16", "int8"),
                  help="gradient all-reduce payload over the data axis (parallel.allreduce)")
  pl.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                  help="evaluate this layout only, e.g. data=6,model=8,stage=64 (axes data, fsdp, model, stage; others 1)")
  pl.add_argument("--microbatches", type=int, default=None,
                  help="microbatches per step and replica (default: 1, or one sequence each when pipelined)")
  pl.add_argument("--interleave", type=int, default=1, help="model chunks per pipeline stage (interleaved 1F1B)")
  pl.add_argument("--attention", default="dense", choices=("dense", "dense-dropout", "flash"),
                  help="dense: the T x T scores go through HBM (dcmodel's model); dense-dropout: and dropout on "
                       "them (Megatron's GPT); flash: a fused kernel keeps them on chip")
  pl.add_argument("--json", action="store_true")

  be = sub.add_parser("bench", help="run the benchmark suite (from a source checkout): predicted vs measured")
  be.add_argument("--quick", action="store_true", help="the CI-sized suite (< 3 minutes)")
  be.add_argument("--only", action="append", default=[], help="run only this benchmark (repeatable)")
  be.add_argument("--trace", default=None, metavar="WORKDIR",
                  help="instead: the top ops of WORKDIR's newest profiler trace (train --profile-steps) beside their roofline predictions")
  be.add_argument("--top", type=int, default=12, help="with --trace: how many ops")
  be.add_argument("--json", action="store_true", help="with --trace: the report as JSON")

  pr = sub.add_parser("predict", help="batch inference over a split into a results store (resumes if interrupted)")
  pr.add_argument("experiment")
  pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  pr.add_argument("--workdir", required=True, help="the training run's directory")
  pr.add_argument("--split", default="test")
  pr.add_argument("--out", required=True, help="results store: a directory or a TensorStore URL (gs://, s3://)")
  pr.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest good one)")
  pr.add_argument("--batch-size", type=int, default=None, help="global batch (default data.eval_batch_size)")

  ge = sub.add_parser("generate", help="decode text from a trained gpt with a KV cache")
  ge.add_argument("experiment")
  ge.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  ge.add_argument("--workdir", required=True)
  ge.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch); \\n and \\t are unescaped")
  ge.add_argument("--max-new-tokens", type=int, default=64)
  ge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ge.add_argument("--top-k", type=int, default=0)
  ge.add_argument("--seed", type=int, default=0)
  ge.add_argument("--step", type=int, default=None)
  ge.add_argument("--json", action="store_true")

  sv = sub.add_parser("serve", help="answer HTTP requests: completions (gpt, continuous batching) or predictions")
  sv.add_argument("experiment")
  sv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  sv.add_argument("--workdir", required=True, help="the training run's directory")
  sv.add_argument("--port", type=int, default=8000)
  sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
  sv.add_argument("--slots", type=int, default=16, help="KV-cache slots: sequences decoded together (a multiple of the batch axes)")
  sv.add_argument("--queue", type=int, default=256, help="requests that may wait for a slot; past it, 503 + Retry-After")
  sv.add_argument("--results", default=None, help="append every request and answer to this results store (dcmodel query reads it)")
  sv.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest good one)")
  sv.add_argument("--drain-timeout", type=float, default=120.0, help="seconds SIGTERM waits for in-flight requests")
  sv.add_argument("--replicas", type=int, default=1, help="> 1: that many replicas behind Ray Serve's proxy (pip install '.[serve-ray]')")
  sv.add_argument("--max-replicas", type=int, default=None, help="with Ray Serve: autoscale between --replicas and this")
  sv.add_argument("--target-ongoing-requests", type=float, default=None,
                  help="with autoscaling: requests per replica Ray Serve aims for (default: --slots)")
  sv.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start one on this machine)")

  q = sub.add_parser("query", help="read rows of a results store: by id, range, condition, top-K")
  q.add_argument("results")
  q.add_argument("--ids", default=None, help="comma-separated example ids")
  q.add_argument("--range", default=None, help="rows a:b")
  q.add_argument("--where", action="append", default=[], help="'COLUMN OP VALUE|COLUMN', e.g. 'pred!=label' (repeat: all hold)")
  q.add_argument("--top", type=int, default=None, help="the K rows with the largest --by")
  q.add_argument("--by", default="score")
  q.add_argument("--ascending", action="store_true", help="with --top: the smallest instead")
  q.add_argument("--columns", default=None, help="comma-separated columns to show")
  q.add_argument("--json", action="store_true")

  l = sub.add_parser("launch", help="run a dcmodel command as N processes on this machine (jax.distributed, CPU collectives)")
  l.add_argument("--processes", type=int, required=True)
  l.add_argument("--devices-per-process", type=int, default=None,
                 help="simulated CPU devices per process (default: --host-devices / processes)")
  l.add_argument("experiment")
  l.add_argument("rest", nargs=argparse.REMAINDER, help="train arguments (--set ..., --workdir ...)")
  return p


def _load_config(args):
  from dcmodel import experiment
  return experiment.load(args.experiment, args.set)


def cmd_train(args) -> int:
  from dcmodel.train.loop import train
  if args.profile_steps is not None:
    args.set = [*args.set, f"train.profile_steps={args.profile_steps}"]
  cfg = _load_config(args)
  workdir = args.workdir or os.path.join("runs", cfg.name)
  result = train(cfg, workdir)
  if result.stop_signal:
    import jax
    if jax.process_index() == 0:
      print(stopped_message(cfg, workdir, result), file=sys.stderr, flush=True)
    return 128 + result.stop_signal
  m = result.final_eval
  acc = "".join(f" {k} {m[k]:.4f}" for k in ("accuracy", "auc", "bits_per_byte") if k in m)
  test = f"test loss {m['loss']:.4f}{acc} on {m['examples']} examples" if m else "no final evaluation"
  stopped = f" (stopped early: {result.stopped})" if result.stopped else ""
  print(f"[dcmodel] {cfg.name}: step {result.start_step + result.steps_run}{stopped}, {test}; {result.steps_run} steps in "
        f"{result.wall_s:.1f}s on mesh {dict(result.mesh.shape)}; workdir {workdir}")
  return 0


def stopped_message(cfg, workdir, result) -> str:
  """The one line a run stopped by SIGTERM/SIGINT prints, the same every time."""
  import signal
  step, name = result.start_step + result.steps_run, signal.Signals(result.stop_signal).name
  what = (f"stopped at step {step} of {cfg.train.steps}" if result.stopped else
          f"received after the last step; the run finished at step {step}")
  if result.saved_step == step:
    saved = f"checkpoint {step} saved in {os.path.join(workdir, 'checkpoints')}"
  elif not cfg.checkpoint.enabled:
    saved = "nothing saved (checkpoint.enabled=false)"
  else:
    saved = f"no new step to save (newest checkpoint: {result.start_step or 'none'})"
  return f"dcmodel: {name}: {what}; {saved}" + ("; run the same command to resume" if result.stopped else "")


def cmd_tokenizer(args) -> int:
  from pathlib import Path
  from dcmodel.data import documents, registry, sources, tokenizers  # noqa: F401  (sources: registers them)
  from dcmodel.data.registry import Corpus
  from dcmodel.errors import UserError
  cfg = _load_config(args)
  out = Path(args.out)
  if out.exists():
    raise UserError(f"--out {out} exists; the tokenizer is written to a new file (nothing is overwritten)")
  src = sources.load(cfg.data)
  if not isinstance(src, Corpus):
    raise UserError(f"data.source '{cfg.data.source}' is not a document corpus; a tokenizer trains on documents "
                    f"(data.source=corpus with data.path=..., or stdlib_text)")
  tok = tokenizers.train_bpe(documents.train_texts(src, cfg.data), args.vocab_size, out, progress=cfg.train.progress)
  print(f"[dcmodel] trained a byte-level BPE of {tok.vocab_size} tokens on the training documents of {src.name} "
        f"into {out} (sha256 {tok.sha256[:12]}); use it with --set data.tokenizer={out}")
  return 0


def cmd_import_hf(args) -> int:
  from dcmodel.interop.hf import import_hf
  got = import_hf(args.hf_dir, args.workdir, args.set)
  mib = got.bytes_read / 2**20
  print(f"[dcmodel] imported {got.params:,} parameters ({mib:.1f} MiB of safetensors read and placed in {got.read_s:.2f}s, "
        f"{mib / max(got.read_s, 1e-9):.0f} MiB/s) onto mesh {got.mesh or '1 device'}; "
        f"step-0 checkpoint written and verified in {got.save_s:.1f}s; run it with {got.workdir / 'config.json'} "
        f"--workdir {got.workdir} (fine-tune: --set data.path=CORPUS)")
  return 0


def cmd_export_hf(args) -> int:
  from dcmodel.interop.hf import export_hf
  got = export_hf(args.workdir, args.out, args.set)
  print(f"[dcmodel] exported step {got.step} of {args.workdir} as {got.architecture} ({got.tensors} tensors) into {got.out}; "
        f"load it with transformers.AutoModelForCausalLM.from_pretrained('{got.out}')")
  return 0


def cmd_baseline(args) -> int:
  import json
  from dcmodel.baselines import for_experiment
  cfg = _load_config(args)
  out = {"experiment": cfg.name, **for_experiment(cfg)}
  print(json.dumps(out) if args.json else
        f"[dcmodel] {cfg.name}: baseline test {out['metric']} {out['baseline']:.4f} ({out['by']}; {out['better']} is better)")
  return 0


def cmd_ingest(args) -> int:
  from dcmodel.data import ingest
  from dcmodel.errors import UserError
  if not 1 / 16 <= args.chunk_mb <= 64 * 1024:
    raise UserError(f"--chunk-mb {args.chunk_mb:g}: expected 0.0625 (64 KiB) to 65536 MiB of text per committed chunk")
  cfg = _load_config(args)
  m = ingest.ingest(cfg.data, args.out, args.shards, args.workers, int(args.chunk_mb * 2 ** 20), progress=cfg.train.progress)
  counts = {s: sum(e["records"] for e in v) for s, v in m["splits"].items()}
  what = "documents" if m["kind"] == "tokens" else "records"
  tokens = ({s: sum(e["tokens"] for e in v) for s, v in m["splits"].items()} if m["kind"] == "tokens" else None)
  extra = f", {tokens} tokens" if tokens else ""
  resumed = m.get("ingest", {}).get("resumed_at_document")
  print(f"[dcmodel] ingested {m['source']} into {args.out}: {counts} {what}{extra}, "
        f"{sum(len(v) for v in m['splits'].values())} shards" + (f" (resumed at document {resumed})" if resumed else "")
        + f"; train with --set data.source=arrayrecord --set data.path={args.out}")
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


def cmd_plan(args) -> int:
  import json
  from dcmodel.perf.plan import parse_mesh, plan, render
  out = plan(_load_config(args), args.hardware, args.chips, args.chips_per_host, args.compression,
             parse_mesh(args.mesh) if args.mesh else None, args.microbatches, args.interleave, args.attention)
  print(json.dumps(out, indent=2) if args.json else render(out))
  return 0


def cmd_trace(args) -> int:
  import json
  import jax
  from dcmodel import resources
  from dcmodel.perf import peak, trace
  resources.check_count("--top", args.top, 1, 1000)
  found = trace.find(args.trace)
  info = json.loads((found / trace.INFO_FILE).read_text()) if (found / trace.INFO_FILE).exists() else {}
  devices = jax.local_devices()[:max(info.get("devices", jax.local_device_count()), 1)]
  p = peak.for_devices(devices)
  report = trace.top_ops(found, p.flops_per_device, p.bandwidth_per_device, args.top)
  report["peak"] = p.source
  print(json.dumps(report, indent=2) if args.json else trace.render(report) + f"\n(peak and bandwidth: {p.source})")
  return 0


def cmd_bench(args) -> int:
  import subprocess
  from pathlib import Path
  from dcmodel.errors import UserError
  if args.trace is not None:
    return cmd_trace(args)
  root = Path(__file__).resolve().parents[1]
  if not (root / "benchmarks" / "__main__.py").exists():
    raise UserError(f"dcmodel bench runs from a source checkout; {root / 'benchmarks'} not found")
  extra = (["--quick"] if args.quick else []) + [a for o in args.only for a in ("--only", o)]
  return subprocess.call([sys.executable, "-m", "benchmarks", *extra], cwd=root)


def cmd_predict(args) -> int:
  from dcmodel.infer.predict import predict
  cfg = _load_config(args)
  got = predict(cfg, args.workdir, args.out, args.split, args.step, args.batch_size)
  metrics = "".join(f" {k} {got[k]:.4f}" for k in ("loss", "accuracy", "auc") if k in got)
  print(f"[dcmodel] predicted {got['rows']}/{got['of']} rows of '{args.split}' from checkpoint step {got['checkpoint_step']} "
        f"({got['new_batches']} new batches, {got['wall_s']:.1f}s):{metrics}; results in {args.out}")
  return 0


def cmd_generate(args) -> int:
  import json
  from dcmodel.errors import UserError
  from dcmodel.infer.generate import Generator, Sampling
  from dcmodel.infer.load import load
  cfg = _load_config(args)
  if cfg.model.name != "gpt":
    raise UserError(f"generate needs a gpt experiment; {args.experiment} trains '{cfg.model.name}'")
  trained = load(cfg, args.workdir, args.step)
  prompts = [p.replace("\\n", "\n").replace("\\t", "\t").encode() for p in args.prompt]
  gen = Generator(trained.placed, trained.state, trained.tokenizer)
  out = gen(prompts, Sampling(args.max_new_tokens, args.temperature, args.top_k, args.seed))
  texts = [t.decode("utf-8", errors="replace") for t in out.texts]
  if args.json:
    print(json.dumps({"prompts": args.prompt, "completions": texts, "tokens": out.tokens.tolist(),
                      "time_to_first_token_s": out.prefill_s, "decode_tokens_per_s": out.decode_tokens_per_s}, indent=2))
    return 0
  for p, t in zip(args.prompt, texts):
    print(f"--- {p!r}\n{p}{t}")
  print(f"[dcmodel] {len(prompts)} prompt(s), {args.max_new_tokens} new tokens each from step {trained.step}: "
        f"first token {1e3 * out.prefill_s:.0f} ms (compile included on a first call), then "
        f"{out.decode_tokens_per_s:.0f} tokens/s")
  return 0


def cmd_serve(args) -> int:
  from dcmodel.errors import UserError
  cfg = _load_config(args)
  if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
    raise UserError(f"--replicas must be >= 1 and --max-replicas >= --replicas, got {args.replicas} and {args.max_replicas}")
  if args.replicas > 1 or args.max_replicas:
    from dcmodel.serve.replicas import serve_replicas
    return serve_replicas(args, cfg)
  from dcmodel.serve import app
  sock = app.listen(args.host, args.port)   # before the model loads: a taken port fails at once
  service = app.Service.load(cfg, args.workdir, app.Options(args.slots, args.queue, args.results), args.step)
  print(f"[dcmodel] serving {app.describe(service)} on http://{args.host}:{sock.getsockname()[1]}"
        + (f"; every answer appended to {args.results}" if args.results else "") + "; /healthz says 200 once compiled",
        flush=True)
  app.run(service, sock, args.drain_timeout)
  rows = f", {service.recorder.rows_done} rows in {args.results}" if service.recorder else ""
  print(f"[dcmodel] stopped after draining{rows}", flush=True)
  return 0


def cmd_query(args) -> int:
  import json
  import numpy as np
  from dcmodel.errors import UserError
  from dcmodel.infer.results import query
  try:
    ids = [int(i) for i in args.ids.split(",")] if args.ids else None
  except ValueError:
    raise UserError(f"--ids must be comma-separated integers, got '{args.ids}'") from None
  columns = args.columns.split(",") if args.columns else None
  got = query(args.results, ids, args.range, tuple(args.where), args.top, args.by, args.ascending, columns)
  text = lambda b: b.decode("utf-8", errors="replace")
  if args.json:
    print(json.dumps({k: [text(b) for b in v.tolist()] if v.dtype.kind == "S" else v.tolist() for k, v in got.items()}))
    return 0
  names = list(got)
  print("\t".join(names))
  for i in range(len(got[names[0]]) if names else 0):
    print("\t".join(np.array2string(got[k][i], precision=4, separator=",", max_line_width=10**6) if got[k].ndim > 1
                    else json.dumps(text(got[k][i]), ensure_ascii=False) if got[k].dtype.kind == "S"
                    else (f"{got[k][i]:.4f}" if got[k].dtype.kind == "f" else str(got[k][i])) for k in names))
  return 0


def cmd_launch(args) -> int:
  from dcmodel.errors import UserError
  from dcmodel.launch import launch
  from dcmodel import resources
  resources.check_count("--processes", args.processes, 1, resources.MAX_HOST_DEVICES, "processes on this machine")
  if args.devices_per_process is not None:
    resources.check_count("--devices-per-process", args.devices_per_process, 1, resources.MAX_HOST_DEVICES)
  per = args.devices_per_process or args.host_devices // args.processes
  if per < 1:
    raise UserError(f"--host-devices {args.host_devices} cannot be shared by {args.processes} processes")
  resources.check_count("--processes x devices per process", args.processes * per, 1, resources.MAX_HOST_DEVICES,
                        "simulated CPU devices on this machine")
  resources.check_host_memory(args.processes * resources.PROCESS_BYTES, f"--processes {args.processes}",
                              "start fewer processes")
  return launch(args.processes, per, ["train", args.experiment, *args.rest])


COMMANDS = {"train": cmd_train, "tokenizer": cmd_tokenizer, "import-hf": cmd_import_hf, "export-hf": cmd_export_hf,
            "baseline": cmd_baseline, "ingest": cmd_ingest, "inspect": cmd_inspect, "plan": cmd_plan, "bench": cmd_bench,
            "predict": cmd_predict, "generate": cmd_generate, "serve": cmd_serve, "query": cmd_query, "launch": cmd_launch}


def main(argv=None) -> int:
  import contextlib
  if argv is None:              # the process's own command line (not a caller's list): before jax loads
    hostenv.reexec_with_host_malloc()
  args = _parser().parse_args(argv)
  from dcmodel.errors import UserError
  try:
    with contextlib.ExitStack() as stack:
      from dcmodel.resources import MAX_HOST_DEVICES, check_count
      check_count("--host-devices", args.host_devices, 1, MAX_HOST_DEVICES,
                  "simulated CPU devices; each costs start-up time and memory")
      if args.command not in ("launch", "bench") or (args.command == "bench" and args.trace):
        hostenv.set_host_devices(args.host_devices)
      if args.command == "train":
        # From here a SIGTERM/SIGINT is recorded and the run stops cleanly (train/preemption.py),
        # never a KeyboardInterrupt raised wherever Python happens to be.
        from dcmodel.train import preemption
        stack.enter_context(preemption.Signals())
      if args.command not in ("launch", "bench"):
        from dcmodel.launch import initialize
        initialize()
      return COMMANDS[args.command](args)
  except UserError as e:
    if args.debug:
      raise
    print(f"dcmodel: error: {e}", file=sys.stderr)
    return 2
  except Exception as e:
    from dcmodel.experiment import describe_user_error
    line = describe_user_error(e)
    if line is None or args.debug:
      raise
    print(f"dcmodel: error: {line}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:     # commands other than train (which records signals instead)
    print("dcmodel: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
