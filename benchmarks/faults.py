"""Fault injection: kill a whole book run with SIGKILL at moments spread over every stage, re-run, compare.

    python benchmarks/faults.py --profile smoke                 # every kill point (make faults)
    python benchmarks/faults.py --profile smoke --points 3      # the first N kill points only

First one uninterrupted run (``python -m helpers book``) in fresh folders (cache, results, book) gives the
reference. Then, in other fresh folders, each kill point starts the run again, waits for its moment (a stage
starting, the world model's training, the book build), waits a few seconds more and kills the run's whole
process group (the runner, its kernels, jupyter-book) with SIGKILL. After the last kill the run is completed.
Every results table must then equal the reference's (same rows, none missing or duplicated; exact values),
every cache and stage output must match its size/sha256 record, and the built book's pages must carry the
same text. Prints ``N kills, N recovered, 0 differences`` (exit status 1 if anything differs).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from helpers import integrity  # noqa: E402


@dataclass(frozen=True)
class KillPoint:
    """Kill ``delay_s`` seconds after the first output line matching ``after`` (a regular expression)."""

    name: str
    after: str
    delay_s: float


#: Spread over every stage of the smoke book: world training, data, tracing, the second-moment pass (first
#: ROME cell), editing cells, the analyses, the book build.
KILL_POINTS = [
    KillPoint("world training", r"00_world: running", 4.0),
    KillPoint("data filter", r"01_data: running", 5.0),
    KillPoint("tracing", r"02_tracing: running", 8.0),
    KillPoint("editing cell (FT)", r"03_editing__ft1__ei: running", 4.0),  # stage order: ft1 cells, then rome
    KillPoint("editing cell (second moments, ROME)", r"03_editing__rome__ei: running", 7.0),
    KillPoint("localization analysis", r"04_localization_vs_editing: running", 6.0),
    KillPoint("five problems", r"05_five_problems: running", 5.0),
    KillPoint("book build", r"\[book\] jupyter-book build", 1.5),
]


@dataclass
class Folders:
    root: Path

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def book(self) -> Path:
        return self.root / "book"

    def make(self) -> "Folders":
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.book.exists():
            shutil.copytree(ROOT / "book", self.book, ignore=shutil.ignore_patterns("_build", "executed"))
        return self


def run_book(f: Folders, profile: str, kill: KillPoint | None = None, log=None) -> tuple[str, bool]:
    """One ``python -m helpers book`` in ``f``'s folders; with ``kill``, SIGKILL its process group at that moment.
    Returns (output, killed)."""
    env = {**os.environ, "HELPERS_CACHE": str(f.cache), "HELPERS_RESULTS": str(f.results), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "helpers", "book", "--profile", profile, "--book-dir", str(f.book)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, killed, timer = [], threading.Event(), None

    def fire():
        if proc.poll() is not None:  # finished before the moment came
            return
        # the runner's process group and every descendant: jupyter_client starts each kernel in its own session
        victims = descendants(proc.pid)
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    for line in proc.stdout:
        lines.append(line)
        if log:
            log(line.rstrip("\n"))
        if kill is not None and timer is None and re.search(kill.after, line):
            timer = threading.Timer(kill.delay_s, fire)
            timer.start()
    proc.wait()
    if timer is not None:
        timer.cancel()
    return "".join(lines), killed.is_set()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: children of children, ...)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tables_of(results: Path) -> dict[str, pd.DataFrame]:
    return {str(p.relative_to(results)): pd.read_parquet(p) for p in sorted(results.rglob("*.parquet"))}


def timing_columns(df: pd.DataFrame) -> list[str]:
    """Columns that hold wall-clock times (they differ between any two runs)."""
    return [c for c in df.columns if c in ("seconds", "elapsed") or c.endswith(("_seconds", "_s"))]


def page_texts(book: Path) -> dict[str, str]:
    """Each built page's visible text (tags, scripts and embedded images stripped)."""
    out = {}
    for p in sorted((book / "_build" / "html").rglob("*.html")):
        html = p.read_text(errors="replace")
        html = re.sub(r"(?s)<(script|style|svg)\b.*?</\1>", " ", html)
        html = re.sub(r'src="data:[^"]*"', "", html)
        text = " ".join(re.sub(r"<[^>]+>", " ", html).split())
        text = re.sub(r"\b\d+(\.\d+)? (s|minutes)\b", r"<time> \2", text)  # "took 0.42 s", "0.4 minutes"
        out[str(p.relative_to(book))] = text
    return out


