"""The book from the executed notebooks: each one made to read like a chapter (with its stage key), the table of
contents, and the Jupyter Book build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from .profile_loader import project_root


def executed_key(path: Path) -> str | None:
    """The stage key stored in an executed notebook (None if absent or unreadable)."""
    try:
        return json.loads(path.read_text()).get("metadata", {}).get("helpers", {}).get("stage_key")
    except (OSError, ValueError):
        return None


def _prepare_for_book(path: Path, title: str | None, key: str = "") -> None:
    """Make an executed notebook read like a chapter: code collapsed (``hide-input``), parameter cells removed
    from the page, and (for editing cells) its first heading replaced by ``title``. Stores the stage ``key`` in
    the notebook's metadata, so a page written by another profile's run is never taken for this one's."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata["helpers"] = {"stage_key": key}
    for cell in nb.cells:
        if cell.cell_type == "code":
            tags = cell.metadata.setdefault("tags", [])
            wanted = "remove-cell" if {"parameters", "injected-parameters"} & set(tags) else "hide-input"
            if wanted not in tags:
                tags.append(wanted)
    if title:
        for cell in nb.cells:
            if cell.cell_type == "markdown" and cell.source.startswith("# "):
                _, _, rest = cell.source.partition("\n")
                cell.source = f"# {title}\n{rest}"
                break
    nbformat.write(nb, path)


def write_toc(book_dir: Path) -> Path:
    """Write ``_toc.yml`` from ``toc.yml``, keeping only the executed notebooks that exist (a profile without the
    embedded world has no ``00_world`` page) and expanding ``glob`` entries in order."""
    src = yaml.safe_load((book_dir / "toc.yml").read_text())

    def exists(entry: dict) -> bool:
        f = entry.get("file")
        return f is None or any((book_dir / f"{f}{ext}").exists() for ext in (".md", ".ipynb", ""))

    def clean(entries: list) -> list:
        out = []
        for e in entries:
            if "glob" in e:
                out += [{"file": str(p.relative_to(book_dir).with_suffix(""))} for p in sorted(book_dir.glob(e["glob"] + ".ipynb"))]
                continue
            if not exists(e):
                continue
            e = dict(e)
            if "sections" in e:
                e["sections"] = clean(e["sections"])
                if not e["sections"]:
                    del e["sections"]
            out.append(e)
        return out

    for part in src.get("parts", []):
        part["chapters"] = clean(part["chapters"])
    src["parts"] = [p for p in src.get("parts", []) if p["chapters"]]
    dest = book_dir / "_toc.yml"
    dest.write_text(yaml.safe_dump(src, sort_keys=False))
    return dest


def build_book(book_dir: Path | None = None, out_dir: Path | None = None) -> Path:
    """Build the Jupyter Book (1.x, warnings as errors); returns the HTML folder."""
    book_dir = (book_dir or project_root() / "book").resolve()
    write_toc(book_dir)
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(book_dir), "--warningiserror", "--keep-going"]
    if out_dir is not None:
        cmd += ["--path-output", str(out_dir)]
    print("[book] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    html = (out_dir or book_dir) / "_build" / "html"
    print(f"[book] built {html / 'index.html'}", flush=True)
    return html
