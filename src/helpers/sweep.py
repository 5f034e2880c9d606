"""The editing sweep: one (method × problem) cell over facts × central layers → one row per edit.

The table is rewritten atomically after every chunk of facts, so an interrupted sweep loses at most the
chunk in progress, and a re-run skips the (case_id, central_layer) rows already there, provided the table was
written with the same settings, model and ``helpers`` code (a fingerprint stored in the file; otherwise the old
rows are discarded and the cell starts afresh, with a warning). A failed edit (exception,
NaN or inf) becomes a row with ``status="error"`` and its message, and the sweep goes on.

Pre-edit quantities (the task's target, p(target) before the edit, the essence texts and their perplexity)
depend on the fact and the problem only; they are computed once and cached in
``<results>/pre/<problem>.parquet`` for every method and layer to reuse (the essence texts, which depend on the
fact alone, once for every problem: ``<results>/pre/essence.parquet``).

Edit rows (the interface to the analysis; list columns hold one value per prompt)::

    case_id, method, problem, central_layer, layers_edited, direction, target, baseline, neighborhood_target,
    rewrite_pre, rewrite_post, paraphrase_pre, paraphrase_post, neighborhood_pre, neighborhood_post,
    rewrite_base_pre, rewrite_base_post, paraphrase_base_post, neighborhood_base_post,
    essence_ppl_pre, essence_ppl_post, seconds, status, message
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from torch import nn
from .progress import tqdm

from . import editing, evaluation, integrity, metrics, tables
from .problems import ProblemOptions, Task, get_problem, make_task

log = logging.getLogger(__name__)

KEY = ["case_id", "central_layer"]


@dataclass
class CellConfig:
    """One sweep cell. ``hparams`` is the method's dict for this problem (see ``editing.load_hparams``)."""

    method: str
    problem: str
    layers: list[int]
    hparams: dict = field(default_factory=dict)
    sigma: float = 0.1
    options: ProblemOptions = field(default_factory=ProblemOptions)
    essence_samples: int = 5
    batch_size: int = 8  # facts edited together per layer (editing.batched); 1 = one edit at a time
    # False: one padded pass per step and ROME/MEMIT recompute only positions from the subject on (equal to the
    # one-fact path up to float rounding, ~1.8x faster); True: bitwise the one-fact path
    exact: bool = False


def _fingerprint(*parts) -> str:
    """Hash of ``parts``, the model's name/path and the ``helpers`` source: rows cached on disk are reused only
    when all of them are unchanged."""
    from .pipeline import source_hash

    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(source_hash().encode())
    return h.hexdigest()[:16]


def _model_id(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or type(model).__name__)


def _read_if_same(path: Path, key: str, empty: pd.DataFrame) -> pd.DataFrame:
    """The table at ``path`` if it was written with ``key``, else ``empty`` (logging why)."""
    if not integrity.discard_if_bad(path, "results table"):
        return empty
    try:
        have = tables.read_table(path)
    except integrity.CorruptFile as err:
        log.warning("%s; recomputing it", err)
        integrity.remove(path)
        return empty
    if tables.table_key(have) != key:
        log.warning("%s was written with other settings, another model or other helpers code; recomputing it",
                    path)
        return empty
    return have


def _pre_path(results: Path, problem: str) -> Path:
    return results / "pre" / f"{get_problem(problem).key}.parquet"


PRE_CHUNK = 8  # facts measured together before their edits (essence sampling and evaluation passes)


def _essence_path(results: Path) -> Path:
    return results / "pre" / "essence.parquet"


