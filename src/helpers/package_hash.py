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


def _package_files() -> list[Path]:
    """The package's .py/.yaml/.json files (``__pycache__`` left out), sorted."""
    return [p for p in sorted(PACKAGE_DIR.rglob("*"))
            if p.is_file() and p.suffix in (".py", ".yaml", ".json") and "__pycache__" not in p.parts]


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(PACKAGE_DIR)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _top(p: Path) -> str:
    return p.relative_to(PACKAGE_DIR).parts[0]


def source_hash() -> str:
    """Hash of the ``helpers`` package's source (.py, .yaml, .json), its data folders (:data:`DATA_DIRS`) left
    out: part of every stage key and of the fingerprints of cached tables (tracing, facts, σ, editing cells)."""
    return _hash_files([p for p in _package_files() if _top(p) not in DATA_DIRS])


def hparams_hash() -> str:
    """Hash of every hyperparameter file (``helpers/hparams/*.yaml``): part of every stage key (``pipeline``)."""
    return _hash_files([p for p in _package_files() if _top(p) == "hparams"])
