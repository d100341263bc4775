"""One serving replica as an ASGI app (FastAPI): the trained model, its engine, metrics and
results, behind a thin OpenAI-compatible HTTP layer.

  POST /v1/completions   language models (gpt): continuous batching over KV-cache slots
  POST /v1/predict       classifiers and recommenders: dynamic batching of rows
  GET  /v1/models        the served model
  GET  /healthz          200 when ready (compiled), 503 while warming up or draining
  GET  /metrics          Prometheus text

The model is restored before the server listens (a bad workdir is a user error, exit 2); the
compiles run in the engine's thread after it starts, and /healthz says when they are done.
Requests that arrive meanwhile wait in the queue. On shutdown (SIGTERM), uvicorn stops
accepting and lets in-flight requests finish; the lifespan's end then drains the engine and
flushes the results store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dcmodel import config as config_lib
from dcmodel.config import Config
from dcmodel.data.dataset import Dataset
from dcmodel.errors import UserError
from dcmodel.infer.load import Trained, load
from dcmodel.serve import protocol
from dcmodel.serve.engine import Engine, EngineStopped, Params, QueueFull, Sequence
from dcmodel.serve.metrics import ServeMetrics
from dcmodel.serve.predictor import Job, Predictor
from dcmodel.serve.protocol import ApiError
from dcmodel.serve.record import Recorder, completion_columns, predict_columns

JSON = "application/json"


@dataclasses.dataclass(frozen=True)
class Options:
  slots: int = 16                    # KV-cache slots (sequences decoded together)
  queue: int = 256                   # prompts (or predict rows / 16) that may wait for a slot
  results: str | None = None         # results store every answer is appended to
  max_body_bytes: int = 8 << 20      # a request body past this is refused (413)
  max_batch: int = 256               # predict: rows per jitted call
  retry_after_s: int = 1             # told to clients refused with 503


class Service:
  """One replica's model and the machinery around it (no HTTP)."""

  def __init__(self, trained: Trained, workdir, options: Options):
    cfg = trained.cfg
    self.cfg, self.options, self.name = cfg, options, cfg.name
    self.step = trained.step
    spec = cfg.model.batch_spec()
    self.engine: Engine | None = None
    self.predictor: Predictor | None = None
    self.metrics = ServeMetrics(cfg.name, options.slots if spec.lm else 0)
    meta = {"experiment": cfg.name, "model": cfg.model.name, "config_hash": config_lib.config_hash(cfg),
            "task": cfg.model.task, "checkpoint_step": trained.step, "workdir": str(Path(workdir).absolute()),
            "source": "serve"}
    if spec.lm:
      if cfg.model.name != "gpt":
        raise UserError(f"serving completions needs a gpt (a KV-cache decoder); {cfg.name} is '{cfg.model.name}'")
      self.tokenizer = trained.tokenizer
      self.engine = Engine(trained.placed, trained.state, trained.tokenizer, options.slots, options.queue, self.metrics)
      self.context = self.engine.context
      self.metrics.watch(lambda: self.engine.queue_depth, lambda: self.engine.busy_slots)
      width = self.context * max(int(np.max(self.tokenizer.token_bytes)), 1)
      columns, meta = completion_columns(width), {**meta, "endpoint": "completions"}
    else:
      dataset = Dataset.load(cfg.data, spec)    # the normalizer fitted on train and the source's stages, as predict
      self.predictor = Predictor(trained.placed, trained.state, dataset, options.queue * 16, options.max_batch, self.metrics)
      self.metrics.watch(lambda: self.predictor.queue_depth, lambda: self.predictor.busy)
      columns, meta = predict_columns(self.predictor.schema, self.predictor.output_columns()), {**meta, "endpoint": "predict"}
    self.recorder = Recorder(options.results, columns, meta) if options.results else None
    self.ready = False
    self.draining = False

  @classmethod
  def load(cls, cfg: Config, workdir, options: Options, step: int | None = None, devices=None) -> "Service":
    if options.slots < 1 or options.queue < 0:
      raise UserError(f"--slots must be >= 1 and --queue >= 0, got {options.slots} and {options.queue}")
    return cls(load(cfg, workdir, step, devices), workdir, options)

  @property
  def worker(self):
    return self.engine or self.predictor

  def start(self) -> None:
    """Compile (in the worker's thread), then serve; `ready` turns true when compiled."""
    def warm_then_ready():
      self.warmup_s = self.worker.warmup()
      self.ready = True
    self.worker.start(before=warm_then_ready)

  def stop(self) -> None:
    self.draining = True
    self.worker.stop()
    if self.recorder:
      self.recorder.close()

  # ---- results rows (called from the worker thread as answers finish)
  def record_sequence(self, seq: Sequence) -> None:
    m = self.metrics
    if seq.t_first is not None and seq.finish_reason != "abort":
      m.ttft.observe(seq.ttft_s)
    if self.recorder is None:
      return
    p = seq.params
    self.recorder.add({
        "request_id": seq.request_id.encode(), "choice": seq.index, "received_unix_s": seq.submitted_unix,
        "finished_unix_s": time.time(), "ttft_s": seq.ttft_s, "latency_s": seq.latency_s,
        "prompt": self.tokenizer.decode(seq.prompt_ids), "completion": seq.text.encode("utf-8"),
        "prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.tokens),
        "finish_reason": seq.finish_reason.encode(), "max_tokens": p.max_tokens, "temperature": p.temperature,
        "top_k": p.top_k, "top_p": p.top_p, "seed": p.seed})

  def record_job(self, job: Job, request_id: str, rows: list[dict]) -> None:
    if self.recorder is None or job.outputs is None:
      return
    done = time.time()
    for i in range(job.rows):
      self.recorder.add({"request_id": request_id.encode(), "row": i, "received_unix_s": job.submitted_unix,
                         "finished_unix_s": done, "latency_s": job.latency_s,
                         **{k: job.raw[k][i] for k in self.predictor.schema}, **{k: v[i] for k, v in job.outputs.items()}})


