"""Stopping cleanly on SIGTERM (a preemption notice) and SIGINT (Ctrl-C): one path, every time.

A signal only records itself (the handler does nothing else, so wherever it lands, inside a
garbage-collection callback or a JAX call, it is neither lost nor able to break what was
running). The loop asks after each jitted call whether to stop (`Preemption`, a hook); it then
finishes the steps already dispatched, runs the end-of-run hooks (the metrics window, a
checkpoint at that step), and the command exits with 128 + the signal (130 for SIGINT, 143 for
SIGTERM). A second signal changes nothing: the first is being acted on.

Several processes stop at the same step through JAX's preemption sync manager, which
`jax.distributed.initialize` sets up. Every process calls
`multihost_utils.reached_preemption_sync_point` with its count of calls, once per call and from
nowhere else (the checkpointer keeps Orbax from calling it with checkpoint steps: the manager
keeps the last number passed, so a step number beside our count once moved the agreed stop 11
steps late); once a notice of preemption is in the coordination service, the processes agree on
the next count past every process's current one. The notice is posted by the recording handler
itself (it runs as soon as the main thread is back from the wait it was in), on the process that
got the signal, the way JAX's own SIGTERM notifier posts it (`NOTICE_KEY`): that notifier polls
its flag once a second, which at one-second steps put the stop two steps past the step in flight,
and posting at the next check instead let the other process count a call more first (measured:
off by 2 in 2 of 5). So the recording handler holds SIGTERM here too, on every process; a SIGTERM that reaches JAX's handler before ours is installed (between
`jax.distributed.initialize` and the run) is posted by JAX's notifier instead, a second later.
"""

from __future__ import annotations

import datetime
import signal
import threading

import jax
from jax._src import distributed      # its coordination-service client, as multihost_utils and Orbax reach it
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The coordination-service key JAX's preemption sync manager watches; its value is the death time
# (RFC 3339). kPreemptionNoticeKey in xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc.
NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
_received: list[int] = []            # the signals seen, first first (appending is safe in a handler)
_posted: list[bool] = []             # the preemption notice is in the coordination service


def _synced() -> bool:
  """True when JAX's preemption sync manager runs (jax.distributed with the preemption service)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def _record(signum, frame) -> None:
  first = not _received
  _received.append(signum)
  if first and _synced():
    try:
      post_notice()
    except Exception:     # never raise into whatever the main thread was doing: Watch posts it then
      return
    _posted.append(True)


class Signals:
  """While entered (in the main thread), SIGTERM and SIGINT are recorded instead of killing or
  raising KeyboardInterrupt; the previous handlers come back when the outermost entry exits.
  Nested entries (the CLI around train()) share the outer one's record, and take SIGTERM back
  from JAX's notifier when jax.distributed.initialize ran in between (the CLI's order)."""

  _depth = 0
  _previous: dict = {}

  def __enter__(self) -> "Signals":
    if threading.current_thread() is not threading.main_thread():
      return self                             # signal handlers can only be set from the main thread
    Signals._depth += 1
    if Signals._depth == 1:
      _received.clear()
      _posted.clear()
      Signals._previous = {signum: signal.signal(signum, _record) for signum in SIGNALS}
    elif _synced():
      signal.signal(signal.SIGTERM, _record)
    return self

  def __exit__(self, *exc) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    Signals._depth -= 1
    if Signals._depth == 0:
      for signum, handler in Signals._previous.items():
        # None: a handler set outside Python (JAX's notifier, entered after initialize), which
        # Python cannot put back; the default (terminate) is what a signal after the run should do.
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
      Signals._previous = {}


def received() -> int | None:
  """The first signal recorded, if any."""
  return _received[0] if _received else None


class Watch:
  """Asked after each jitted call of a run (and once before the first): the signal to stop on,
  if it is time; on several processes at the same count of calls on all (and only then)."""

  def __init__(self):
    self.synced = _synced()

  def stop_signal(self, calls: int) -> int | None:
    if not self.synced:
      return received()
    if _received and not _posted:
      _posted.append(True)
      post_notice()
    if multihost_utils.reached_preemption_sync_point(calls):
      return received() or signal.SIGTERM    # SIGTERM: here or on another process
    return None


def post_notice() -> None:
  """Start every process's preemption sync now: the notice JAX's SIGTERM notifier posts (up to a
  second after the signal), posted at once. Another process's notice already there is the same."""
  death = datetime.datetime.now(datetime.timezone.utc).isoformat()
  try:
    distributed.global_state.client.key_value_set(NOTICE_KEY, death)
  except Exception as e:   # the client's error type is jaxlib's, not exported
    if "ALREADY_EXISTS" not in str(e):
      raise


def name(signum: int) -> str:
  return signal.Signals(signum).name
