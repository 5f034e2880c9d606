"""What a finished stage leaves for the next run to trust: its stamp (``results/<profile>/.stages/<stage>.json``:
the stage key, its time, and the size and sha256 of every file it wrote) and the check of those files."""

from __future__ import annotations

import json
from pathlib import Path

from . import integrity
from .integrity import content_record as _record


def read_stamp(stamp: Path) -> dict:
    """A stage's stamp, or {} when it is missing or unreadable (the stage then runs again)."""
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}


def outputs(executed: Path, listing: Path) -> dict[str, list]:
    """Size and sha256 of the executed notebook and of every file the stage wrote through
    :func:`helpers.tables.atomic_path` (its tables, figures, CSVs and caches, listed in ``listing``), by path."""
    out = {str(executed): _record(executed)}
    try:
        written = dict.fromkeys(listing.read_text().split("\n"))
    except FileNotFoundError:
        written = {}
    for name in written:
        try:
            if name:
                out[name] = _record(Path(name))
        except FileNotFoundError:  # written, then removed by the stage itself (a checkpoint it replaced)
            pass
    return out


def damaged_output(stamp: dict, executed: Path) -> str | None:
    """Why a finished stage's outputs cannot be trusted (None when they can): one is missing, or differs both
    from what the stage wrote and from its own size/sha256 record (a later stage may rewrite a shared table,
    always with a new record)."""
    for path, (sha, size) in stamp.get("outputs", {}).items():
        p = Path(path)
        if not p.is_file():
            return f"its output {p} is missing"
        if _record(p) == [sha, size]:
            continue
        if p == executed or not integrity.sidecar(p).exists():
            return f"its output {p} was changed or damaged"
        bad = integrity.problem(p)
        if bad is not None:
            return f"its output {p} is damaged ({bad})"
    return None