def _essence_texts(model: nn.Module, tok, chunk: list, results: Path, n: int) -> list[list[str]]:
    """The essence texts of each fact of ``chunk``: sampled once per fact and model for every problem (they
    depend on neither; each fact's seed is its case_id), kept in ``<results>/pre/essence.parquet``."""
    path = _essence_path(results)
    key = _fingerprint("essence", n, _model_id(model))
    have = _read_if_same(path, key, pd.DataFrame({"case_id": pd.Series(dtype=int), "essence_texts": []}))
    known = {int(c): list(t) for c, t in zip(have["case_id"], have["essence_texts"])}
    todo = [f for f in chunk if int(f["case_id"]) not in known]
    if todo:
        texts = evaluation.essence_texts_many(model, tok, [f["subject"] for f in todo],
                                              [int(f["case_id"]) for f in todo], n=n)
        known.update({int(f["case_id"]): t for f, t in zip(todo, texts)})
        ids = sorted(known)
        tables.write_table(pd.DataFrame({"case_id": ids, "essence_texts": [known[c] for c in ids]}), path, key)
    return [known[int(f["case_id"])] for f in chunk]


def pre_edit(model: nn.Module, tok, facts: pd.DataFrame, problem: str, sigma: float, results: Path,
             options: ProblemOptions = ProblemOptions(), essence_samples: int = 5) -> pd.DataFrame:
    """Per fact: the task (target, baseline, …) and its pre-edit measurements; cached on disk per problem
    (written after every chunk of :data:`PRE_CHUNK` facts, so an interrupted run resumes). The chunk's facts are
    measured together (``batched.measure_many``: :func:`helpers.evaluation.measure` up to float rounding) and
    their essence texts sampled together and shared by every problem (:func:`_essence_texts`)."""
    from .editing import batched

    path = _pre_path(results, problem)
    key = _fingerprint("pre", get_problem(problem).key, sigma, options, essence_samples, _model_id(model))
    have = _read_if_same(path, key, pd.DataFrame({"case_id": pd.Series(dtype=int)}))
    todo = [f for _, f in facts[~facts["case_id"].isin(have["case_id"])].iterrows()]
    for i in tqdm(range(0, len(todo), PRE_CHUNK), desc=f"pre-edit {problem} ({len(todo)} facts)", leave=False):
        chunk = todo[i : i + PRE_CHUNK]
        tasks = [make_task(model, tok, f, problem, sigma, options) for f in chunk]
        texts = (_essence_texts(model, tok, chunk, results, essence_samples) if essence_samples > 0
                 else [[] for _ in chunk])  # 0: no essence drift (tuning)
        ms = batched.measure_many(model, tok, tasks, chunk, None, texts)
        rows = pd.DataFrame([dict(case_id=task.case_id, target=task.target, baseline=task.baseline,
                                  neighborhood_target=task.neighborhood_target, essence_texts=t,
                                  **{f"{k}_pre": v for k, v in m.items()}) for task, t, m in zip(tasks, texts, ms)])
        have = pd.concat([have, rows], ignore_index=True) if len(have) else rows
        have = have.sort_values("case_id").reset_index(drop=True)
        tables.write_table(have, path, key)
    return have[have["case_id"].isin(facts["case_id"])].set_index("case_id", drop=False)


def _task_from_pre(fact, pre_row, problem: str, sigma: float, options: ProblemOptions) -> Task:
    prob = get_problem(problem)
    noise = None
    if prob.noised:
        noise = editing.NoiseSpec(sigma=sigma, n_samples=10, seed=1, positions=options.ff_noise_positions)
    req = editing.EditRequest(fact["prompt"], fact["subject"], pre_row["target"], direction=prob.direction,
                              noise=noise, case_id=int(fact["case_id"]))
    return Task(int(fact["case_id"]), prob.key, req, pre_row["target"], pre_row["baseline"],
                pre_row["neighborhood_target"], sigma if prob.noised else None)


def _finite(m: dict) -> bool:
    vals = [m["rewrite"], *m["paraphrase"], *m["neighborhood"]]
    return all(math.isfinite(v) for v in vals) and (math.isnan(m["essence_ppl"]) or math.isfinite(m["essence_ppl"]))


