"""One run at a time per results folder: an exclusive ``flock`` on ``<results>/.lock``.

The lock file holds JSON ``{pid, started, host, argv}`` of the run holding it and is emptied when that run
releases it. ``flock`` locks die with their process, so a lock that can be acquired is never held: a file that
still names a run when we acquire it was left by a run that was killed (the stale lock is taken over, with a
log message). The file descriptor is not inherited by child processes (notebook kernels), so a kernel that
outlives its run cannot keep the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another run holds the results folder's lock; the message names its pid, start time and the lock path."""

    def __init__(self, lock_path: Path, holder: dict[str, Any]):
        self.lock_path, self.holder = lock_path, holder
        note = ""
        pid, host = holder.get("pid"), holder.get("host")
        if pid and host in (None, socket.gethostname()) and not pid_alive(int(pid)):
            note = f" (pid {pid} is no longer running, but a process it started still holds the lock)"
        super().__init__(
            f"another run is using {lock_path.parent}: {describe(holder, command=True)}{note}; lock file "
            f"{lock_path}. Wait for it to finish, or run with --wait (wait=True) to start when it does."
        )


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (``os.kill(pid, 0)``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError as err:
        return err.errno != errno.ESRCH
    return True


def describe(holder: dict[str, Any], command: bool = False) -> str:
    """'run pid N (started T[, on host H][, command: ...])' for a lock file's contents; says so when they are
    unreadable."""
    if not holder.get("pid"):
        return "a run whose details are not (yet) written in the lock file"
    text = f"run pid {holder['pid']} (started {holder.get('started', '?')}"
    if holder.get("host") and holder["host"] != socket.gethostname():
        text += f", on host {holder['host']}"
    if command and holder.get("argv"):
        text += f", command: {' '.join(map(str, holder['argv']))}"
    return text + ")"


def _read(fd: int) -> dict[str, Any]:
    """The lock file's JSON ({} when empty or unreadable)."""
    try:
        raw = os.pread(fd, 1 << 16, 0)
        holder = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _report_stale(lock_path: Path, previous: dict[str, Any]) -> None:
    """Log that a killed run's lock is taken over (the lock was free, so its holder no longer holds it)."""
    pid = previous.get("pid")
    if not pid or pid == os.getpid():
        return
    same_host = previous.get("host") in (None, socket.gethostname())
    if not same_host:
        state = f"on host {previous['host']}, not checked"
    elif pid_alive(int(pid)):
        state = "a process with that pid exists but does not hold the lock: the pid was reused"
    else:
        state = "no longer running"
    log.warning("cleared the stale lock of pid %s (started %s; %s): %s", pid, previous.get("started", "?"),
                state, lock_path)


@contextmanager
def run_lock(results_dir: Path, wait: bool = False, poll_s: float = 2.0) -> Iterator[Path]:
    """Hold the exclusive lock on ``results_dir/.lock`` for the ``with`` block; yields the lock path.

    Held by another run: raise :class:`RunLocked`, or with ``wait=True`` log one "waiting for run pid N ..."
    message and retry every ``poll_s`` seconds. A lock left by a killed run is taken over (logged).
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    lock_path = results_dir / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    locked = False
    try:
        announced = False
        while not _try_lock(fd):
            holder = _read(fd)
            if not holder:  # the holder may be between taking the lock and writing its details
                time.sleep(0.05)
                holder = _read(fd)
            if not wait:
                raise RunLocked(lock_path, holder)
            if not announced:
                log.info("waiting for %s to finish (lock %s)", describe(holder), lock_path)
                announced = True
            time.sleep(poll_s)
        locked = True
        _report_stale(lock_path, _read(fd))
        info = {"pid": os.getpid(), "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                "host": socket.gethostname(), "argv": list(sys.argv)}
        _write(fd, info)
        yield lock_path
    finally:
        if locked:
            try:
                os.ftruncate(fd, 0)  # an empty file = released cleanly (not stale)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
