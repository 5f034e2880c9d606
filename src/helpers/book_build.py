"""The book from the executed notebooks: each one made to read like a chapter (with its stage key), the table of
contents, and the Jupyter Book build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .paper import HEADLINES
from .profile_loader import project_root

PAGE_ORDER = "pages.json"  # in <book>/executed/: the stage names of the last run, in run order

def executed_key(path: Path) -> str | None:
    """The stage key stored in an executed notebook (None if absent or unreadable)."""
    try:
        return json.loads(path.read_text()).get("metadata", {}).get("helpers", {}).get("stage_key")
    except (OSError, ValueError):
        return None


def _prepare_for_book(path: Path, title: str | None, key: str = "", suffix: str | None = None) -> None:
    """Make an executed notebook read like a chapter: code collapsed (``hide-input``), parameter cells removed
    from the page, its first heading replaced by ``title`` (editing cells) and `` · <suffix>`` appended to it
    (a study's page in a book of several). Stores the stage ``key`` in
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
    if title or suffix:
        for cell in nb.cells:
            if cell.cell_type == "markdown" and cell.source.startswith("# "):
                first, _, rest = cell.source.partition("\n")
                heading = title or first[2:].strip()
                cell.source = f"# {heading}{f' · {suffix}' if suffix else ''}\n{rest}"
                break
    nbformat.write(nb, path)


def write_toc(book_dir: Path) -> Path:
    """Write ``_toc.yml`` from ``toc.yml``, keeping only the executed notebooks that exist (a profile without the
    embedded world has no ``00_world`` page) and expanding ``glob`` entries in the order of the run's stages
    (``executed/pages.json``, written by the pipeline: a book's studies in the profile's order), else by name."""
    src = yaml.safe_load((book_dir / "toc.yml").read_text())
    order = book_dir / "executed" / PAGE_ORDER
    rank = {name: i for i, name in enumerate(json.loads(order.read_text()))} if order.exists() else {}

    def in_order(paths) -> list[Path]:  # the run's stage order (a book's study order), else by name
        return sorted(paths, key=lambda p: (rank.get(p.stem, len(rank)), p.name))

    def exists(entry: dict) -> bool:
        f = entry.get("file")
        return f is None or any((book_dir / f"{f}{ext}").exists() for ext in (".md", ".ipynb", ""))

    def clean(entries: list) -> list:
        out = []
        for e in entries:
            f = e.get("file", "")
            if f.startswith("executed/") and not exists(e):  # a per-study page: one per study, in study order
                e = {**{k: v for k, v in e.items() if k != "file"}, "glob": f + "__*"}
            if "glob" in e:
                out += [{"file": str(p.relative_to(book_dir).with_suffix(""))}
                        for p in in_order(book_dir.glob(e["glob"] + ".ipynb"))]
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
    html = (out_dir or book_dir) / "_build" / "html"
    done = html.parent / ".build-complete"
    if html.parent.exists() and not done.exists():  # an interrupted build: its caches cannot be trusted
        print(f"[book] {html.parent} is from an interrupted build: removing it", flush=True)
        shutil.rmtree(html.parent)
    done.unlink(missing_ok=True)
    log_path = html.parent / "jupyter-book.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[book] jupyter-book build (output in {log_path}) ...", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise BookBuildFailed(f"jupyter-book build failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")
    done.write_text("")
    n_pages = count_pages(html)
    print(f"[book] built {n_pages} pages in {time.perf_counter() - t0:.0f} s: open {html / 'index.html'}", flush=True)
    return html


def count_pages(html: Path) -> int:
    """Built pages (the generated index and search pages aside)."""
    return sum(1 for p in html.rglob("*.html") if not p.name.startswith(("genindex", "search")))


class BookBuildFailed(RuntimeError):
    """jupyter-book exited with an error; the message holds the end of its log and the log's path."""


def headline(book_dir: Path) -> str | None:
    """The book's headline in one sentence, read from the glued numbers of the executed five-problems chapter
    (None when that chapter was not run): the largest gain in R^2 from adding tracing to layer, and where."""
    values: dict[str, str] = {}
    try:
        nb = json.loads((book_dir / "executed" / "05_five_problems.ipynb").read_text())
    except (OSError, ValueError):
        return None
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:  # glue(display=False) stores the value under papermill's record mime type
                data = out.get("data", {})
                text = data.get("text/plain", data.get("application/papermill.record/text/plain", ""))
                values[name] = "".join(text) if isinstance(text, list) else str(text)
    try:
        top = float(values["max_diff"])
    except (KeyError, ValueError):
        return None
    cell = values.get("max_diff_cell", "").strip("'\"")
    return (f"adding tracing to layer raises R^2 by at most {top:.3f}"
            + (f" ({cell})" if cell else "") + f"; the paper (GPT-J): at most {HEADLINES['max_diff']:.3f}")
