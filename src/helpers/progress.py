"""Progress that crosses the notebook-kernel boundary: bars inside a stage, one status line in the terminal.

A stage runs in a Jupyter kernel (papermill), whose own output goes into the executed notebook. To show the
person at the terminal where a long stage is, every progress bar in ``helpers`` is :class:`tqdm` from this
module: a ``tqdm.auto`` bar that, when the environment variable :data:`ENV` names a file, also writes the state
of the process's open bars to that file (atomically, at most once a second). The stage runner sets the variable
for each kernel and :class:`StatusLine` reads the files and draws one line: stage, bar, count, elapsed < ETA.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import ClassVar, TextIO

from tqdm.auto import tqdm as _auto_tqdm

from . import thread_budget

#: Environment variable naming the file a kernel's bars are relayed to.
ENV = "HELPERS_PROGRESS_FILE"
RELAY_INTERVAL_S = 1.0


class tqdm(_auto_tqdm):  # noqa: N801 (tqdm's own name, so that call sites read as usual)
    """``tqdm.auto.tqdm`` that also relays its state to the file named by ``$HELPERS_PROGRESS_FILE``."""

    # by id() (tqdm's __eq__ compares screen positions), weakly: a bar never closed does not stay on the line
    _open: ClassVar["weakref.WeakValueDictionary[int, tqdm]"] = weakref.WeakValueDictionary()
    _last_relay: ClassVar[float] = 0.0
    _relay_lock: ClassVar[threading.RLock] = threading.RLock()  # not tqdm's own ``_lock``

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._relayed_at = 0.0
        if not self.disable and os.environ.get(ENV):
            with tqdm._relay_lock:
                tqdm._open[id(self)] = self
            _relay(force=True)

    def update(self, n: float | None = 1) -> bool | None:
        out = super().update(n)
        thread_budget.follow()  # a long stage takes up the cores another stage has freed
        if not self.disable and id(self) in tqdm._open:
            # a slow bar's every step is shown; fast ones at most once a second
            _relay(force=time.monotonic() - self._relayed_at >= RELAY_INTERVAL_S)
            self._relayed_at = time.monotonic()
        return out

    def close(self) -> None:
        was_open = id(self) in tqdm._open
        super().close()
        if was_open:
            with tqdm._relay_lock:
                tqdm._open.pop(id(self), None)
            _relay(force=True)


def _state(bar: tqdm) -> dict:
    d = bar.format_dict
    return {"desc": (d.get("prefix") or "").rstrip(": "), "n": d.get("n", 0), "total": d.get("total"),
            "elapsed": d.get("elapsed", 0.0), "rate": d.get("rate")}


def _relay(force: bool = False) -> None:
    """Write the open bars' states to ``$HELPERS_PROGRESS_FILE`` (atomically; at most once a second unless
    ``force``). Never raises: progress must not break a stage."""
    path = os.environ.get(ENV)
    now = time.monotonic()
    if not path or (not force and now - tqdm._last_relay < RELAY_INTERVAL_S):
        return
    tqdm._last_relay = now
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with tqdm._relay_lock:
            states = [_state(b) for b in list(tqdm._open.values())]
        Path(tmp).write_text(json.dumps(states, default=float))
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 (progress must never break a stage)
        Path(tmp).unlink(missing_ok=True)


def read_states(path: Path) -> list[dict]:
    """The bar states last relayed to ``path`` (empty when none yet or unreadable)."""
    try:
        out = json.loads(Path(path).read_text())
        return out if isinstance(out, list) else []
    except (OSError, ValueError):
        return []


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def describe(states: list[dict], width: int = 20) -> str:
    """One line for a stage's bars: the outermost with a bar, count and ``elapsed<eta``; inner ones by count."""
    if not states:
        return ""
    parts = []
    for i, s in enumerate(states):
        n, total, rate = s.get("n") or 0, s.get("total"), s.get("rate")
        if total:
            frac = min(1.0, n / total)
            eta = (total - n) / rate if rate else None
            count = f"{n:g}/{total:g}"
            if i == 0:
                fill = int(frac * width)
                parts.append(f"{s['desc']} |{'█' * fill}{' ' * (width - fill)}| {count} "
                             f"[{_clock(s.get('elapsed'))}<{_clock(eta)}]")
            else:
                parts.append(f"{s['desc']} {count}")
        else:
            parts.append(f"{s['desc']} {n:g} [{_clock(s.get('elapsed'))}]")
    return " · ".join(parts)


class StatusLine:
    """Draws the running stages' progress on one terminal line (``\\r``-rewritten on a terminal; on a pipe or a
    log file one plain line per ``every_s`` seconds). :meth:`print` writes a permanent line above it."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 1.0, every_s: float = 60.0) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s, self.every_s = interval_s, every_s
        self.running: dict[str, tuple[Path, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._shown = 0
        self._last_plain = 0.0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StatusLine":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            self._clear()

    def start(self, label: str, progress_file: Path) -> None:
        with self._lock:
            self.running[label] = (Path(progress_file), time.monotonic())

    def stop(self, label: str) -> None:
        with self._lock:
            self.running.pop(label, None)

    def print(self, text: str) -> None:
        with self._lock:
            self._clear()
            print(text, file=self.stream, flush=True)

    def line(self) -> str:
        """The current status text of every running stage."""
        now = time.monotonic()
        parts = []
        for label, (path, t0) in self.running.items():
            desc = describe(read_states(path))
            parts.append(f"{label} [{_clock(now - t0)}]" + (f" {desc}" if desc else ""))
        return "  |  ".join(parts)

    def _clear(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                text = self.line()
                if not text:
                    continue
                if self.tty:
                    cols = shutil.get_terminal_size((120, 20)).columns - 1
                    text = text[:cols]
                    self.stream.write("\r" + text + " " * max(0, self._shown - len(text)))
                    self.stream.flush()
                    self._shown = len(text)
                elif time.monotonic() - self._last_plain >= self.every_s:
                    self._last_plain = time.monotonic()
                    print(f"[pipeline]   ... {text}", file=self.stream, flush=True)


#: Environment variable naming the file a stage kernel's log records and Python warnings go to.
LOG_ENV = "HELPERS_LOG_FILE"


def log_to_stage_file(level: int = 20) -> None:
    """In a stage notebook: send log records (``level`` and up, INFO by default) and Python warnings to the
    stage's log file (``$HELPERS_LOG_FILE``, set by the stage runner) instead of the page; outside a run (a
    reader's own kernel), show warnings and up on the page as usual."""
    import logging

    root = logging.getLogger()
    path = os.environ.get(LOG_ENV)
    if not path:
        logging.basicConfig(level=logging.WARNING)
        return
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    import warnings

    warnings.simplefilter("default")  # each distinct warning once, into the log
