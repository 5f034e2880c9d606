"""Profiles, the papermill stage runner, and the book build.

A *profile* (YAML) says which model and data to study and how much of it; ``run(profile)`` executes
``notebooks/*.ipynb`` in order with papermill, injecting the profile's parameters, and writes executed
copies to ``<book>/executed/`` where the Jupyter Book reads them. A stage is skipped when its notebook, its
parameters, the profile, the ``helpers`` source and every upstream stage are unchanged (a content hash kept
in ``results/<profile>/.stages/``) and its executed copy exists.

Profiles and the folders they resolve to are in :mod:`helpers.profile_loader`, the book build in
:mod:`helpers.book_build`; this module runs the stages and re-exports their names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Re-exported: the public names of this module before it was split.
from .book_build import PAGE_ORDER, _prepare_for_book, build_book, executed_key, write_toc
from . import thread_budget
from .package_hash import hparams_hash, source_hash
from .progress import ENV, LOG_ENV, StatusLine
from .stage_stamps import damaged_output as _damaged_output, outputs as _outputs, read_stamp as _read_stamp
from .tables import OUTPUTS_ENV, atomic_path, remove_stale_temporaries
from .profile_loader import (
    DEFAULTS,
    PACKAGE_DIR,
    Profile,
    cache_dir,
    known_data,
    list_profiles,
    load_profile,
    profiles_dir,
    project_root,
    resolve_data,
    resolve_model,
    results_dir,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- stages


# notebooks run once per study (their pages are the study's); the others are chapters that compare the studies
PER_STUDY = ("00_", "01_", "02_", "03_")


@dataclass
class Stage:
    name: str  # also the executed notebook's stem
    notebook: Path
    params: dict[str, Any] = field(default_factory=dict)
    title: str | None = None  # replaces the executed copy's first heading (one page per editing cell)
    study: str | None = None  # the study a per-study stage belongs to; None for a chapter comparing the studies
    profile: Profile | None = None  # that study's profile
    suffix: str | None = None  # appended to the first heading: which study a per-study page shows


def stages(profile: Profile, root: Path | None = None) -> list[Stage]:
    """The ordered stages of a profile: one per notebook, ``03_editing`` once per (method, problem).

    In a book of several studies (``studies``), the per-study notebooks (00-03) run once per study, named
    ``<notebook>__<study>`` (``03_editing__<study>__<method>__<problem>``), and the chapters after them once."""
    from .plots import METHOD_LABELS, PROBLEM_LABELS

    root = root or project_root()
    nb_dir = root / "notebooks"
    studies = profile.study_profiles()
    book = profile.is_book
    out: list[Stage] = []
    for nb in sorted(nb_dir.glob("[0-9][0-9]_*.ipynb")):
        stem = nb.stem
        if not stem.startswith(PER_STUDY):
            wanted = None if book else profile.raw.get("stages")
            if wanted is None or any(stem.startswith(str(w)) for w in wanted):
                out.append(Stage(stem, nb))
            continue
        for study, prof in studies.items():
            if stem.startswith("00_world") and not prof.uses_world:
                continue
            wanted = prof.raw.get("stages")
            if wanted is not None and not any(stem.startswith(str(w)) for w in wanted):
                continue
            tag, suffix = (f"__{study}", prof.label) if book else ("", None)
            if stem.startswith("03_editing"):
                ed = prof.raw["editing"]
                for m in ed["methods"]:
                    for p in ed["problems"]:
                        title = f"{METHOD_LABELS.get(m, m)} × {PROBLEM_LABELS.get(p, p)}"
                        out.append(Stage(f"{stem}{tag}__{m}__{p}", nb, {"method": m, "problem": p},
                                         f"{title} · {suffix}" if suffix else title, study, prof))
            else:
                out.append(Stage(f"{stem}{tag}", nb, {}, None, study, prof, suffix))
    return out


def _code_key() -> str:
    """What every stage key holds of the package: its code and its hyperparameter files (computed once a run)."""
    return source_hash() + hparams_hash()


def _stage_key(stage: Stage, params: dict, profile: Profile, src: str, upstream: str) -> str:
    """Content hash of everything a stage's output depends on: its notebook, parameters, profile (a per-study
    stage: its study's; a chapter: the book's and every study's), ``src`` (:func:`_code_key`) and ``upstream``."""
    h = hashlib.sha256()
    h.update(stage.notebook.read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    profiles = [stage.profile] if stage.profile is not None else [profile, *profile.study_profiles().values()]
    for prof in dict.fromkeys(p.path for p in profiles):
        h.update(prof.read_bytes())
    h.update(src.encode())
    h.update(upstream.encode())
    return h.hexdigest()


class StageFailed(RuntimeError):
    """A notebook raised; the message names the cell's error and the partial notebook's path."""


def _kernel_manager(log_path: Path, env: dict[str, str]) -> type:
    """A kernel manager whose kernel gets ``env`` on top of this process's environment and writes its own
    stdout/stderr to ``log_path``, not to the terminal: ipykernel's start-up lines (the TCP warning) and anything
    printed before it redirects the descriptors into the notebook."""
    from jupyter_client import AsyncKernelManager

    class StageKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):  # type: ignore[override]
            with open(log_path, "ab") as log:  # the kernel process keeps its own copy of the descriptor
                kw.setdefault("stdout", log)
                kw.setdefault("stderr", log)
                kw["env"] = {**os.environ, **kw.get("env", {}), **env}
                await AsyncKernelManager.start_kernel(self, **kw)

    return StageKernelManager


