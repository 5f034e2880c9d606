"""Tidy tables on disk: atomic parquet writes, so a crash never leaves a half-written results file."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from . import integrity

log = logging.getLogger(__name__)


class DiskFull(OSError):
    """A write ran out of space: names the file, the space it needed (at least) and what was free."""

    def __init__(self, path: Path, needed: int, free: int) -> None:
        super().__init__(errno.ENOSPC, f"no space left on the device to write {path}: it needs at least "
                                       f"{_size(needed)}, {_size(free)} free there; free some space and re-run "
                                       "(finished work is kept, nothing half-written was left)")
        self.path, self.needed, self.free = path, needed, free

    def __reduce__(self):  # picklable with its fields (it travels back from Ray workers)
        return type(self), (self.path, self.needed, self.free)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@contextlib.contextmanager
def atomic_path(path: str | Path, expected_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` (readers never see a
    half-written file, and concurrent writers of the same content are safe); on error it is removed. A write
    that fails for lack of space raises :class:`DiskFull` (``expected_bytes``, if known, is reported as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        integrity.record(path, of=Path(tmp))  # the record first: a file is never newer than its record
        os.replace(tmp, path)
        _note_output(path)
    except OSError as err:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(err, DiskFull):
            raise DiskFull(path, max(expected_bytes, written + 1), shutil.disk_usage(path.parent).free) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Environment variable naming the file where a stage lists what it wrote (set by the stage runner).
OUTPUTS_ENV = "HELPERS_OUTPUTS_FILE"


def _note_output(path: Path) -> None:
    """Append ``path`` to the running stage's list of outputs (one line, one append)."""
    listing = os.environ.get(OUTPUTS_ENV)
    if listing:
        with open(listing, "a") as f:
            f.write(f"{Path(path).resolve()}\n")


def save_figure(fig, path: str | Path, **kwargs) -> None:
    """``fig.savefig(path, **kwargs)`` written atomically with its size/sha256 record (format from the suffix).
    Returns nothing, so a notebook cell that ends with it shows no value (a local path) on the page."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), **kwargs)


def save_csv(df: pd.DataFrame, path: str | Path, **kwargs) -> None:
    """``df.to_csv(path, **kwargs)`` written atomically with its size/sha256 record (returns nothing, as
    :func:`save_figure`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)


KEY_ATTR = "helpers_key"


def write_table(df: pd.DataFrame, path: str | Path, key: str | None = None) -> Path:
    """Write ``df`` to ``path`` (parquet) atomically. ``key``, a fingerprint of whatever produced the rows
    (settings, model, code), is stored in the file's metadata, in the same atomic write: see :func:`table_key`."""
    if key is not None:
        df = df.copy(deep=False)
        df.attrs = {**df.attrs, KEY_ATTR: key}
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def table_key(df: pd.DataFrame) -> str | None:
    """The ``key`` a table was written with (None if none)."""
    return df.attrs.get(KEY_ATTR)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a parquet table written by :func:`write_table`, checked against its size/sha256 record first:
    a missing table is a :class:`FileNotFoundError` naming the stage output, a damaged one a
    :class:`~helpers.integrity.CorruptFile` naming the path and the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes it first")
    integrity.check(path)
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # a file from before records existed, damaged
        raise integrity.CorruptFile(path, f"not a readable parquet table ({err})") from err


_WRITER_PID = re.compile(r"\.(\d+)\.[A-Za-z0-9_]+\.tmp$|\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, everything: bool = False) -> list[Path]:
    """Remove the temporary files (and folders) that writers killed mid-write left under ``folder``: those whose
    writer's process id (in the name) is gone, or with ``everything`` (a results folder whose run lock this process
    holds) every temporary. Returns what was removed."""
    removed = []
    for p in sorted(Path(folder).rglob("*"), reverse=True):
        name = p.name
        if not (name.endswith(".tmp") or ".tmp-" in name):
            continue
        m = _WRITER_PID.search(name)
        pid = int(m.group(1) or m.group(2)) if m else None
        if everything or (pid is not None and pid != os.getpid() and not _alive(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d temporary files left by interrupted writers under %s", len(removed), folder)
    return removed