def run_cell(
    model: nn.Module,
    tok,
    facts: pd.DataFrame,
    cfg: CellConfig,
    out_path: Path,
    results: Path,
    stats: editing.SecondMoments | None = None,
    templates: editing.ContextTemplates | None = None,
    stop_after: int | None = None,
    executor=None,
) -> pd.DataFrame:
    """Run (or resume) one cell; returns the full edit table (also written to ``out_path``).

    Facts are processed in chunks of ``cfg.batch_size``: at each layer the chunk's edits are optimised together
    (:func:`helpers.editing.batched.edit_many`, equal to one-at-a-time editing) and evaluated in batched passes
    with per-example edits; this batched path is the only production path (chunks of one fact where that is
    faster: fine-tuning under Fact Forcing). ``editing.edit`` / ``evaluation.measure`` remain as the readable
    one-fact reference that the tests compare it with. A chunk that fails as a whole is redone one fact at a
    time, so every failure is recorded on its own row. The table is written after every chunk. ``stop_after`` processes at most that
    many facts in this call (for tests of resuming). ``executor`` (:mod:`helpers.scaleout`; None = this process)
    runs (chunk, layers) units on a pool of workers; the driver writes the table after every unit.
    """
    out_path = Path(out_path)
    prob = get_problem(cfg.problem)
    pre = pre_edit(model, tok, facts, prob.key, cfg.sigma, results, cfg.options, cfg.essence_samples)
    # batch_size is left out: it changes nothing but float rounding in fast mode
    key = _fingerprint("cell", {k: v for k, v in asdict(cfg).items() if k != "batch_size"}, _model_id(model))
    done = _read_if_same(out_path, key, pd.DataFrame(columns=KEY))
    done_keys = set(map(tuple, done[KEY].astype(int).values.tolist()))
    todo = in_batch_order(tok, [f for _, f in facts.iterrows()
                                if any((int(f["case_id"]), l) not in done_keys for l in cfg.layers)], pre, cfg)
    if stop_after is not None:
        todo = todo[:stop_after]
    new_rows: list[dict] = []
    bar = tqdm(total=sum(sum((int(f["case_id"]), l) not in done_keys for l in cfg.layers) for f in todo),
               desc=f"{cfg.method} × {prob.key}", leave=False)
    step = max(1, int(cfg.batch_size))
    if executor is not None:
        new_rows = _run_units(executor, todo, done, done_keys, pre, cfg, out_path, key, stats is not None, bar)
        bar.close()
        return _combine(done, new_rows)
    for i in range(0, len(todo), step):
        chunk = todo[i : i + step]
        tasks = [_task_from_pre(f, pre.loc[int(f["case_id"])], prob.key, cfg.sigma, cfg.options) for f in chunk]
        for layer in cfg.layers:
            idx = [k for k, f in enumerate(chunk) if (int(f["case_id"]), layer) not in done_keys]
            if not idx:
                continue
            rows = _edit_chunk(model, tok, [chunk[k] for k in idx], [tasks[k] for k in idx], pre, layer, cfg,
                               stats, templates)
            new_rows += rows
            bar.update(len(rows))
        tables.write_table(_combine(done, new_rows), out_path, key)  # committed per chunk, atomically
    bar.close()
    return _combine(done, new_rows)


def in_batch_order(tok, facts: list, pre: pd.DataFrame, cfg: CellConfig) -> list:
    """``facts`` (rows) in the order the sweep cuts them into chunks: facts whose passes have similar lengths
    together (:func:`helpers.editing.batched.batch_order`; less padding), or as given for one-fact chunks."""
    if cfg.batch_size <= 1 or len(facts) <= 1:
        return list(facts)
    from .editing import batched

    prob = get_problem(cfg.problem)
    reqs = [_task_from_pre(f, pre.loc[int(f["case_id"])], prob.key, cfg.sigma, cfg.options).request for f in facts]
    return [facts[k] for k in batched.batch_order(tok, reqs, cfg.method)]