def _execute(st: Stage, params: dict, dest: Path, root: Path, key: str = "", log_path: Path | None = None,
             env: dict[str, str] | None = None) -> None:
    import papermill as pm

    extra = {}
    if log_path is not None:
        extra["kernel_manager_class"] = _kernel_manager(log_path, env or {})
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
            **extra,
        )
    except pm.PapermillExecutionError as err:
        where = f"\nkernel log: {log_path}" if log_path is not None else ""
        raise StageFailed(
            f"stage {st.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
            f"partial notebook: {dest}{where}"
        ) from None
    _prepare_for_book(dest, st.title, key, st.suffix)


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

    The editing cells are independent of each other and run ``jobs`` at a time, each kernel with
    ``cpu_count // jobs`` threads; every other stage runs alone with every core. A stage's key covers its notebook, parameters, the
    profile, the ``helpers`` source and the keys of every earlier stage of another notebook.
    """
    root = (root or project_root()).resolve()
    profile = load_profile(profile_name)
    book_dir = (book_dir or root / "book").resolve()
    out_dir = book_dir / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    res = results_dir(profile, results_root)
    (res / ".stages").mkdir(parents=True, exist_ok=True)
    # what a killed run was writing: every temporary in this results folder (its lock is ours), and in the
    # shared cache those whose writer is gone
    stale_tmp = remove_stale_temporaries(res, everything=True) + remove_stale_temporaries(cache_dir())
    if stale_tmp:
        print(f"[pipeline] removed {len(stale_tmp)} temporary files left by an interrupted run", flush=True)
    src = _code_key()
    todo = stages(profile, root)
    n = len(todo)
    names = {st.name for st in todo}
    stale = [p for p in out_dir.glob("*.ipynb") if p.stem not in names]
    for p in stale:  # pages of another profile's run (or a removed stage) would mix into this profile's book
        p.unlink()
    if stale:
        print(f"[pipeline] removed {len(stale)} executed notebooks that are not stages of {profile.name}", flush=True)
    order = out_dir / PAGE_ORDER  # the book's page order (a book's studies in profile order); no sidecar beside it
    order.with_suffix(".tmp").write_text(json.dumps([st.name for st in todo]))
    os.replace(order.with_suffix(".tmp"), order)
    studies = profile.study_profiles()
    remote = sorted({p.raw["executor"]["kind"] for p in studies.values()} - {"local"})
    if jobs > 1 and remote:
        print(f"[pipeline] note: executor {remote[0]} spreads each stage over its workers; "
              "stages run one at a time (--jobs 1)", flush=True)
        jobs = 1
    print(f"[pipeline] profile {profile.name}: {n} stages -> {out_dir} ({jobs} at a time where independent)", flush=True)
    from .profile_checks import preflight

    for study, prof in studies.items():  # sizes the data cannot fully provide; impossible ones raise here
        for note in preflight(prof):
            print(f"[pipeline] note: {f'study {study}: ' if profile.is_book else ''}{note}", flush=True)

    keys = _keys(todo, profile, res, results_root, src)

    logs = res / "logs"
    logs.mkdir(exist_ok=True)
    with _papermill_log(logs / "pipeline.log"), StatusLine() as status:
        report = _execute_all(todo, keys, res, out_dir, root, force, only, jobs, status)
    total = sum(r["seconds"] for r in report)
    print(f"[pipeline] finished: {total:.1f} s of stage time ({_minutes(total)}); logs in {logs}", flush=True)
    with atomic_path(res / "timings.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return report


def _keys(todo: list[Stage], profile: Profile, res: Path, results_root: Path | None, src: str) -> list[tuple[dict, str]]:
    """(parameters, key) of each stage. A per-study stage depends on every earlier stage of its study from a
    *different* notebook (one study's change never re-runs another's); a chapter comparing the studies depends on
    every earlier stage of a different notebook."""
    studies = {
        name: {"profile": str(prof.path), "results_dir": str(results_dir(profile, results_root, name))}
        for name, prof in profile.study_profiles().items()
    }
    keys: list[tuple[dict, str]] = []
    lane_up: dict[str | None, str] = {}  # running hash of each study's stages (None: of every stage)
    group_up: dict[tuple[str | None, Path], str] = {}  # what a (lane, notebook) group of stages depends on
    for st in todo:
        lane = st.study
        group_up.setdefault((lane, st.notebook), lane_up.get(lane, ""))
        if lane is None:
            params = {"profile": str(profile.path), "results_dir": str(res), "studies": studies}
        else:
            params = dict(studies[lane])
        params = {**params, "cache_dir": str(cache_dir()), **st.params}
        key = _stage_key(st, params, profile, src, group_up[(lane, st.notebook)])
        keys.append((params, key))
        for ln in {lane, None}:
            lane_up[ln] = hashlib.sha256((lane_up.get(ln, "") + key).encode()).hexdigest()
    return keys


def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


@contextlib.contextmanager
def _papermill_log(path: Path):
    """papermill's INFO lines go to ``path`` instead of the terminal for the duration."""
    pm_log = logging.getLogger("papermill")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = pm_log.propagate, pm_log.level
    pm_log.addHandler(handler)
    pm_log.propagate, pm_log.level = False, logging.INFO
    try:
        yield
    finally:
        pm_log.removeHandler(handler)
        handler.close()
        pm_log.propagate, pm_log.level = saved