def _first_difference(a: str, b: str) -> str:
    import difflib

    wa, wb = a.split(), b.split()
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, wa, wb, autojunk=False).get_opcodes():
        if op != "equal":
            return (f"text differs: ...{' '.join(wa[max(0, i1 - 8):i2 + 3])}... vs "
                    f"...{' '.join(wb[max(0, j1 - 8):j2 + 3])}...")
    return "text differs"


def compare(ref: Folders, got: Folders) -> list[str]:
    """Differences between two finished runs (empty when none)."""
    diffs = []
    a, b = tables_of(ref.results), tables_of(got.results)
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            diffs.append(f"table {name}: only in {'the reference' if name in a else 'the faulted run'}")
            continue
        x, y = a[name].drop(columns=timing_columns(a[name])), b[name].drop(columns=timing_columns(b[name]))
        key = [c for c in ("case_id", "layer", "kind", "window", "token_idx", "method", "problem") if c in x.columns]
        if len(x) != len(y):
            diffs.append(f"table {name}: {len(x)} rows in the reference, {len(y)} after the kills")
            continue
        if key and y.duplicated(subset=key + [c for c in y.columns if c.startswith("sample")]).any() and not \
                x.duplicated(subset=key + [c for c in x.columns if c.startswith("sample")]).any():
            diffs.append(f"table {name}: duplicated rows after the kills")
        try:
            pd.testing.assert_frame_equal(x.reset_index(drop=True), y.reset_index(drop=True), check_exact=True)
        except AssertionError as err:
            diffs.append(f"table {name}: values differ: {str(err).splitlines()[0:3]}")
    for folder in (got.results, got.cache):
        for p in folder.rglob("*"):
            if p.is_file() and not p.name.startswith(".") and integrity.sidecar(p).exists():
                bad = integrity.problem(p)
                if bad:
                    diffs.append(f"{p}: {bad}")
            if p.name.endswith(".tmp") or ".tmp-" in p.name:
                diffs.append(f"{p}: a temporary file was left behind")
    pa, pb = page_texts(ref.book), page_texts(got.book)
    for name in sorted(set(pa) | set(pb)):
        if pa.get(name) != pb.get(name):
            diffs.append(f"page {name}: " + (_first_difference(pa[name], pb[name]) if name in pa and name in pb
                                             else "missing"))
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--points", type=int, default=len(KILL_POINTS), help="use the first N kill points")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs' folders here (default: a temp dir)")
    ap.add_argument("--verbose", action="store_true", help="echo the runs' output")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    echo = print if args.verbose else None
    t0 = time.perf_counter()
    ref = Folders(work / "reference").make()
    out, _ = run_book(ref, args.profile, log=echo)
    if "open " not in out:
        print(out[-3000:])
        print("the uninterrupted reference run failed")
        return 1
    print(f"reference run: {time.perf_counter() - t0:.0f} s")
    got = Folders(work / "faulted").make()
    kills = recovered = 0
    for point in KILL_POINTS[: args.points]:
        t1 = time.perf_counter()
        out, killed = run_book(got, args.profile, kill=point, log=echo)
        if kills and (killed or "open " in out):  # the run after the previous kill went on from where it was
            recovered += 1
        if killed:
            kills += 1
            print(f"  killed during {point.name} ({time.perf_counter() - t1:.0f} s into the run)")
            time.sleep(0.5)  # let the killed processes be reaped
        elif "open " in out:
            print(f"  {point.name}: the run finished before the kill")
        else:
            print(out[-3000:])
            print(f"  {point.name}: the run FAILED before the kill")
    t2 = time.perf_counter()
    out, _ = run_book(got, args.profile, log=echo)
    ok = "open " in out
    if ok and kills:
        recovered += 1
    if not ok:
        print(out[-3000:])
    print(f"  final run: {time.perf_counter() - t2:.0f} s")
    diffs = compare(ref, got) if ok else ["the final run failed"]
    for d in diffs[:40]:
        print("  DIFF", d)
    print(f"{kills} kills, {recovered} recovered, {len(diffs)} differences ({time.perf_counter() - t0:.0f} s)")
    if args.workdir is None and not diffs:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if diffs or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
