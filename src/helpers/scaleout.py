"""Executors: run tracing and the editing sweep in this process (``local``) or on a pool of Ray actors (``ray``).

A profile's ``executor`` section picks one::

    executor: {kind: ray, address: null, workers: 2, threads_per_worker: 1, gpus_per_worker: 0}

``ray`` starts a local Ray cluster when ``address`` is empty, or joins a running one (``ray start --head`` on one
node, ``ray start --address <head>:6379`` on the others, then ``address: auto`` or ``<head>:6379``). Each actor
opens the study once (the model, and lazily the second moments and context templates, from the shared cache)
and then runs *work units*: a chunk of facts for tracing; a chunk of facts × some central layers for one editing
cell. Workers return rows; the driver writes them to the stage's table atomically after every unit, with the
same fingerprint as the local path, so a re-run resumes from either path and the tables equal the local run's
(up to float rounding where the thread count differs).

Faults: an actor whose process dies mid-unit is restarted by Ray and the unit retried there
(``max_restarts`` / ``max_task_retries`` = ``retries``); only results of finished units are written, so no row
is lost or written twice. A unit that raises (an error of its own, not a lost worker) is not retried: the driver
writes what finished and re-raises it. An edit that fails inside a unit is a row with ``status="error"``, as on
the local path.

Every node needs the same checkout and the same cache folder (a shared filesystem, or one filled beforehand:
the driver computes the second moments and templates before it dispatches, so the workers only read them).
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

KINDS = ("local", "ray")
FAULT_ENV = "HELPERS_FAULT_UNIT"  # fault injection for tests: "<task>:<unit index>:<marker file>"


@dataclass(frozen=True)
class ExecutorConfig:
    """The profile's ``executor`` section."""

    kind: str = "local"
    address: str | None = None  # None: start a local Ray cluster; "auto" or "host:port": join a running one
    workers: int = 2  # actors, each holding the model
    threads_per_worker: int = 1  # torch threads (and Ray CPUs) per actor
    gpus_per_worker: float = 0.0  # Ray GPUs per actor (profiles with device: cuda)
    facts_per_unit: int | None = None  # tracing: facts per unit (default 4); editing: the cell's batch_size
    layers_per_unit: int | None = None  # editing: central layers per unit (default: all of the cell's)
    retries: int = 1  # times a unit whose worker died is run again (on the restarted actor)

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "executor") -> "ExecutorConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"{where}: unknown keys {bad}; known: {sorted(known)}")
        cfg = cls(**d)
        if cfg.kind not in KINDS:
            raise ValueError(f"{where}: kind {cfg.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("workers", "threads_per_worker"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{where}: {name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.retries < 0:
            raise ValueError(f"{where}: retries must be >= 0")
        return cfg


@dataclass(frozen=True)
class WorkerSpec:
    """How an actor opens the driver's study: the same profile, results and cache folders."""

    profile: str
    results_dir: str
    cache_dir: str
    env: dict = field(default_factory=dict)  # HELPERS_* variables of the driver, set in the actor too


class UnitLost(RuntimeError):
    """A unit's worker died more often than ``retries`` allows; finished units are written, a re-run resumes."""


def make_executor(config: ExecutorConfig, spec: WorkerSpec) -> "RayExecutor | None":
    """The executor a study's stages pass to tracing and the sweep: None for ``local`` (the in-process path)."""
    return None if config.kind == "local" else RayExecutor(config, spec)


class _Worker:
    """A Ray actor's state: the study, opened once; one method per kind of work unit."""

    def __init__(self, spec: WorkerSpec, threads: int, fault: str | None = None) -> None:
        os.environ.update(spec.env)
        import torch

        torch.set_num_threads(int(threads))
        from .study import Study

        self.study = Study.open(spec.profile, spec.results_dir, spec.cache_dir)
        self.fault = fault

    def ready(self) -> bool:
        """True once the study is open (for callers that time the start-up apart)."""
        return True

    def _maybe_die(self, task: str, index: int) -> None:
        """Fault injection for the tests: the first attempt at the named unit kills this process (SIGKILL)."""
        if not self.fault:
            return
        want_task, want_index, marker = self.fault.split(":", 2)
        if want_task == task and int(want_index) == index and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def trace(self, index: int, facts, kwargs: dict):
        """Trace a chunk of facts; returns (rows, skipped case_ids)."""
        from .tracing import trace_facts

        self._maybe_die("trace", index)
        table = trace_facts(self.study.model, self.study.tok, facts, progress=False, **kwargs)
        return table, list(table.attrs.get("skipped", []))

    def edit(self, index: int, chunk: list, pre, plan: list, cfg, resources: bool) -> list[dict]:
        """Edit and score a chunk of facts: at each (central layer, indices into ``chunk``) of ``plan``, those
        facts together, through the sweep's one production path; returns the rows."""
        from .sweep import _edit_chunk, _task_from_pre

        self._maybe_die("edit", index)
        s = self.study
        stats, templates = (s.stats, s.templates) if resources else (None, None)
        tasks = [_task_from_pre(f, pre.loc[int(f["case_id"])], cfg.problem, cfg.sigma, cfg.options) for f in chunk]
        rows: list[dict] = []
        for layer, idx in plan:
            rows += _edit_chunk(s.model, s.tok, [chunk[k] for k in idx], [tasks[k] for k in idx], pre, layer, cfg,
                                stats, templates)
        return rows


class RayExecutor:
    """A pool of ``workers`` Ray actors holding the study; :meth:`map` runs work units on them."""

    def __init__(self, config: ExecutorConfig, spec: WorkerSpec) -> None:
        self.config, self.spec = config, spec
        self._actors: list = []

    def _start(self) -> None:
        import ray

        if not ray.is_initialized():
            cfg = self.config
            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if cfg.address:
                kw["address"] = cfg.address
            else:  # a local cluster sized for the pool
                kw["num_cpus"] = cfg.workers * cfg.threads_per_worker
            log.info("starting Ray (%s)", cfg.address or "local cluster")
            ray.init(**kw)
        if not self._actors:
            self._actors = [self._new_actor() for _ in range(self._pool_size())]

    def _pool_size(self) -> int:
        """``workers``, or as many as the cluster's CPUs and GPUs hold (an actor that cannot be placed would leave
        its units waiting forever); none fitting is an error naming what is needed and what is there."""
        import ray

        cfg, have = self.config, ray.cluster_resources()
        fits = [int(have.get("CPU", 0) // cfg.threads_per_worker)]
        if cfg.gpus_per_worker:
            fits.append(int(have.get("GPU", 0) // cfg.gpus_per_worker))
        n = min([cfg.workers, *fits])
        if n < 1:
            raise RuntimeError(f"the Ray cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs; one "
                               f"worker needs {cfg.threads_per_worker} CPUs and {cfg.gpus_per_worker:g} GPUs")
        if n < cfg.workers:
            log.warning("the Ray cluster holds %d of the %d workers asked for (%g CPUs, %g GPUs); using %d", n,
                        cfg.workers, have.get("CPU", 0), have.get("GPU", 0), n)
        return n

    def _new_actor(self):
        import ray

        cfg = self.config
        cls = ray.remote(_Worker).options(num_cpus=cfg.threads_per_worker, num_gpus=cfg.gpus_per_worker,
                                          max_restarts=cfg.retries, max_task_retries=cfg.retries)
        return cls.remote(self.spec, cfg.threads_per_worker, os.environ.get(FAULT_ENV))

    def map(self, task: str, units: Sequence[tuple], on_result: Callable[[int, Any], None]) -> None:
        """Run ``worker.<task>(index, *unit)`` for every unit on the pool, ``on_result(index, result)`` in this
        process as each finishes (in completion order). A unit whose actor died after Ray's retries raises
        :class:`UnitLost`; one that raised its own error re-raises it (the first such failure); either only after
        every other unit has run and been passed to ``on_result``, so a re-run has only the failed units left."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if not units:
            return
        self._start()
        todo = deque(enumerate(units))
        idle = list(self._actors)
        running: dict = {}
        failure: BaseException | None = None
        while running or todo:
            while todo and idle:
                actor = idle.pop()
                index, unit = todo.popleft()
                running[getattr(actor, task).remote(index, *unit)] = (actor, index)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as err:
                log.error("%s unit %d lost: its worker died %d times", task, index, self.config.retries + 1)
                replacement = self._new_actor()  # the pool keeps its size for the units still to run
                self._actors[self._actors.index(actor)] = replacement
                idle.append(replacement)
                failure = failure or UnitLost(f"{task} unit {index}: its worker died {self.config.retries + 1} "
                                              f"times ({type(err).__name__}); finished units are saved, run again "
                                              "to resume")
                continue
            except RayTaskError as err:  # the unit's own error: passed on as itself, not retried
                cause = getattr(err, "cause", None)
                failure = failure or (cause if isinstance(cause, Exception) else err)
                idle.append(actor)
                continue
            except Exception as err:  # e.g. an error that could not be sent back as itself
                failure = failure or err
                idle.append(actor)
                continue
            idle.append(actor)
            on_result(index, result)
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Stop the actors (the Ray cluster itself stops with this process, or stays up if it was joined)."""
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []
