"""Ingest at corpus scale, against what training consumes.

1. A corpus several times larger than the ingest is allowed to hold: the standard library repeated
   as JSON Lines (each copy made unique by a header line, so deduplication keeps it) up to
   --corpus-mb (default 600 MB); a byte-level BPE trained on one copy's training documents.
2. `dcmodel ingest` of it in a child process (tokenizer workers: one per core), its peak resident
   memory (the ingest process and, separately, its largest worker) sampled every 50 ms, wall time,
   MB/s of text, tokens/s, docs/s.
3. The same ingest killed with SIGKILL at a random moment after its second committed chunk, then
   run again: the stored documents (source position and SHA-256) equal a clean pass over the
   source, none lost, none twice.
4. What training consumes: tokens/s of the default GPT's train loop (experiments/stdlib_gpt.py, 8
   simulated devices), and tokens/s of the input pipeline reading packed rows from the shards.

Writes results/ingest.json. Run: python -m benchmarks.ingest [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import write
from dcmodel import hostenv

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def make_corpus(path: Path, target_mb: int) -> dict:
  """The stdlib's .py files as JSON Lines, copy after copy, until the file holds target_mb."""
  base = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in base.rglob("*.py") if "site-packages" not in p.parts)
  texts = []
  for p in files:
    try:
      texts.append((str(p.relative_to(base)), p.read_text(encoding="utf-8")))
    except UnicodeDecodeError:
      continue
  written, copies, docs = 0, 0, 0
  with open(path, "w") as f:
    while written < target_mb * 2 ** 20:
      for name, text in texts:
        line = json.dumps({"text": f"# copy {copies}\n{text}", "file": name, "copy": copies}) + "\n"
        f.write(line)
        written += len(line)
        docs += 1
      copies += 1
  return {"bytes": written, "copies": copies, "documents": docs}


def run_ingest(args: list[str], kill_after_chunks: int | None = None) -> dict:
  """A `dcmodel ingest` child; peak RSS of it and of its workers; optionally SIGKILLed."""
  cmd = [PY, "-m", "dcmodel.cli", "ingest", *args]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  main = psutil.Process(proc.pid)
  peak_main = peak_worker = 0
  out_dir = Path(args[args.index("--out") + 1])
  killed = False
  while proc.poll() is None:
    try:
      peak_main = max(peak_main, main.memory_info().rss)
      for child in main.children(recursive=True):
        peak_worker = max(peak_worker, child.memory_info().rss)
    except psutil.Error:
      pass
    if kill_after_chunks is not None and not killed and (out_dir / "manifest.json").exists():
      try:
        chunks = json.loads((out_dir / "manifest.json").read_text())["chunks"]
      except (json.JSONDecodeError, KeyError):
        chunks = 0
      if chunks >= kill_after_chunks:
        time.sleep(random.uniform(0, 2))
        for p in [*main.children(recursive=True), main]:
          p.send_signal(signal.SIGKILL)
        killed = True
    time.sleep(0.05)
  out, err = proc.communicate()
  return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_main": peak_main,
          "peak_rss_worker": peak_worker, "stdout": out.strip()[-500:], "stderr_tail": err.strip()[-300:], "killed": killed}


def stored_documents(directory: Path) -> list[tuple[str, int, str]]:
  import numpy as np
  m = json.loads((directory / "manifest.json").read_text())
  docs = []
  for split, entries in m["splits"].items():
    for e in entries:
      side = np.load(directory / e["docs"])
      docs += [(split, int(i), h.tobytes().hex()) for i, h in zip(side["index"], side["hashes"])]
  return docs


def source_documents(cfg_args: list[str]) -> list[tuple[str, int, str]]:
  """A clean pass over the source: (split, position, hash) of every document cleaning keeps."""
  from dcmodel import experiment
  from dcmodel.data import documents, sources
  from dcmodel.data.clean import doc_hash
  cfg = experiment.load(ROOT / "experiments" / "corpus_gpt.py", cfg_args).data
  return [(s, d.index, doc_hash(d.text).hex()) for s, d, kept in
          documents.classified(sources.load(cfg), documents.document_filter(cfg), documents.new_reports()) if kept]


