"""Stopping cleanly on SIGTERM (a preemption notice) and SIGINT (Ctrl-C): one path, every time.

A signal only records itself (the handler does nothing else, so wherever it lands, inside a
garbage-collection callback or a JAX call, it is neither lost nor able to break what was
running). The loop asks after each jitted call whether to stop (`Preemption`, a hook); it then
finishes the steps already dispatched, runs the end-of-run hooks (the metrics window, a
checkpoint at that step), and the command exits with 128 + the signal (130 for SIGINT, 143 for
SIGTERM). A second signal changes nothing: the first is being acted on.

Several processes stop at the same step through JAX's preemption sync manager, which
`jax.distributed.initialize` sets up: its notifier owns SIGTERM (a C handler installed at
initialize; a Python handler installed after it would replace it, so none is), and every
process calls `multihost_utils.reached_preemption_sync_point` with its count of calls; once any
process has a notice, all agree on the next count past every process's current one (the notifier
polls once a second, so that is about a second of steps later). SIGINT, which JAX does not watch,
is recorded and re-sent to this process as SIGTERM, into the same path. Orbax's own preemption
policy reads the same sync point; dcmodel saves through its checkpoint hook instead.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []            # the signals seen, first first (appending is safe in a handler)


def _synced() -> bool:
  """True when JAX's preemption sync manager runs (jax.distributed with the preemption service)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def _record(signum, frame) -> None:
  first = not _received
  _received.append(signum)
  if first and signum != signal.SIGTERM and _synced():
    os.kill(os.getpid(), signal.SIGTERM)     # into the sync manager's notifier, like a preemption


class Signals:
  """While entered (in the main thread), SIGTERM and SIGINT are recorded instead of killing or
  raising KeyboardInterrupt; the previous handlers come back on exit. Nested entries (the CLI
  around train()) share the outer one's record. Entered after jax.distributed.initialize, it
  leaves SIGTERM to JAX's notifier, and hands it a SIGTERM recorded before."""

  _depth = 0

  def __init__(self):
    self._previous = {}

  def __enter__(self) -> "Signals":
    if threading.current_thread() is not threading.main_thread():
      return self                             # signal handlers can only be set from the main thread
    Signals._depth += 1
    if Signals._depth == 1:
      _received.clear()
      for signum in SIGNALS:
        if signum == signal.SIGTERM and _synced():
          continue                            # JAX's notifier has it (see the module doc)
        self._previous[signum] = signal.signal(signum, _record)
    elif _synced() and _received:
      os.kill(os.getpid(), signal.SIGTERM)    # recorded before JAX's notifier was installed: pass it on
    return self

  def __exit__(self, *exc) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    Signals._depth -= 1
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


def received() -> int | None:
  """The first signal recorded, if any."""
  return _received[0] if _received else None


class Watch:
  """Asked after each jitted call of a run (and once before the first): the signal to stop on,
  if it is time; on several processes at the same count of calls on all (and only then)."""

  def __init__(self):
    self.synced = _synced()

  def stop_signal(self, calls: int) -> int | None:
    if self.synced:
      if multihost_utils.reached_preemption_sync_point(calls):
        return received() or signal.SIGTERM    # SIGTERM: here or on another process
      return None
    return _received[0] if _received else None


def name(signum: int) -> str:
  return signal.Signals(signum).name