async def read_body(request: Request, limit: int) -> bytes:
  """The body, refused (413) past `limit` bytes whether or not the client declared its length."""
  declared = request.headers.get("content-length")
  if declared and declared.isdigit() and int(declared) > limit:
    raise ApiError(413, f"the request body ({int(declared)} bytes) exceeds the server's limit of {limit} bytes")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise ApiError(413, f"the request body exceeds the server's limit of {limit} bytes")
    chunks.append(chunk)
  return b"".join(chunks)


class Observe:
  """ASGI middleware: every request's status and time to its last byte into the metrics, the
  replica's name in a response header."""

  ENDPOINTS = ("/v1/completions", "/v1/predict", "/v1/models", "/healthz", "/metrics")

  def __init__(self, app, metrics: ServeMetrics):
    self.app, self.metrics = app, metrics
    self.header = (b"x-dcmodel-replica", metrics.replica.encode())

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    t, status = time.perf_counter(), [500]
    endpoint = scope["path"] if scope["path"] in self.ENDPOINTS else "other"

    async def observed(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
        message = {**message, "headers": [*message.get("headers", []), self.header]}
      await send(message)

    self.metrics.in_flight.inc()
    try:
      await self.app(scope, receive, observed)
    finally:
      self.metrics.in_flight.dec()
      self.metrics.request(endpoint, status[0], time.perf_counter() - t)


class Mailbox:
  """Events from the engine's thread to the event loop: one wake-up of the loop for whatever
  piled up meanwhile, not one per token (each wake-up is a write to the loop's pipe)."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

  def put(self, queue: asyncio.Queue, item) -> None:
    with self.lock:
      self.items.append((queue, item))
      if self.scheduled:
        return
      self.scheduled = True
    with contextlib.suppress(RuntimeError):     # the loop may be gone at shutdown
      self.loop.call_soon_threadsafe(self._deliver)

  def _deliver(self) -> None:
    with self.lock:
      items, self.items, self.scheduled = self.items, [], False
    for queue, item in items:
      queue.put_nowait(item)


class EventStream(StreamingResponse):
  """Server-sent events that always run `on_close` (the client may leave mid-stream)."""

  def __init__(self, content, on_close):
    super().__init__(content, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    self.on_close = on_close

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      with contextlib.suppress(Exception):
        await self.body_iterator.aclose()
      self.on_close()


def error_response(e: ApiError) -> Response:
  return Response(e.body(), e.status, headers=e.headers, media_type=JSON)


def build_app(service: Service) -> FastAPI:
  """The HTTP layer over one Service; the lifespan starts and stops it."""

  mailbox: list[Mailbox] = []

  @contextlib.asynccontextmanager
  async def lifespan(app):
    mailbox.append(Mailbox(asyncio.get_running_loop()))
    service.start()
    yield
    await asyncio.to_thread(service.stop)

  app = FastAPI(title=f"dcmodel serve: {service.name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  opts = service.options

  @app.exception_handler(ApiError)
  async def _api_error(request, e: ApiError):
    return error_response(e)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request, e: StarletteHTTPException):
    message = {404: f"no route {request.method} {request.url.path}; routes: POST /v1/completions, POST /v1/predict, "
                    f"GET /v1/models, GET /healthz, GET /metrics",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
    return Response(protocol.error_body(e.status_code, message), e.status_code, media_type=JSON)

  @app.exception_handler(Exception)
  async def _internal(request, e: Exception):
    return Response(protocol.error_body(500, f"internal error: {type(e).__name__}: {e}", "server_error"), 500, media_type=JSON)

  def refuse_busy(e: Exception):
    kind = "server_shutting_down" if isinstance(e, EngineStopped) else "server_overloaded"
    return ApiError(503, str(e) + ("" if isinstance(e, EngineStopped) else "; retry later"), kind,
                    headers={"retry-after": str(opts.retry_after_s)})

  def check_model(name):
    if name is not None and name != service.name:
      raise ApiError(404, f"model '{name}' is not served here; this server serves '{service.name}'", "not_found", "model")

  @app.get("/healthz")
  async def healthz():
    w = service.worker
    body = {"status": "draining" if service.draining else "ok" if service.ready else "warming up", "model": service.name,
            "checkpoint_step": service.step, "queue_depth": w.queue_depth, "replica": service.metrics.replica}
    if service.engine:
      body.update(slots=service.engine.slots, busy_slots=service.engine.busy_slots, context=service.context)
    status = 200 if service.ready and not service.draining else 503
    return Response(json.dumps(body).encode(), status, media_type=JSON)

  @app.get("/metrics")
  async def metrics():
    return Response(service.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

  @app.get("/v1/models")
  async def models():
    card = {"id": service.name, "object": "model", "created": protocol.now(), "owned_by": "dcmodel",
            "task": service.cfg.model.task}
    if service.engine:
      card["max_model_len"] = service.context
    return {"object": "list", "data": [card]}

  @app.post("/v1/completions")
  async def completions(request: Request):
    req = protocol.parse(protocol.CompletionRequest, await read_body(request, opts.max_body_bytes))
    if service.engine is None:
      raise ApiError(400, f"'{service.name}' is a {service.cfg.model.task} model ({service.cfg.model.name}); completions "
                          f"need a language model: use POST /v1/predict", param="prompt")
    check_model(req.model)
    protocol.check_sampling(req)
    engine, tok = service.engine, service.tokenizer
    seed = req.seed if req.seed is not None else secrets.randbits(32)
    params = dict(temperature=float(req.temperature), top_k=max(req.top_k, 0), top_p=float(req.top_p),
                  seed=seed % 2**32, stop=protocol.stops(req))
    prompts, seqs = protocol.prompts(req), []
    events, post = asyncio.Queue(), mailbox[0].put
    request_id, created = protocol.completion_id(), protocol.now()

    def emit(seq, delta, done):
      if done:
        service.record_sequence(seq)
      post(events, (seq, delta, done, len(seq.tokens)))

    for i, p in enumerate(prompts):
      ids = tok.encode(p) if isinstance(p, str) else np.asarray(p, np.int64)
      where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
      if not isinstance(p, str) and len(ids) and (ids.min() < 0 or ids.max() >= service.cfg.model.vocab_size):
        raise ApiError(400, f"{where} holds token ids outside 0..{service.cfg.model.vocab_size - 1}", param="prompt")
      if len(ids) == 0:
        raise ApiError(400, f"{where} is empty (it encodes to no tokens)", param="prompt")
      max_tokens = req.max_tokens if req.max_tokens is not None else 16
      if len(ids) + max_tokens > service.context:
        what = (f"{where} alone is {len(ids)} tokens" if len(ids) >= service.context else
                f"{where} ({len(ids)} tokens) + max_tokens ({max_tokens}) = {len(ids) + max_tokens} tokens")
        raise ApiError(400, f"this model's context is {service.context} tokens, but {what}; shorten the prompt or lower "
                            f"max_tokens", param="prompt" if len(ids) >= service.context else "max_tokens")
      seqs.append(Sequence(ids.astype(np.int32), Params(max_tokens=max_tokens, **params), tok, emit, stream=req.stream,
                           request_id=request_id, index=i))
    try:
      engine.submit(seqs)
    except (QueueFull, EngineStopped) as e:
      raise refuse_busy(e) from None
    echo = [(p if isinstance(p, str) else tok.decode(p).decode("utf-8", errors="replace")) if req.echo else "" for p in prompts]
    usage_of = lambda: (sum(len(s.prompt_ids) for s in seqs), sum(len(s.tokens) for s in seqs))

    def cancel_unfinished():
      for s in seqs:
        if not s.done:
          engine.cancel(s)

    if req.stream:
      include_usage = bool(req.stream_options and req.stream_options.include_usage)

      async def chunks():
        head = lambda choices: {"id": request_id, "object": "text_completion", "created": created, "model": service.name,
                                "choices": choices}
        # the head of every chunk serialized once: a chunk per token is the hot path
        prefix = protocol.sse(head([]))[:-len(b"[]}\n\n")]
        event = lambda choices: prefix + json.dumps(choices, separators=(",", ":")).encode() + b"}\n\n"
        if req.echo:
          for i, e in enumerate(echo):
            yield event([protocol.choice(i, e, None)])
        left, sent = len(seqs), [0] * len(seqs)
        while left:
          # what has piled up since the last event goes out as one event per choice: a client
          # (or this loop) that falls behind gets fewer, larger events, not a growing backlog
          got = [await events.get()]
          while not events.empty():
            got.append(events.get_nowait())
          pending = {}
          for seq, delta, done, upto in got:
            text, _, _, _ = pending.get(seq.index, ("", None, False, 0))
            pending[seq.index] = (text + delta, seq, done, upto)
          for index, (delta, seq, done, upto) in pending.items():
            if done and seq.finish_reason == "error":
              yield protocol.sse({"error": {"message": f"generation failed: {seq.error}", "type": "server_error",
                                            "param": None, "code": 500}})
            elif delta or done or req.return_token_ids:   # with token ids, an event whenever tokens came
              ids = None
              if req.return_token_ids:
                ids, sent[index] = seq.tokens[sent[index]:upto], upto
              yield event([protocol.choice(index, delta, seq.finish_reason if done else None, ids)])
            left -= done
        if include_usage:
          p, c = usage_of()
          yield protocol.sse({**head([]), "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
        yield protocol.sse("[DONE]")

      return EventStream(chunks(), cancel_unfinished)

    left = len(seqs)
    try:
      while left:
        try:
          _, _, done, _ = await asyncio.wait_for(events.get(), timeout=1.0)
          left -= done
        except TimeoutError:
          if await request.is_disconnected():
            return Response(status_code=499)
    finally:
      cancel_unfinished()
    failed = [s for s in seqs if s.finish_reason == "error"]
    if failed:
      raise ApiError(500, f"generation failed: {failed[0].error}", "server_error")
    choices = [protocol.choice(s.index, echo[s.index] + s.text, s.finish_reason, s.tokens if req.return_token_ids else None)
               for s in seqs]
    return protocol.completion(request_id, service.name, created, choices, *usage_of())

  @app.post("/v1/predict")
  async def predict(request: Request):
    req = protocol.parse(protocol.PredictRequest, await read_body(request, opts.max_body_bytes))
    if service.predictor is None:
      raise ApiError(400, f"'{service.name}' is a language model; use POST /v1/completions", param="rows")
    check_model(req.model)
    try:
      batch, raw = service.predictor.prepare(req.rows)
    except ValueError as e:
      raise ApiError(400, str(e), param="rows") from None
    loop, finished = asyncio.get_running_loop(), asyncio.Event()
    request_id = "pred-" + secrets.token_hex(12)
    job = Job(batch, len(req.rows), lambda j: loop.call_soon_threadsafe(finished.set))
    job.raw = raw
    try:
      service.predictor.submit(job)
    except (QueueFull, EngineStopped) as e:
      raise refuse_busy(e) from None
    await finished.wait()
    if job.error:
      raise ApiError(500, f"prediction failed: {job.error}", "server_error")
    service.record_job(job, request_id, req.rows)
    rows = [{k: v[i].tolist() for k, v in job.outputs.items()} for i in range(job.rows)]
    return {"id": request_id, "object": "prediction", "created": protocol.now(), "model": service.name,
            "checkpoint_step": service.step, "predictions": rows}

  app.add_middleware(Observe, metrics=service.metrics)
  return app


def describe(service: Service) -> str:
  engine = service.engine
  what = (f"{engine.slots} slots, context {service.context} tokens, prefill buckets {engine.buckets} x "
          f"{list(engine.prefill_rows)} rows" if engine else f"predict, batches up to {service.options.max_batch} rows")
  return (f"{service.name} ({service.cfg.model.name}) from checkpoint step {service.step} on mesh "
          f"{dict((k, v) for k, v in service.worker.placed.mesh.shape.items() if v > 1) or '1 device'} "
          f"({jax.device_count()} {jax.devices()[0].platform} devices): {what}")


class DrainingServer(uvicorn.Server):
  """uvicorn's server, except that SIGTERM, once in-flight requests are drained, ends the
  process normally (uvicorn would raise the signal again and die by it)."""

  def handle_exit(self, sig, frame) -> None:
    if not self.should_exit:
      print(f"[dcmodel] {signal.Signals(sig).name}: no new connections; draining in-flight requests", flush=True)
    super().handle_exit(sig, frame)
    if sig == signal.SIGTERM:
      self._captured_signals.remove(sig)


def listen(host: str, port: int) -> socket.socket:
  """A bound socket, or a user error naming the address (before any model is loaded)."""
  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port or --host") from None
  return sock


def share_the_gil() -> None:
  """The engine's thread waits on the device with the GIL released and must get it back as
  soon as a step is done; under load the event loop holds it, and Python hands it over only
  every switch interval (5 ms by default, several decode steps). 0.5 ms: ~2x the tokens/s of
  a loaded server here."""
  sys.setswitchinterval(float(os.environ.get("DCMODEL_SWITCH_S", "0.0005")))


def run(service: Service, sock: socket.socket, drain_timeout_s: float = 120.0) -> None:
  """Serve until SIGTERM / SIGINT, then drain (at most `drain_timeout_s`) and stop the service."""
  share_the_gil()
  config = uvicorn.Config(build_app(service), log_level="warning", access_log=False, timeout_graceful_shutdown=drain_timeout_s)
  DrainingServer(config).run(sockets=[sock])