def consumption(tokenizer: Path, shards: Path, quick: bool) -> dict:
  """Tokens/s the default GPT's train loop takes in (8 simulated devices), and tokens/s the input
  pipeline delivers from the shards, each in its own process."""
  steps = 40 if quick else 200
  with tempfile.TemporaryDirectory() as work:
    r = subprocess.run([PY, "-m", "dcmodel.cli", "train", "experiments/stdlib_gpt.py", "--workdir", work,
                        "--set", f"train.steps={steps}", "--set", f"train.log_every={steps // 2}", "--set", "train.eval_every=0",
                        "--set", "train.final_eval=false", "--set", "checkpoint.enabled=false", "--set", "train.progress=false"],
                       cwd=ROOT, capture_output=True, text=True)
    lines = [json.loads(l) for l in Path(work, "metrics.jsonl").read_text().splitlines()]
  train_tps = [l["tokens_per_s"] for l in lines if l["split"] == "train"][-1]   # the second window: compiled
  code = f"""
import json, time
from dcmodel import experiment
from dcmodel.data.dataset import Dataset
cfg = experiment.load('experiments/stdlib_gpt.py', ['data.source=arrayrecord', 'data.path={shards}', 'data.tokenizer={tokenizer}',
                                                      'model.vocab_size=4096'])
ds = Dataset.load(cfg.data, cfg.model.batch_spec())
it = ds.train_iterator(cfg.data.global_batch_size, 0)
for _ in range(5): next(it)
t = time.perf_counter(); n = 0
while time.perf_counter() - t < 10:
  b = next(it); n += int(b['weights'].size)
print(json.dumps({{"tokens_per_s": n / (time.perf_counter() - t)}}))
"""
  p = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True)
  pipeline_tps = json.loads(p.stdout.strip().splitlines()[-1])["tokens_per_s"] if p.returncode == 0 else float("nan")
  return {"train_tokens_per_s": train_tps, "pipeline_tokens_per_s_from_shards": pipeline_tps, "train_returncode": r.returncode,
          "pipeline_stderr": p.stderr[-300:] if p.returncode else ""}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="a 60 MB corpus")
  ap.add_argument("--corpus-mb", type=int, default=600)
  ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
  args = ap.parse_args(argv)
  random.seed(0)
  mb = 60 if args.quick else args.corpus_mb
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    tmp = Path(tmp)
    corpus = make_corpus(tmp / "corpus.jsonl", mb)
    print(f"corpus: {corpus['bytes'] / 2**20:.0f} MiB, {corpus['documents']} documents ({corpus['copies']} copies of the stdlib)")
    make_corpus(tmp / "one.jsonl", 1)    # one copy: the tokenizer's training documents
    data = ["--set", f"data.path={tmp / 'corpus.jsonl'}", "--set", "data.test_fraction=0.02", "--set", "train.progress=false"]
    t = time.perf_counter()
    subprocess.run([PY, "-m", "dcmodel.cli", "tokenizer", "train", "experiments/corpus_gpt.py", "--set",
                    f"data.path={tmp / 'one.jsonl'}", "--set", "train.progress=false", "--vocab-size", "4096",
                    "--out", str(tmp / "tok.json")], cwd=ROOT, check=True, capture_output=True)
    tok_s = time.perf_counter() - t
    data += ["--set", f"data.tokenizer={tmp / 'tok.json'}"]
    chunk = ["--chunk-mb", str(max(mb // 8, 1))]     # eight or so commits: a kill has something to resume from
    full = run_ingest(["experiments/corpus_gpt.py", *data, *chunk, "--out", str(tmp / "full")])
    m = json.loads((tmp / "full" / "manifest.json").read_text())
    tokens = sum(e["tokens"] for v in m["splits"].values() for e in v)
    text_bytes = sum(r["bytes_kept"] for k, r in m["cleaning"].items() if k != "source")
    kept = sum(r["kept"] for k, r in m["cleaning"].items() if k != "source")
    ingest_s = m["ingest"]["wall_s"]
    # kill at a random moment after the second commit, then resume
    killed = run_ingest(["experiments/corpus_gpt.py", *data, *chunk, "--out", str(tmp / "killed")], kill_after_chunks=2)
    position = json.loads((tmp / "killed" / "manifest.json").read_text())["position"]
    resumed = run_ingest(["experiments/corpus_gpt.py", *data, *chunk, "--out", str(tmp / "killed")])
    got, clean = stored_documents(tmp / "killed"), stored_documents(tmp / "full")
    reference = source_documents([a for a in data if a != "--set"])
    exact = {"equal_to_uninterrupted": got == clean, "equal_to_source_pass": sorted(got) == sorted(reference),
             "duplicates": len(got) - len(set(got)), "lost": len(set(reference) - set(got)), "documents": len(got)}
    use = consumption(tmp / "tok.json", tmp / "full", args.quick)
  ingest_tps = tokens / ingest_s
  payload = {
      "corpus": corpus, "tokenizer_train_s": tok_s, "workers": m["ingest"]["workers"],
      "ingest": {"wall_s": ingest_s, "process_wall_s": full["wall_s"], "text_mb_per_s": text_bytes / 2 ** 20 / ingest_s,
                 "tokens_per_s": ingest_tps, "docs_per_s": kept / ingest_s, "tokens": tokens, "documents_kept": kept,
                 "bytes_per_token": text_bytes / tokens, "peak_rss_main_bytes": full["peak_rss_main"],
                 "peak_rss_worker_bytes": full["peak_rss_worker"], "chunks": m["chunks"]},
      "kill_and_resume": {"killed_at_document": position, "killed": killed["killed"], "resumed_returncode": resumed["returncode"],
                          "resumed_peak_rss_main_bytes": resumed["peak_rss_main"], **exact},
      "consumption": use, "ingest_over_train": ingest_tps / use["train_tokens_per_s"],
      "pipeline_over_train": use["pipeline_tokens_per_s_from_shards"] / use["train_tokens_per_s"]}
  write("ingest" + ("_quick" if args.quick else ""), payload)
  i = payload["ingest"]
  print(f"ingest: {i['text_mb_per_s']:.1f} MB/s, {i['tokens_per_s']:,.0f} tokens/s, {i['docs_per_s']:,.0f} docs/s over "
        f"{i['wall_s']:.0f} s; peak RSS {i['peak_rss_main_bytes'] / 2**20:.0f} MiB (+ {i['peak_rss_worker_bytes'] / 2**20:.0f} MiB "
        f"per worker) for a {corpus['bytes'] / 2**20:.0f} MiB corpus; {i['bytes_per_token']:.2f} bytes/token")
  print(f"kill -9 at document {position}, resumed: {exact}")
  print(f"train consumes {use['train_tokens_per_s']:,.0f} tokens/s; ingest is {payload['ingest_over_train']:.0f}x that, "
        f"the pipeline from shards {payload['pipeline_over_train']:.0f}x")
  return 0 if exact["equal_to_uninterrupted"] and exact["equal_to_source_pass"] and killed["killed"] else 1


if __name__ == "__main__":
  hostenv.reexec_with_host_malloc()   # the process `dcmodel` runs in (dcmodel/hostenv.py)
  raise SystemExit(main())
