"""Profiles, the papermill stage runner, and the book build.

A *profile* (YAML) says which model and data to study and how much of it; ``run(profile)`` executes
``notebooks/*.ipynb`` in order with papermill, injecting the profile's parameters, and writes executed
copies to ``<book>/executed/`` where the Jupyter Book reads them. A stage is skipped when its notebook, its
parameters, the profile, the ``helpers`` source and every upstream stage are unchanged (a content hash kept
in ``results/<profile>/.stages/``) and its executed copy exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent

# Default sections; a profile overrides what it names.
DEFAULTS: dict[str, Any] = {
    "description": "",
    "model": "world",  # "world"; a named model (smollm2-135m, gemma3-270m); a .gguf file; a hub name; a folder
    "world": "default",  # world preset when model == "world"
    "data": "world",  # "world"; "known" = ROME's known facts as CounterFact records; "official"; or a path
    "n_records": 2000,  # candidate records: the first N (SCIENCE.md §1.3)
    "max_facts": None,  # cap on kept (correct) facts used downstream; None = all
    "correctness_filter": True,  # keep only facts the model completes correctly (SCIENCE.md §1.3)
    "seed": 0,
    "device": "cpu",
    "tracing": {"windows": [1, 3, 5, 10], "kinds": ["mlp"], "samples": 10, "noise": "auto", "illustrative": 3},
    "editing": {
        "methods": ["ft1", "ft5", "rome", "memit"],
        "problems": ["ei", "tr", "fe", "fa", "ff"],
        "layers": "all",  # "all" or a list of 0-based central layers
        "facts": 100,  # first N kept facts are edited (None = all)
        "hparams": None,  # hparams family (src/helpers/hparams/<name>.yaml); None = from the model
        "corpus": None,  # text file for second moments; None = the world corpus
        "stats_tokens": 20000,  # keys sampled per layer for the second moments
        "batch_size": 8,  # facts edited together per layer (results equal one-at-a-time editing)
        "exact": False,  # True: bitwise one-at-a-time results (~1.8x slower); False: equal up to float rounding
    },
    "analysis": {"window": 5, "n_boot": 200},
    # second moments and unrelated sentences of a real model: "wikitext" (the shared WikiText-2 train split
    # where present, else the vendored slice), "wikitext-slice", or a text file (one document per line)
    "stats": {"corpus": None, "tokens": None},
    "stages": None,  # None = every notebook; else the stage-name prefixes to run, e.g. [01_data, 02_tracing]
}


@dataclass
class Profile:
    """A parsed profile. ``raw`` is the merged dict; the attributes are its top-level keys."""

    name: str
    path: Path
    raw: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        raw = self.__dict__.get("raw", {})
        if key in raw:
            return raw[key]
        raise AttributeError(key)

    @property
    def uses_world(self) -> bool:
        return self.raw["model"] == "world"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def profiles_dir() -> Path:
    return PACKAGE_DIR / "profiles"


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a profile by name (``src/helpers/profiles/<name>.yaml``) or by path to a YAML file."""
    p = Path(name_or_path)
    path = p if p.suffix in (".yaml", ".yml") and p.exists() else profiles_dir() / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no profile {name_or_path!r}; known profiles: {', '.join(list_profiles())}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - set(DEFAULTS) - {"name"}
    if unknown:
        raise ValueError(f"profile {path}: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    for section, sub in raw.items():
        if isinstance(DEFAULTS.get(section), dict) and isinstance(sub, dict):
            bad = set(sub) - set(DEFAULTS[section])
            if bad:
                raise ValueError(f"profile {path}: unknown keys {sorted(bad)} in section {section!r}; "
                                 f"known: {sorted(DEFAULTS[section])}")
    merged = _merge(DEFAULTS, raw)
    return Profile(name=raw.get("name", path.stem), path=path.resolve(), raw=merged)


def project_root() -> Path:
    """The checkout holding ``notebooks/`` (HELPERS_ROOT, else the cwd, else the source tree)."""
    env = os.environ.get("HELPERS_ROOT")
    if env:
        return Path(env).resolve()
    for cand in (Path.cwd(), PACKAGE_DIR.parent.parent):
        if (cand / "notebooks").is_dir():
            return cand.resolve()
    return Path.cwd().resolve()


def cache_dir() -> Path:
    """Where models, statistics and downloads are cached (HELPERS_CACHE, else ``<root>/.cache``)."""
    return Path(os.environ.get("HELPERS_CACHE", project_root() / ".cache")).resolve()


def results_dir(profile: Profile, results_root: Path | None = None) -> Path:
    """``<results_root>/<profile>`` (default ``<root>/results``; env HELPERS_RESULTS overrides)."""
    base = results_root or Path(os.environ.get("HELPERS_RESULTS", project_root() / "results"))
    return (Path(base) / profile.name).resolve()


def resolve_model(profile: Profile) -> str:
    """The model folder or hub name the profile studies (training the world model if needed)."""
    if profile.uses_world:
        from .world import ensure_world_model

        return str(ensure_world_model(profile.raw["world"], cache_dir()))
    from .checkpoints import resolve_model_source

    return resolve_model_source(str(profile.raw["model"]), cache_dir())


def known_data(seed: int = 0, cache: Path | None = None) -> Path:
    """ROME's known facts as CounterFact-schema records (:mod:`helpers.known`), written once into the cache;
    unrelated sentences for the paraphrase prompts come from the WikiText-2 corpus."""
    from .corpus import corpus_for, unrelated_sentences
    from .known import KNOWN_SHA256, write_known_counterfact

    dest = (cache or cache_dir()) / "data" / f"known_counterfact_{KNOWN_SHA256[:12]}_s{seed}.json"
    if not dest.exists():
        sentences = unrelated_sentences(corpus_for("wikitext-slice"), 400, seed)
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_known_counterfact(dest, seed=seed, corpus_sentences=sentences)
    return dest


def resolve_data(profile: Profile) -> str:
    """Path (or "official") of the CounterFact file the profile uses."""
    if profile.raw["data"] == "known":
        return str(known_data(int(profile.raw["seed"])))
    if profile.raw["data"] == "world":
        if not profile.uses_world:
            raise ValueError(f"profile {profile.name}: data 'world' needs model 'world'")
        return str(Path(resolve_model(profile)) / "counterfact.json")
    return str(profile.raw["data"])


# ----------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str  # also the executed notebook's stem
    notebook: Path
    params: dict[str, Any] = field(default_factory=dict)
    title: str | None = None  # replaces the executed copy's first heading (one page per editing cell)


def stages(profile: Profile, root: Path | None = None) -> list[Stage]:
    """The ordered stages of a profile: one per notebook, ``03_editing`` once per (method, problem)."""
    root = root or project_root()
    nb_dir = root / "notebooks"
    out: list[Stage] = []
    for nb in sorted(nb_dir.glob("[0-9][0-9]_*.ipynb")):
        stem = nb.stem
        if stem.startswith("00_world") and not profile.uses_world:
            continue
        wanted = profile.raw.get("stages")
        if wanted is not None and not any(stem.startswith(str(w)) for w in wanted):
            continue
        if stem.startswith("03_editing"):
            ed = profile.raw["editing"]
            from .plots import METHOD_LABELS, PROBLEM_LABELS

            for m in ed["methods"]:
                for p in ed["problems"]:
                    title = f"{METHOD_LABELS.get(m, m)} × {PROBLEM_LABELS.get(p, p)}"
                    out.append(Stage(f"{stem}__{m}__{p}", nb, {"method": m, "problem": p}, title))
        else:
            out.append(Stage(stem, nb))
    return out


def source_hash() -> str:
    """Hash of the ``helpers`` package's source (.py, .yaml, .json): part of every stage key and of the
    fingerprints of cached sweep tables."""
    h = hashlib.sha256()
    for p in sorted(PACKAGE_DIR.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".yaml", ".json") and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(PACKAGE_DIR)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _stage_key(stage: Stage, params: dict, profile: Profile, src: str, upstream: str) -> str:
    """Content hash of everything a stage's output depends on."""
    h = hashlib.sha256()
    h.update(stage.notebook.read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(profile.path.read_bytes())
    h.update(src.encode())
    h.update(upstream.encode())
    return h.hexdigest()


class StageFailed(RuntimeError):
    """A notebook raised; the message names the cell's error and the partial notebook's path."""


def _execute(st: Stage, params: dict, dest: Path, root: Path, key: str = "") -> None:
    import papermill as pm

    try:
        pm.execute_notebook(
            str(st.notebook),
            str(dest),
            parameters=params,
            cwd=str(root),
            progress_bar=False,
            log_output=False,
            kernel_name="python3",
            language="python",
        )
    except pm.PapermillExecutionError as err:
        raise StageFailed(
            f"stage {st.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
            f"partial notebook: {dest}"
        ) from None
    _prepare_for_book(dest, st.title, key)


def run(
    profile_name: str | Path,
    book_dir: Path | None = None,
    root: Path | None = None,
    force: bool = False,
    only: list[str] | None = None,
    results_root: Path | None = None,
    jobs: int = 1,
    wait: bool = False,
) -> list[dict]:
    """:func:`_run` holding the lock on ``results/<profile>/.lock`` (:mod:`helpers.runlock`): one run at a time
    per results folder. Another run holding it raises :class:`~helpers.runlock.RunLocked`, or with ``wait``
    this run waits for it to finish."""
    from .runlock import run_lock

    with run_lock(results_dir(load_profile(profile_name), results_root), wait=wait):
        return _run(profile_name, book_dir, root, force, only, results_root, jobs)


def _run(
    profile_name: str | Path,
    book_dir: Path | None = None,
    root: Path | None = None,
    force: bool = False,
    only: list[str] | None = None,
    results_root: Path | None = None,
    jobs: int = 1,
) -> list[dict]:
    """Execute the profile's stages in order; returns one dict per stage (stage, status, seconds).

    Consecutive stages of one notebook (the editing cells) are independent of each other and run ``jobs`` at a
    time, each kernel with ``cpu_count // jobs`` threads. A stage's key covers its notebook, parameters, the
    profile, the ``helpers`` source and the keys of every earlier stage of another notebook.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = (root or project_root()).resolve()
    profile = load_profile(profile_name)
    book_dir = (book_dir or root / "book").resolve()
    out_dir = book_dir / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    res = results_dir(profile, results_root)
    (res / ".stages").mkdir(parents=True, exist_ok=True)
    src = source_hash()
    todo = stages(profile, root)
    n = len(todo)
    names = {st.name for st in todo}
    stale = [p for p in out_dir.glob("*.ipynb") if p.stem not in names]
    for p in stale:  # pages of another profile's run (or a removed stage) would mix into this profile's book
        p.unlink()
    if stale:
        print(f"[pipeline] removed {len(stale)} executed notebooks that are not stages of {profile.name}", flush=True)
    print(f"[pipeline] profile {profile.name}: {n} stages -> {out_dir} ({jobs} at a time where independent)", flush=True)

    # Keys: each stage depends on every earlier stage of a *different* notebook.
    keys, upstream, group_up, last_nb = [], "", "", None
    for st in todo:
        if st.notebook != last_nb:
            group_up, last_nb = upstream, st.notebook
        params = {"profile": str(profile.path), "results_dir": str(res), "cache_dir": str(cache_dir()), **st.params}
        key = _stage_key(st, params, profile, src, group_up)
        keys.append((params, key))
        upstream = hashlib.sha256((upstream + key).encode()).hexdigest()

    report: list[dict] = []
    i = 0
    while i < n:
        j = i
        while j < n and todo[j].notebook == todo[i].notebook:
            j += 1
        batch = []
        for k in range(i, j):
            st, (params, key) = todo[k], keys[k]
            stamp, dest = res / ".stages" / f"{st.name}.json", out_dir / f"{st.name}.ipynb"
            if only is not None and not any(st.name.startswith(o) for o in only):
                continue
            if (not force and stamp.exists() and json.loads(stamp.read_text()).get("key") == key
                    and executed_key(dest) == key):
                print(f"[pipeline] ({k + 1}/{n}) {st.name}: unchanged, skipped", flush=True)
                report.append({"stage": st.name, "status": "skipped", "seconds": 0.0})
                continue
            batch.append((k, st, params, key, stamp, dest))

        def one(item):
            k, st, params, key, stamp, dest = item
            stamp.unlink(missing_ok=True)
            print(f"[pipeline] ({k + 1}/{n}) {st.name}: running {st.notebook.name} ...", flush=True)
            t0 = time.perf_counter()
            _execute(st, params, dest, root, key)
            dt = time.perf_counter() - t0
            stamp.write_text(json.dumps({"key": key, "seconds": dt}))
            print(f"[pipeline] ({k + 1}/{n}) {st.name}: done in {dt:.1f} s", flush=True)
            return {"stage": st.name, "status": "ran", "seconds": dt}

        width = max(1, min(jobs, len(batch)))
        if width == 1:
            report += [one(item) for item in batch]
        else:
            threads = str(max(1, (os.cpu_count() or 1) // width))
            saved = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            try:
                with ThreadPoolExecutor(width) as pool:
                    futures = [pool.submit(one, item) for item in batch]
                    errors = []
                    for f in futures:
                        try:
                            report.append(f.result())
                        except StageFailed as err:
                            errors.append(err)
                    if errors:
                        raise errors[0]
            finally:
                for v, old in saved.items():
                    if old is None:
                        os.environ.pop(v, None)
                    else:
                        os.environ[v] = old
        i = j
    total = sum(r["seconds"] for r in report)
    print(f"[pipeline] finished: {total:.1f} s of stage time", flush=True)
    (res / "timings.json").write_text(json.dumps(report, indent=1))
    return report


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
