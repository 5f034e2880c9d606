"""Command line: ``python -m helpers run --profile NAME`` (what ``make book`` calls), and friends."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import pipeline
from .book_build import BookBuildFailed, count_pages, headline
from .profile_checks import ProfileSizeError
from .runlock import RunLocked


def _book(args: argparse.Namespace) -> int:
    """``make book``: every stage, the build, then a summary (pages, headline, total time, where to open)."""
    t0 = time.perf_counter()
    try:
        report = pipeline.run(args.profile, book_dir=args.book_dir, jobs=args.jobs, wait=args.wait)
        html = pipeline.build_book(args.book_dir)
    except (pipeline.StageFailed, RunLocked, BookBuildFailed, ProfileSizeError) as err:
        print(f"[pipeline] ERROR: {err}", file=sys.stderr)
        return 1
    ran = sum(r["status"] == "ran" for r in report)
    pages = count_pages(html)
    book_dir = (args.book_dir or pipeline.project_root() / "book").resolve()
    head = headline(book_dir)
    print("=" * 72)
    print(f"book of profile '{args.profile}': {len(report)} stages ({ran} run, {len(report) - ran} unchanged), "
          f"{pages} pages, {pipeline._minutes(time.perf_counter() - t0)} in all")
    if head:
        print(f"headline: {head}")
    print(f"open {html / 'index.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the profile's notebooks in order (papermill)")
    r.add_argument("--profile", default="default", help="profile name or path to a YAML file")
    r.add_argument("--book-dir", type=Path, default=None, help="book folder (default: ./book)")
    r.add_argument("--force", action="store_true", help="re-run stages even when unchanged")
    r.add_argument("--only", nargs="*", default=None, help="run only stages whose name starts with these")
    r.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="independent stages (editing cells) run this many at a time (default: 2 on 2+ cores)")
    r.add_argument("--wait", action="store_true",
                   help="if another run is using this profile's results folder, wait for it (default: refuse)")
    bk = sub.add_parser("book", help="run the profile's notebooks, build the book, print a summary (make book)")
    for a in ("--profile",):
        bk.add_argument(a, default="default", help="profile name or path to a YAML file")
    bk.add_argument("--book-dir", type=Path, default=None, help="book folder (default: ./book)")
    bk.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="as for run")
    bk.add_argument("--wait", action="store_true", help="as for run")
    b = sub.add_parser("build-book", help="build the Jupyter Book (warnings are errors)")
    b.add_argument("--book-dir", type=Path, default=None)
    c = sub.add_parser("check-book", help="open every built page in headless chromium and check it")
    c.add_argument("--html", type=Path, default=Path("book/_build/html"), help="the built book's html folder")
    sub.add_parser("profiles", help="list the known profiles")
    sub.add_parser("models", help="list the named models (source, size, licence, whether converted)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "run":
        try:
            pipeline.run(args.profile, book_dir=args.book_dir, force=args.force, only=args.only, jobs=args.jobs,
                         wait=args.wait)
        except (pipeline.StageFailed, RunLocked, ProfileSizeError) as err:
            print(f"[pipeline] ERROR: {err}", file=sys.stderr)
            return 1
    elif args.cmd == "book":
        return _book(args)
    elif args.cmd == "build-book":
        try:
            pipeline.build_book(args.book_dir)
        except BookBuildFailed as err:
            print(f"[book] ERROR: {err}", file=sys.stderr)
            return 1
    elif args.cmd == "check-book":
        from .bookcheck import check_book

        try:
            found = check_book(args.html, progress=True)
        except FileNotFoundError as err:
            print(f"check-book: {err}", file=sys.stderr)
            return 2
        bad = {page: probs for page, probs in found.items() if probs}
        for page, probs in bad.items():
            print(f"{page}: " + "; ".join(probs), file=sys.stderr)
        print(f"{len(found) - len(bad)} of {len(found)} pages load with their figures and no placeholder or error text")
        return 1 if bad else 0
    elif args.cmd == "models":
        from .checkpoints import list_models_text

        print(list_models_text(pipeline.cache_dir()))
    elif args.cmd == "profiles":
        for name in pipeline.list_profiles():
            prof = pipeline.load_profile(name)
            print(f"{name:10s} {prof.raw['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
