"""Check a built book in a real browser: every page loads, its figures exist, and no glue placeholder,
missing reference or Python error text shows.

    python -m helpers check-book                 # book/_build/html
    python -m helpers check-book --html PATH

Uses headless Chromium (Debian's ``chromium``); each page is loaded with ``--dump-dom`` so the check sees the
page as rendered, after its scripts ran.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: Text that must not appear on a rendered page: unresolved glue, Python errors, Sphinx's missing-reference "??".
BAD_TEXT = ("Traceback (most recent call last)", "NameError", "glue:text", "{glue", "Error: ", "??")


def find_browser() -> str | None:
    """Path of a Chromium-like browser, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def book_pages(html: Path) -> list[Path]:
    """The book's content pages (not the search/index helpers; ``index.html`` only redirects)."""
    skip = {"genindex.html", "search.html", "index.html"}
    return sorted(p for p in Path(html).rglob("*.html") if "_static" not in p.parts and p.name not in skip)


def check_page(browser: str, page: Path, profile_dir: Path, timeout: float = 120) -> list[str]:
    """Problems found on one page (empty when it is fine)."""
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile_dir}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=timeout,
    )
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
