"""Hashes of the ``helpers`` package that key cached results: its code (:func:`source_hash`) and its
hyperparameter files (:func:`hparams_hash`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

#: Package folders of data files, not code: their bytes are left out of :func:`source_hash`. A profile is hashed
#: into its own stages' keys (:func:`_stage_key`); a hyperparameter file reaches cached results through the values
#: a cell reads from it, which are part of that cell's fingerprint (``sweep``), and it is hashed into every stage
#: key (:func:`hparams_hash`) so the notebooks re-run. Editing one re-runs stages, not the tracing, the facts or
#: the editing cells whose inputs did not change.
DATA_DIRS = ("hparams", "profiles")


def _package_files(dirs: tuple[str, ...] | None = None) -> list[Path]:
    """The package's .py/.yaml/.json files, sorted: all but :data:`DATA_DIRS` (``dirs`` None), or those under
    the top-level folders ``dirs``."""
    out = []
    for p in sorted(PACKAGE_DIR.rglob("*")):
        if not p.is_file() or p.suffix not in (".py", ".yaml", ".json") or "__pycache__" in p.parts:
            continue
        top = p.relative_to(PACKAGE_DIR).parts[0]
        if (top in dirs) if dirs is not None else (top not in DATA_DIRS):
            out.append(p)
    return out


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(PACKAGE_DIR)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def source_hash() -> str:
    """Hash of the ``helpers`` package's source (.py, .yaml, .json), its data folders (:data:`DATA_DIRS`) left
    out: part of every stage key and of the fingerprints of cached tables (tracing, facts, σ, editing cells)."""
    return _hash_files(_package_files())


def hparams_hash() -> str:
    """Hash of every hyperparameter file (``helpers/hparams/*.yaml``): part of every stage key."""
    return _hash_files(_package_files(("hparams",)))