def _run_units(executor, todo: list, done: pd.DataFrame, done_keys: set, pre: pd.DataFrame, cfg: CellConfig,
               out_path: Path, key: str, resources: bool, bar) -> list[dict]:
    """:func:`run_cell` on ``executor``'s workers. A unit is a chunk of ``batch_size`` facts (the local path's
    chunks, so the batches and their results are the same) × ``layers_per_unit`` central layers, each layer
    editing the chunk's facts that lack a row there; the table is written after every finished unit."""
    per = max(1, int(executor.config.facts_per_unit or cfg.batch_size))
    n_layers = max(1, int(executor.config.layers_per_unit or len(cfg.layers)))
    units = []
    for i in range(0, len(todo), per):
        chunk = todo[i : i + per]
        for j in range(0, len(cfg.layers), n_layers):
            plan = [(l, [k for k, f in enumerate(chunk) if (int(f["case_id"]), l) not in done_keys])
                    for l in cfg.layers[j : j + n_layers]]
            plan = [(l, idx) for l, idx in plan if idx]
            if plan:
                units.append((chunk, pre.loc[sorted({int(f["case_id"]) for f in chunk})], plan, cfg, resources))
    new_rows: list[dict] = []

    def write(index: int, rows: list[dict]) -> None:
        fresh = [r for r in rows if (r["case_id"], r["central_layer"]) not in done_keys]
        done_keys.update((r["case_id"], r["central_layer"]) for r in fresh)
        new_rows.extend(fresh)
        bar.update(len(fresh))
        tables.write_table(_combine(done, new_rows), out_path, key)  # committed per unit, atomically

    executor.map("edit", units, write)
    return new_rows


def _base_row(fact, task: Task, p, layer: int, cfg: CellConfig, model: nn.Module) -> dict:
    return dict(case_id=int(fact["case_id"]), method=cfg.method, problem=task.problem, central_layer=int(layer),
                layers_edited=editing.edit_layers(model, cfg.method, layer, cfg.hparams),
                direction=task.request.direction, target=task.target, baseline=task.baseline,
                neighborhood_target=task.neighborhood_target,
                rewrite_pre=p["rewrite_pre"], paraphrase_pre=list(p["paraphrase_pre"]),
                neighborhood_pre=list(p["neighborhood_pre"]), rewrite_base_pre=p["rewrite_base_pre"],
                essence_ppl_pre=p["essence_ppl_pre"], status="ok", message="")


def _post(row: dict, m: dict) -> None:
    if not _finite(m):
        raise FloatingPointError("non-finite post-edit probability or perplexity")
    row.update(rewrite_post=m["rewrite"], paraphrase_post=m["paraphrase"], neighborhood_post=m["neighborhood"],
               rewrite_base_post=m["rewrite_base"], paraphrase_base_post=m["paraphrase_base"],
               neighborhood_base_post=m["neighborhood_base"], essence_ppl_post=m["essence_ppl"])


def _fail(row: dict, cfg: CellConfig, err: BaseException) -> None:
    log.warning("case %s layer %s %s/%s failed: %s", row["case_id"], row["central_layer"], cfg.method,
                row["problem"], err)
    row.update(status="error", message=f"{type(err).__name__}: {err}")


def _one_at_a_time_is_faster(cfg: CellConfig, tasks: list[Task]) -> bool:
    """Fine-tuning under input noise (Fact Forcing): fresh noise at every step leaves nothing below the edit to
    reuse, and a batch's per-fact dense deltas cost more than batching saves (``benchmarks/editing.py
    --problems ff``: FT-1 0.74x, FT-5 0.77x of the one-fact path), so such chunks are edited one fact at a time.
    The results are the same up to float rounding, as for any batch size."""
    return cfg.method in ("ft1", "ft5") and any(t.request.noise is not None for t in tasks)


