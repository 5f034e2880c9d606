"""sha256 checks of downloaded and extracted files (:mod:`helpers.checkpoints`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


class ChecksumError(OSError):
    """A downloaded or extracted file does not have the expected sha256 or size."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, sha256: str, size: int | None = None) -> None:
    """Raise :class:`ChecksumError` naming ``path`` and both hashes unless the file matches."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{path}: {actual_size} bytes, expected {size} (truncated or wrong file)")
    actual = sha256_file(path)
    if actual != sha256:
        raise ChecksumError(f"{path}: sha256 {actual}, expected {sha256} (corrupted or wrong file)")
