"""One run per workdir: WORKDIR/run.lock, held with flock(2) for the life of the run.

The file names the holder (pid, host, start time) for the message a second run prints. What it
relies on: the kernel drops a flock when its holder dies however it dies (kill -9 included), so a
lock left by a dead run never blocks; the file itself is never deleted (deleting it would let two
runs lock two different files of the same name). On a filesystem shared by hosts, flock must be
honoured across them: Linux NFS clients turn flock into NFS byte-range locks (since 2.6.12), which
are; filesystems that do not support locking (flock fails with ENOLCK/EOPNOTSUPP/ENOSYS) fall back
to the holder's pid, checked only when the holder is on this host, with a warning. Multi-process
runs: process 0 holds the lock for the run, and every process agrees on the outcome.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from dcmodel.errors import UserError

NAME = "run.lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def holder(path: Path) -> dict:
  try:
    fields = dict(part.split("=", 1) for part in path.read_text().split() if "=" in part)
  except OSError:
    fields = {}
  return fields


def _alive_here(holder: dict) -> bool:
  if holder.get("host") != socket.gethostname():
    return False
  try:
    os.kill(int(holder.get("pid", "0")), 0)
    return int(holder["pid"]) != os.getpid()
  except (ProcessLookupError, ValueError):
    return False
  except PermissionError:
    return True


def refusal(workdir: Path, holder: dict) -> UserError:
  since = f" since {holder['since']}" if holder.get("since") else ""
  return UserError(f"workdir {workdir} is in use by another run (pid {holder.get('pid', '?')} on host "
                   f"{holder.get('host', '?')}{since}); wait for it to finish, stop it, or use another --workdir")


class RunLock:
  def __init__(self, workdir: Path):
    self.workdir = Path(workdir)
    self.path = self.workdir / NAME
    self._fd = None

  def acquire(self) -> None:
    """Take the lock or raise the one-line refusal naming the holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        os.close(fd)
        raise refusal(self.workdir, holder(self.path)) from None
      if e.errno not in UNSUPPORTED:
        os.close(fd)
        raise
      other = holder(self.path)
      print(f"dcmodel: warning: {self.path.parent} does not support file locks ({e.strerror}); only a run on this "
            f"host is detected", flush=True)
      if _alive_here(other):
        os.close(fd)
        raise refusal(self.workdir, other) from None
    record = f"pid={os.getpid()} host={socket.gethostname()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)          # closing drops the flock; the file stays (see the module doc)
      self._fd = None
