"""Prometheus metrics of one replica (`prometheus-client`, text format at GET /metrics).

Each server has its own registry (several can live in one process: tests, notebooks). Counters
and histograms follow Prometheus naming (`_total`, `_seconds`); a scraper computes rates, and
for a person reading /metrics by hand the replica also reports generated tokens per second
over the last `window_s` seconds. `replica` labels every series with where it came from
(host:pid), so scrapes through a balancer can be told apart.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def replica_name() -> str:
  return f"{socket.gethostname()}:{os.getpid()}"


class ServeMetrics:
  def __init__(self, model: str, slots: int, window_s: float = 10.0):
    self.registry = CollectorRegistry()
    self.replica = replica_name()
    r, labels = self.registry, {"replica": self.replica, "model": model}
    lab = lambda *extra: ["replica", "model", *extra]
    self.requests = Counter("dcmodel_requests", "HTTP requests answered, by endpoint and status", lab("endpoint", "status"),
                            registry=r)
    self.latency = Histogram("dcmodel_request_latency_seconds", "time from a request's arrival to its last byte",
                             lab("endpoint"), buckets=LATENCY_BUCKETS, registry=r)
    self.ttft = Histogram("dcmodel_time_to_first_token_seconds", "time from a completion's arrival to its first token "
                          "(queueing and prefill)", lab(), buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
    self.prompt_tokens = Counter("dcmodel_prompt_tokens", "prompt tokens prefilled", lab(), registry=r).labels(**labels)
    self.generated_tokens = Counter("dcmodel_generated_tokens", "tokens generated", lab(), registry=r).labels(**labels)
    self.rows = Counter("dcmodel_predicted_rows", "rows predicted", lab(), registry=r).labels(**labels)
    self.step_seconds = Histogram("dcmodel_step_seconds", "one jitted engine call: a prefill group or a decode step",
                                  lab("kind"), buckets=STEP_BUCKETS, registry=r)
    self.step_rows = Counter("dcmodel_step_rows", "busy slots (decode) or prompts (prefill) served by engine calls",
                             lab("kind"), registry=r)
    self.tokens_per_s = Gauge("dcmodel_generated_tokens_per_second", f"tokens generated per second over the last {window_s:g} s",
                              lab(), registry=r).labels(**labels)
    self.queue_depth = Gauge("dcmodel_queue_depth", "requests waiting for a slot", lab(), registry=r).labels(**labels)
    self.busy_slots = Gauge("dcmodel_busy_slots", "KV-cache slots holding a sequence", lab(), registry=r).labels(**labels)
    self.slots = Gauge("dcmodel_slots", "KV-cache slots in the pool", lab(), registry=r).labels(**labels)
    self.slots.set(slots)
    self.in_flight = Gauge("dcmodel_requests_in_flight", "HTTP requests being answered", lab(), registry=r).labels(**labels)
    self._labels = labels
    self._window_s = window_s
    self._recent: collections.deque[tuple[float, int]] = collections.deque()
    self._lock = threading.Lock()

  def watch(self, queue_depth, busy_slots) -> None:
    """Read the gauges from these callables at each scrape (the engine's own counts)."""
    self.queue_depth.set_function(queue_depth)
    self.busy_slots.set_function(busy_slots)

  def request(self, endpoint: str, status: int, seconds: float) -> None:
    self.requests.labels(**self._labels, endpoint=endpoint, status=str(status)).inc()
    self.latency.labels(**self._labels, endpoint=endpoint).observe(seconds)

  def step(self, kind: str, seconds: float, rows: int, tokens: int) -> None:
    """An engine call: its time, how many sequences it served, how many tokens it consumed
    (prefill: prompt tokens) or produced (decode)."""
    self.step_seconds.labels(**self._labels, kind=kind).observe(seconds)
    self.step_rows.labels(**self._labels, kind=kind).inc(rows)
    if kind == "prefill":
      self.prompt_tokens.inc(tokens)
      tokens = rows              # each prefilled prompt also yields its first token
    self.generated_tokens.inc(tokens)
    now = time.monotonic()
    with self._lock:
      self._recent.append((now, tokens))

  def _rate(self) -> float:
    now = time.monotonic()
    with self._lock:
      while self._recent and self._recent[0][0] < now - self._window_s:
        self._recent.popleft()
      return sum(n for _, n in self._recent) / self._window_s

  def text(self) -> bytes:
    self.tokens_per_s.set(self._rate())
    return generate_latest(self.registry)