def _execute_all(todo, keys, res, out_dir, root, force, only, jobs, status: StatusLine) -> list[dict]:
    """Run the stages that are not up to date; consecutive stages of one notebook ``jobs`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(todo)
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
            if not force and _read_stamp(stamp).get("key") == key and executed_key(dest) == key:
                damaged = _damaged_output(_read_stamp(stamp), dest)
                if damaged is None:
                    status.print(f"[pipeline] ({k + 1}/{n}) {st.name}: unchanged, skipped")
                    report.append({"stage": st.name, "status": "skipped", "seconds": 0.0})
                    continue
                status.print(f"[pipeline] ({k + 1}/{n}) {st.name}: {damaged}; running it again")
            batch.append((k, st, params, key, stamp, dest))
        # The editing cells (many, of similar cost) share the cores; a notebook run once per study (data, tracing)
        # runs one study at a time with every core: their costs differ too much (SmolLM2's tracing vs the world's)
        # for a one-thread kernel each to finish together.
        parallel = bool(batch) and batch[0][1].notebook.stem.startswith("03_editing")
        width = max(1, min(jobs if parallel else 1, len(batch)))
        threads = str(max(1, (os.cpu_count() or 1) // width))

        running: list[Path] = []  # the thread-budget files of the kernels running now
        budget_lock = threading.Lock()

        def rebalance() -> None:  # every running kernel gets its share of the cores (thread_budget.follow)
            for path, share in thread_budget.shares(running, os.cpu_count() or 1).items():
                thread_budget.write(path, share)

        def one(item):
            k, st, params, key, stamp, dest = item
            stamp.unlink(missing_ok=True)
            label = f"({k + 1}/{n}) {st.name}"
            log_path, prog = res / "logs" / f"{st.name}.log", res / "logs" / f"{st.name}.progress.json"
            listing, budget = res / "logs" / f"{st.name}.outputs", res / "logs" / f"{st.name}.threads"
            for p in (log_path, prog, listing, budget):
                p.unlink(missing_ok=True)
            env = {ENV: str(prog), LOG_ENV: str(log_path), OUTPUTS_ENV: str(listing)}
            if width > 1:  # each of the concurrent kernels gets its share of the cores, and more when one ends
                env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **{thread_budget.ENV: str(budget)})
                with budget_lock:
                    running.append(budget)
                    rebalance()
            status.print(f"[pipeline] {label}: running {st.notebook.name} ...")
            status.start(label, prog)
            t0 = time.perf_counter()
            try:
                _execute(st, params, dest, root, key, log_path=log_path, env=env)
            finally:
                status.stop(label)
                prog.unlink(missing_ok=True)
                if width > 1:
                    with budget_lock:
                        running.remove(budget)
                        rebalance()
                    budget.unlink(missing_ok=True)
            dt = time.perf_counter() - t0
            with atomic_path(stamp) as tmp:
                tmp.write_text(json.dumps({"key": key, "seconds": dt, "outputs": _outputs(dest, listing)}))
            status.print(f"[pipeline] {label}: done in {_minutes(dt)}")
            return {"stage": st.name, "status": "ran", "seconds": dt}

        if width == 1:
            report += [one(item) for item in batch]
        else:
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
        i = j
    return report
