"""Tidy tables on disk: atomic parquet writes, so a crash never leaves a half-written results file."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from . import integrity


class DiskFull(OSError):
    """A write ran out of space: names the file, the space it needed (at least) and what was free."""

    def __init__(self, path: Path, needed: int, free: int) -> None:
        super().__init__(errno.ENOSPC, f"no space left on the device to write {path}: it needs at least "
                                       f"{_size(needed)}, {_size(free)} free there; free some space and re-run "
                                       "(finished work is kept, nothing half-written was left)")
        self.path, self.needed, self.free = path, needed, free


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """``fig.savefig(path, **kwargs)`` written atomically with its size/sha256 record (format from the suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), **kwargs)
    return path


def save_csv(df: pd.DataFrame, path: str | Path, **kwargs) -> Path:
    """``df.to_csv(path, **kwargs)`` written atomically with its size/sha256 record."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)
    return path


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
