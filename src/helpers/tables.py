"""Tidy tables on disk: atomic parquet writes, so a crash never leaves a half-written results file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` (readers never see a
    half-written file, and concurrent writers of the same content are safe); on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Read a parquet table written by :func:`write_table`, with an error naming the missing stage output."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes it first")
    return pd.read_parquet(path)
