"""Cached and generated files are checked before use: each is written with a record of its size and sha256.

A file ``dir/name`` written through :func:`helpers.tables.atomic_path` gets a hidden sidecar
``dir/.name.sha256`` (``"<sha256> <size>"``), written before the file itself is renamed into place. A folder
(a converted model, the trained world model) records every file it holds in a manifest inside it.
:func:`problem` says what is wrong with a file (None when it matches its record); a cache that finds a problem
logs the path and the problem, deletes the file and rebuilds it, and never reads the bad bytes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from .checksums import sha256_file

log = logging.getLogger(__name__)

FOLDER_MANIFEST = "helpers_manifest.json"


class CorruptFile(OSError):
    """A file does not match the size or sha256 recorded when it was written (truncated, changed, damaged)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem

    def __reduce__(self):  # picklable with its fields (it travels back from Ray workers)
        return type(self), (self.path, self.problem)


def sidecar(path: Path) -> Path:
    """Where the record of ``path`` lives."""
    path = Path(path)
    return path.with_name(f".{path.name}.sha256")


def content_record(path: Path) -> list:
    """``[sha256, size in bytes]`` of a file: what a record (and a stage stamp's list of outputs) holds."""
    return [sha256_file(path), Path(path).stat().st_size]


def record(path: Path, of: Path | None = None) -> None:
    """Write the record of ``of`` (default ``path``: a file about to be renamed to ``path``) atomically."""
    path, of = Path(path), Path(of or path)
    side = sidecar(path)
    tmp = side.with_name(f"{side.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text("{} {}\n".format(*content_record(of)))
        os.replace(tmp, side)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def problem(path: Path, require_record: bool = False) -> str | None:
    """What is wrong with ``path``: missing, or not matching its record (None if it matches). A file written
    before records existed has none: accepted unless ``require_record``."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        sha, size = sidecar(path).read_text().split()
    except FileNotFoundError:
        return "no size/sha256 record" if require_record else None
    except (OSError, ValueError):
        return "unreadable size/sha256 record"
    actual = path.stat().st_size
    if actual != int(size):
        return f"{actual} bytes, {size} when written (truncated or changed)"
    if sha256_file(path) != sha:
        return "sha256 differs from the one recorded when it was written (damaged or changed)"
    return None


def check(path: Path, require_record: bool = False) -> None:
    """Raise :class:`CorruptFile` naming ``path`` unless it matches its record."""
    p = problem(path, require_record)
    if p is not None:
        raise CorruptFile(path, p)


def discard_if_bad(path: Path, what: str = "cached file") -> bool:
    """True if ``path`` exists and matches its record. A file that does not is logged with its path and the
    problem, and deleted (with its record), so that the caller rebuilds it."""
    path = Path(path)
    if not path.exists():
        return False
    p = problem(path)
    for _ in range(3):  # another process may be between writing a record and renaming its file into place
        if p is None:
            return True
        time.sleep(0.2)
        p = problem(path)
    if p is None:
        return True
    log.warning("%s %s is not usable (%s): deleting it and rebuilding", what, path, p)
    remove(path)
    return False


def remove(path: Path) -> None:
    """Delete a file and its record."""
    Path(path).unlink(missing_ok=True)
    sidecar(Path(path)).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- folders


def write_manifest(folder: Path) -> None:
    """Record size and sha256 of every file in ``folder`` (recursively) in :data:`FOLDER_MANIFEST`."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): [sha256_file(p), p.stat().st_size]
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != FOLDER_MANIFEST}
    (folder / FOLDER_MANIFEST).write_text(json.dumps(files, indent=1) + "\n")


def folder_problem(folder: Path) -> str | None:
    """What is wrong with a folder written with :func:`write_manifest` (None if every file matches; a folder
    written before manifests existed has none and is accepted)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / FOLDER_MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"unreadable {FOLDER_MANIFEST}"
    for name, (sha, size) in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name}: {p.stat().st_size} bytes, {size} when written (truncated or changed)"
        if sha256_file(p) != sha:
            return f"{name}: sha256 differs from the one recorded when it was written (damaged or changed)"
    return None
