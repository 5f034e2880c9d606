"""Check a built book in a real browser: every page loads, its figures exist, and no glue placeholder,
missing reference or Python error text shows.

    python -m helpers check-book                 # book/_build/html
    python -m helpers check-book --html PATH

Uses headless Chromium (Debian's ``chromium``); each page is loaded with ``--dump-dom`` so the check sees the
page as rendered, after its scripts ran.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

#: Text that must not appear on a rendered page: unresolved glue, Python errors, Sphinx's missing-reference "??".
BAD_TEXT = ("Traceback (most recent call last)", "NameError", "glue:text", "{glue", "Error: ", "??",
            "WARNING:", "Warning: ",  # log lines and Python warnings belong in the stage log, not on a page
            "PosixPath(")  # a cell's value that is a local path (the reader's page should not show the builder's disk)


def find_browser() -> str | None:
    """Path of a Chromium-like browser, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _toc_files(toc: Path) -> set[str]:
    """Every ``file:`` entry (root included) of a Jupyter Book ``_toc.yml``."""
    import yaml

    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("file", "root") and isinstance(v, str):
                    found.add(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(toc.read_text()))
    return found


def book_pages(html: Path) -> list[Path]:
    """The book's content pages (not the search/index helpers; ``index.html`` only redirects). When the book's
    ``_toc.yml`` is found (``html`` = ``<book>/_build/html``), only its pages: an incremental build leaves the
    HTML of pages no longer in the book behind."""
    html = Path(html)
    skip = {"genindex.html", "search.html", "index.html"}
    pages = [p for p in html.rglob("*.html") if "_static" not in p.parts and p.name not in skip]
    toc = html.parent.parent / "_toc.yml"
    if toc.exists():
        listed = _toc_files(toc)
        pages = [p for p in pages if str(p.relative_to(html).with_suffix("")) in listed]
    return sorted(pages)


def check_page(browser: str, page: Path, profile_dir: Path, timeout: float = 120) -> list[str]:
    """Problems found on one page (empty when it is fine)."""
    try:
        out = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile_dir}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return [f"the browser did not finish loading it in {timeout:.0f} s"]
    dom = out.stdout
    if out.returncode != 0 or "<body" not in dom:
        return [f"the browser failed to load it: {out.stderr[-500:]}"]
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S))
    problems = [f"shows {needle!r}" for needle in BAD_TEXT if needle in text]
    for src in re.findall(r'<img[^>]+src="([^"]+)"', dom):
        if src.startswith(("data:", "http")):
            continue
        target = Path(src[7:]) if src.startswith("file:") else (page.parent / src.split("#")[0]).resolve()
        if not target.exists():
            problems.append(f"missing figure {src}")
    return problems


def check_book(html: Path, browser: str | None = None, progress: bool = False) -> dict[str, list[str]]:
    """{page path relative to ``html``: problems} for every content page of a built book.

    Raises FileNotFoundError when there is no built book or no browser."""
    html = Path(html).resolve()
    pages = book_pages(html)
    if not pages:
        raise FileNotFoundError(f"no built book at {html}: run `make book` first")
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no chromium found (Debian: apt-get install chromium)")
    if progress:
        from tqdm.auto import tqdm

        pages = tqdm(pages, desc="pages", leave=False)
    with tempfile.TemporaryDirectory(prefix="bookcheck-") as profile_dir:
        return {str(p.relative_to(html)): check_page(browser, p, Path(profile_dir)) for p in pages}
