"""Causal tracing and representation zeroing (SCIENCE.md §4), as one long table, and the effects derived from it.

Causal tracing (§4.2): the subject's token embeddings are noised in N = 10 rows (the same draws,
``np.random.RandomState(1).randn(N, e - b, d)``, at every site: common random numbers); then, one site at a time,
the output of one module kind ("mlp", "attn" or the block's "hidden" state) at one prompt token t and over the
layer window W(l, w) is overwritten with its clean value, and p(o_true) is re-measured (mean over the N rows).

Two implementations give the same numbers:

- the **reference path** (any architecture): one full forward pass of N + 1 rows per site, with hooks, as the
  published code does (:func:`reference_trace`);
- the **fast path** (GPT-2 architecture): the corrupted pass runs once and keeps, per layer, the residual stream
  entering the block and the attention keys/values; a site (t, W) then recomputes only positions >= t from the
  window's first layer upward, attending to the cached keys/values of positions < t, many sites per batch
  (:func:`fast_trace`). Restoring at t from layer l0 cannot change positions < t (causal attention) nor layers
  < l0, so this is exact (up to float summation order).

The long table has one row per (case_id, kind, window, token_idx, layer) over **all** prompt tokens; tokens before
the subject get p_restored = p_corrupt (§4.2 step 6). All effects (§4.3-4.4) are computed from it by
:func:`effects`, :func:`peak_layers` and :func:`concentrated`, and nowhere else.

Representation zeroing (§4.5, the paper's version) zeroes the MLP outputs at all subject positions over W(l, 5)
in a clean pass; its rows use kind = "zero" in the same table (see :func:`zero_fact`).

The work is split by job: :mod:`helpers.tracing_subject` (the subject's tokens), :mod:`helpers.tracing_noise`
(windows and noise), :mod:`helpers.tracing_fact` (one fact's reference and fast paths, zeroing),
:mod:`helpers.tracing_effects` (the effects); this module builds the long table and re-exports their names.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from torch import nn

from . import integrity, tables
from .models import arch_of, device_of, n_layers
# Re-exported: the public names of this module before it was split (and _noise_tensor, which tests use).
from .tracing_effects import (concentrated, effects, last_subject_by_layer, layer_thirds, peak_layers,
                              zero_denominator_cases)
from .tracing_fact import (
    KINDS,
    Fact,
    TraceArrays,
    _noise_tensor,
    clean_prob,
    fast_path_supported,
    fast_trace,
    prepare_fact,
    reference_run,
    reference_trace,
    zero_fact,
)
from .tracing_noise import (
    N_SAMPLES,
    NOISE_SEED,
    model_name,
    noise_draws,
    noise_sigma,
    paper_sigma,
    subject_embedding_std,
    window_layers,
)
from .tracing_subject import SubjectNotFoundError, fill_prompt, subject_range

log = logging.getLogger(__name__)

WINDOWS = (1, 3, 5, 10)

TABLE_COLUMNS = [
    "case_id", "kind", "window", "token_idx", "layer", "layer_start", "layer_end", "token",
    "is_subject", "is_last_subject", "subj_begin", "subj_end", "seq_len",
    "p_clean", "p_corrupt", "p_restored", "high_score", "sigma", "n_samples",
]


# --------------------------------------------------------------------------------------------------------------
# Driver and table
# --------------------------------------------------------------------------------------------------------------


def _rows(fact: Fact, kind: str, window: int, L: int, p_clean: float, p_corrupt: float, p: np.ndarray,
          sigma: float, n_samples: int, tokens: Sequence[int]) -> pd.DataFrame:
    """Long rows for one (fact, kind, window); ``p`` is (len(tokens), L)."""
    tok_idx = np.repeat(np.asarray(tokens), L)
    layer = np.tile(np.arange(L), len(tokens))
    ranges = [window_layers(l, window, L) for l in range(L)]
    return pd.DataFrame(
        {
            "case_id": [fact.case_id] * len(tok_idx),
            "kind": kind,
            "window": window,
            "token_idx": tok_idx,
            "layer": layer,
            "layer_start": np.tile([r.start for r in ranges], len(tokens)),
            "layer_end": np.tile([r.stop for r in ranges], len(tokens)),
            "token": [fact.tokens[i] for i in tok_idx] if kind != "zero" else "".join(fact.tokens[fact.b : fact.e]),
            "is_subject": (tok_idx >= fact.b) & (tok_idx < fact.e),
            "is_last_subject": tok_idx == fact.e - 1,
            "subj_begin": fact.b,
            "subj_end": fact.e,
            "seq_len": fact.prompt_len,
            "p_clean": p_clean,
            "p_corrupt": p_corrupt,
            "p_restored": np.asarray(p, dtype=np.float64).reshape(-1),
            "high_score": max(p_clean, float(np.max(p))),
            "sigma": sigma,
            "n_samples": n_samples,
        }
    )


_warned_fallback: set[str] = set()


def resolve_method(model: nn.Module, method: str = "auto") -> str:
    """'fast' or 'reference'. ``auto`` picks fast for GPT-2 and logs the fallback for other architectures."""
    if method not in ("auto", "fast", "reference"):
        raise ValueError(f"method must be auto, fast or reference, not {method!r}")
    if method != "auto":
        return method
    if fast_path_supported(model):
        return "fast"
    mt = str(model.config.model_type)
    if mt not in _warned_fallback:
        log.warning("fast tracing path supports GPT-2 only; using the one-site-at-a-time reference path for %r", mt)
        _warned_fallback.add(mt)
    return "reference"


def trace_fact(
    model: nn.Module,
    tok,
    prompt: str,
    subject: str,
    target: str,
    kinds: Sequence[str] = ("mlp",),
    windows: Sequence[int] = WINDOWS,
    sigma: float | None = None,
    case_id=None,
    n_samples: int = N_SAMPLES,
    seed: int = NOISE_SEED,
    method: str = "auto",
    max_rows: int = 4096,
    progress: bool = False,
    tokens: str = "all",
) -> pd.DataFrame:
    """Long table (columns :data:`TABLE_COLUMNS`) for one fact: every prompt token × layer, per kind and window.

    ``tokens="last_subject"`` restores only at the last subject token (and the table has only its rows).

    ``kinds`` ⊆ {"mlp", "attn", "hidden", "zero"}; "zero" runs representation zeroing (one row per layer at the
    last subject token, p_corrupt = p_clean, p_restored = p_zeroed, sigma = 0). ``sigma`` defaults to the paper's
    value for GPT-J / GPT2-XL, else 3 × the std of this subject's embeddings (pass it explicitly for a set of
    facts: see :func:`trace_facts`).
    """
    unknown = set(kinds) - set(KINDS) - {"zero"}
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; use {KINDS} or 'zero'")
    arch_of(model)
    fact = prepare_fact(tok, prompt, subject, target, case_id, device_of(model))
    L = n_layers(model)
    if sigma is None:
        sigma = noise_sigma(model, tok, [subject])
    noise = _noise_tensor(model, fact, sigma, n_samples, seed)  # float64, summed in float64
    how = resolve_method(model, method)
    frames = []
    if tokens not in ("all", "last_subject"):
        raise ValueError("tokens must be 'all' or 'last_subject'")
    sites = None if tokens == "all" else [fact.e - 1]
    all_tokens = range(fact.prompt_len) if sites is None else sites
    for kind in kinds:
        if kind == "zero":
            for w in windows:
                p_clean, p_zero = zero_fact(model, fact, w)
                frames.append(_rows(fact, "zero", w, L, p_clean, p_clean, p_zero[None], 0.0, 0, [fact.e - 1]))
            continue
        if how == "fast":
            res = fast_trace(model, fact, kind, windows, noise, max_rows=max_rows, progress=progress, tokens=sites)
        else:
            res = reference_trace(model, fact, kind, windows, noise, progress=progress, tokens=sites)
        for w in windows:
            frames.append(
                _rows(fact, kind, w, L, res.p_clean, res.p_corrupt, res.p_restored[w][list(all_tokens)], sigma,
                      n_samples, all_tokens)
            )
    return pd.concat(frames, ignore_index=True)[TABLE_COLUMNS]


def trace_facts(
    model: nn.Module,
    tok,
    facts: pd.DataFrame,
    kinds: Sequence[str] = ("mlp",),
    windows: Sequence[int] = WINDOWS,
    sigma: float | None = None,
    n_samples: int = N_SAMPLES,
    seed: int = NOISE_SEED,
    method: str = "auto",
    on_missing: str = "skip",
    max_rows: int = 4096,
    progress: bool = True,
    tokens: str = "all",
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 60.0,
    executor=None,
) -> pd.DataFrame:
    """Trace every fact of ``facts`` (columns case_id, subject, prompt (template with ``{}`` or full text),
    target_true) and return the long table (:data:`TABLE_COLUMNS`).

    ``checkpoint``: a parquet file the rows traced so far are written to (atomically, every
    ``checkpoint_every_s`` seconds and at the end), with a fingerprint of the settings, the model and the
    ``helpers`` source; a re-run with the same fingerprint traces only the facts it does not hold.

    ``executor`` (:mod:`helpers.scaleout`; None = this process) traces chunks of facts on a pool of workers and
    writes the checkpoint after every chunk.

    σ defaults to :func:`noise_sigma` over all the facts' subjects (stored in the ``sigma`` column).
    ``on_missing``: "skip" drops a fact whose subject is not in its prompt (logged, and listed in
    ``table.attrs["skipped"]``), "raise" re-raises :class:`SubjectNotFoundError`.
    """
    from .progress import tqdm

    if on_missing not in ("skip", "raise"):
        raise ValueError("on_missing must be 'skip' or 'raise'")
    if sigma is None:
        sigma = noise_sigma(model, tok, facts["subject"].tolist())
    from .sweep import _model_id

    saved = _Checkpoint(checkpoint, (list(kinds), list(windows), float(sigma), n_samples, seed, method, tokens,
                                     _model_id(model)), checkpoint_every_s, facts)
    frames, skipped = saved.frames(), list(saved.skipped)
    todo = facts[~facts["case_id"].isin(saved.done)]
    if len(todo) < len(facts):
        log.info("%s: %d of %d facts already traced", checkpoint, len(facts) - len(todo), len(facts))
    if executor is not None:
        per = executor.config.facts_per_unit or 4
        kw = dict(kinds=list(kinds), windows=list(windows), sigma=sigma, n_samples=n_samples, seed=seed,
                  method=method, on_missing=on_missing, max_rows=max_rows, tokens=tokens)
        units = [(todo.iloc[i : i + per], kw) for i in range(0, len(todo), per)]
        bar = tqdm(total=len(todo), desc="tracing", disable=not progress)

        def write(index: int, result) -> None:
            rows, skip = result
            frames.append(rows)
            skipped.extend(skip)
            bar.update(len(units[index][0]))
            saved.maybe_write(frames, skipped, force=True)  # committed per unit

        executor.map("trace", units, write)
        bar.close()
    else:
        for r in tqdm(todo.itertuples(index=False), total=len(todo), desc="tracing", disable=not progress):
            try:
                frames.append(
                    trace_fact(model, tok, r.prompt, r.subject, r.target_true, kinds, windows, sigma, r.case_id,
                               n_samples, seed, method, max_rows, tokens=tokens)
                )
            except SubjectNotFoundError as err:
                if on_missing == "raise":
                    raise
                log.warning("skipping: %s", err)
                skipped.append(r.case_id)
            saved.maybe_write(frames, skipped)
    saved.maybe_write(frames, skipped, force=True)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TABLE_COLUMNS)
    order = {c: i for i, c in enumerate(facts["case_id"])}  # resumed or not: the facts' order
    table = table[table["case_id"].isin(order)]
    table = table.iloc[np.argsort(table["case_id"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)
    table.attrs["skipped"] = [c for c in skipped if c in set(facts["case_id"])]
    return table


class _Checkpoint:
    """The rows of :func:`trace_facts` saved so far (see its ``checkpoint`` argument)."""

    def __init__(self, path: str | Path | None, settings: tuple, every_s: float, facts: pd.DataFrame) -> None:
        import hashlib
        import json

        from .sweep import _fingerprint

        # each fact's content: saved rows are reused only for a case_id whose prompt, subject and target are unchanged
        self.hashes = {int(r.case_id): hashlib.sha256(f"{r.prompt}\0{r.subject}\0{r.target_true}".encode()).hexdigest()[:16]
                       for r in facts.itertuples(index=False)}

        self.path = Path(path) if path is not None else None
        self.key = _fingerprint("tracing", *settings) if self.path is not None else ""
        self.every_s, self.last = every_s, time.monotonic()
        self.table, self.skipped = pd.DataFrame(columns=TABLE_COLUMNS), []
        have = None
        if self.path is not None and integrity.discard_if_bad(self.path, "tracing checkpoint"):
            try:
                have = tables.read_table(self.path)
            except integrity.CorruptFile as err:
                log.warning("%s; tracing again", err)
                integrity.remove(self.path)
        if have is not None:
            if tables.table_key(have) == self.key:
                old = json.loads(have.attrs.get("fact_hashes", "{}"))
                same = {int(c) for c, h in old.items() if self.hashes.get(int(c)) == h}
                self.skipped = [int(c) for c in have.attrs.get("skipped_ids", "").split(",") if c and int(c) in same]
                self.table = have[have["case_id"].isin(same)][TABLE_COLUMNS]
            else:
                log.warning("%s was traced with other settings, another model or other helpers code; "
                            "tracing again", self.path)
        self.done = set(self.table["case_id"]) | set(self.skipped)
        self.n_written = len(self.done)

    def frames(self) -> list[pd.DataFrame]:
        """The saved rows, as the first of :func:`trace_facts`'s frames (none when nothing was saved)."""
        return [self.table] if len(self.table) else []

    def maybe_write(self, frames: list[pd.DataFrame], skipped: list, force: bool = False) -> None:
        """Write every row so far when ``every_s`` passed since the last write (or ``force``, if anything is new)."""
        if self.path is None or (not force and time.monotonic() - self.last < self.every_s):
            return
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TABLE_COLUMNS)
        n_done = len(set(table["case_id"]) | set(skipped))
        if n_done != self.n_written or not self.path.exists():
            import json

            table.attrs["skipped_ids"] = ",".join(str(int(c)) for c in skipped)
            ids = set(table["case_id"].astype(int)) | {int(c) for c in skipped}
            table.attrs["fact_hashes"] = json.dumps({str(c): self.hashes[c] for c in sorted(ids) if c in self.hashes})
            tables.write_table(table, self.path, key=self.key)
            self.n_written = n_done
        self.last = time.monotonic()