def _edit_chunk(model, tok, chunk: list, tasks: list[Task], pre, layer: int, cfg: CellConfig, stats,
                templates) -> list[dict]:
    """Edit and evaluate ``chunk`` at ``layer`` through the one production path (``batched.edit_many`` and
    ``batched.measure_many``); chunks that are faster one fact at a time go through it in chunks of one."""
    if len(chunk) > 1 and (cfg.batch_size <= 1 or _one_at_a_time_is_faster(cfg, tasks)):
        return [r for f, t in zip(chunk, tasks)
                for r in _edit_chunk(model, tok, [f], [t], pre, layer, cfg, stats, templates)]
    from .editing import batched

    t0 = time.perf_counter()
    try:
        edits = batched.edit_many(model, tok, [t.request for t in tasks], cfg.method, layer, cfg.hparams,
                                  stats=stats, templates=templates, on_error="return", exact=cfg.exact)
        ok = [not isinstance(e, Exception) for e in edits]
        essences = [list(pre.loc[int(f["case_id"])]["essence_texts"]) for f in chunk]
        ms = batched.measure_many(model, tok, [t for t, o in zip(tasks, ok) if o],
                                  [f for f, o in zip(chunk, ok) if o], [e for e, o in zip(edits, ok) if o],
                                  [x for x, o in zip(essences, ok) if o])
    except Exception as err:  # the whole chunk failed: redo it one fact at a time to attribute the failure
        if len(chunk) > 1:
            log.warning("batched %s at layer %s failed (%s); redoing the chunk one fact at a time", cfg.method,
                        layer, err)
            return [r for f, t in zip(chunk, tasks)
                    for r in _edit_chunk(model, tok, [f], [t], pre, layer, cfg, stats, templates)]
        row = _base_row(chunk[0], tasks[0], pre.loc[int(chunk[0]["case_id"])], layer, cfg, model)
        _fail(row, cfg, err)
        row["seconds"] = time.perf_counter() - t0
        return [row]
    seconds = (time.perf_counter() - t0) / len(chunk)
    rows, it = [], iter(ms)
    for f, t, e, o in zip(chunk, tasks, edits, ok):
        row = _base_row(f, t, pre.loc[int(f["case_id"])], layer, cfg, model)
        try:
            if not o:
                raise e
            _post(row, next(it))
        except Exception as err:
            _fail(row, cfg, err)
        row["seconds"] = seconds
        rows.append(row)
    return rows


_LIST_COLS = ["paraphrase_pre", "paraphrase_post", "neighborhood_pre", "neighborhood_post",
              "paraphrase_base_post", "neighborhood_base_post", "layers_edited"]


def _combine(done: pd.DataFrame, new_rows: list[dict]) -> pd.DataFrame:
    new = pd.DataFrame(new_rows)
    table = new if len(done) == 0 else pd.concat([done, new], ignore_index=True) if len(new) else done
    for c in _LIST_COLS:
        if c in table:
            table[c] = table[c].apply(lambda v: v.tolist() if isinstance(v, np.ndarray)  # python numbers, as fresh rows
                                      else list(v) if isinstance(v, (list, tuple)) else [])
    return table.sort_values(KEY).reset_index(drop=True)


def scored(edits: pd.DataFrame) -> pd.DataFrame:
    """The edit table with the metric columns of :func:`helpers.metrics.score_table` (ok rows only)."""
    ok = edits[edits["status"] == "ok"].copy()
    return metrics.score_table(ok)


def load_edits(results: Path, methods: Sequence[str] | None = None, problems: Sequence[str] | None = None) -> pd.DataFrame:
    """All edit tables of a profile's results, concatenated and scored."""
    frames = []
    for p in sorted((Path(results) / "edits").glob("*.parquet")):
        m, pr = p.stem.split("__")
        if (methods is None or m in methods) and (problems is None or pr in problems):
            frames.append(tables.read_table(p))
    if not frames:
        raise FileNotFoundError(f"no edit tables under {Path(results) / 'edits'}: run the 03_editing stages first")
    return scored(pd.concat(frames, ignore_index=True))


def noise_sigma_for(results: Path, model: nn.Module, tok, subjects: Sequence[str]) -> float:
    """The profile's noise σ, computed once (paper value or 3 × subject-embedding std) and kept in
    ``<results>/noise.json`` so tracing and editing use the same value."""
    from .tracing import noise_sigma

    path = Path(results) / "noise.json"
    key = _fingerprint("sigma", sorted(set(subjects)), _model_id(model))
    saved = {}
    if integrity.discard_if_bad(path, "noise scale"):
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = {}
    if saved:
        if saved.get("key") == key:
            return float(saved["sigma"])
        log.warning("%s was computed for another model, other subjects or other helpers code; recomputing", path)
    sigma = noise_sigma(model, tok, list(subjects))
    with tables.atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"sigma": sigma, "n_subjects": len(set(subjects)), "key": key}))
    return sigma
