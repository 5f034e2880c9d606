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
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .hooks import trace
from .models import PAPER_NOISE, arch_of, module, module_name, n_layers
from .models import window as models_window
from .scoring import Batch, bos, encode, log_probs, make_batch, target_logprob_from_logits

log = logging.getLogger(__name__)

KINDS = ("mlp", "attn", "hidden")  # restorable module kinds; "zero" marks representation-zeroing rows
WINDOWS = (1, 3, 5, 10)
N_SAMPLES = 10
NOISE_SEED = 1
_MODULE_KIND = {"mlp": "mlp", "attn": "attn", "hidden": "block"}

TABLE_COLUMNS = [
    "case_id", "kind", "window", "token_idx", "layer", "layer_start", "layer_end", "token",
    "is_subject", "is_last_subject", "subj_begin", "subj_end", "seq_len",
    "p_clean", "p_corrupt", "p_restored", "high_score", "sigma", "n_samples",
]


# --------------------------------------------------------------------------------------------------------------
# Subject token range
# --------------------------------------------------------------------------------------------------------------


class SubjectNotFoundError(ValueError):
    """The subject string does not occur in the prompt, even after the §4.2 fallback normalisation."""

    def __init__(self, case_id, prompt: str, subject: str):
        self.case_id, self.prompt, self.subject = case_id, prompt, subject
        super().__init__(
            f"case_id={case_id!r}: subject {subject!r} not found in prompt {prompt!r} "
            "(also not after unidecode and removing spaces before . , !)"
        )


def _normalise(text: str) -> tuple[str, list[int]]:
    """§4.2 fallback: unidecode each character and drop spaces before . , ! .

    Returns the normalised string and, for each of its characters, the index of the original character it came
    from (so a match can be mapped back to the tokenizer's character offsets).
    """
    from unidecode import unidecode

    chars: list[str] = []
    src: list[int] = []
    for i, c in enumerate(text):
        for u in unidecode(c):
            chars.append(u)
            src.append(i)
    keep = [not (c == " " and j + 1 < len(chars) and chars[j + 1] in ".,!") for j, c in enumerate(chars)]
    return "".join(c for c, k in zip(chars, keep) if k), [s for s, k in zip(src, keep) if k]


def _char_span(prompt: str, subject: str, case_id=None) -> tuple[int, int]:
    """[start, end) characters of the first occurrence of ``subject`` in ``prompt`` (with the §4.2 fallback)."""
    start = prompt.find(subject)
    if start >= 0 and subject:
        return start, start + len(subject)
    p_norm, p_src = _normalise(prompt)
    s_norm, _ = _normalise(subject)
    start = p_norm.find(s_norm) if s_norm else -1
    if start < 0:
        raise SubjectNotFoundError(case_id, prompt, subject)
    end = start + len(s_norm)
    return p_src[start], p_src[end - 1] + 1


def _token_offsets(tok, prompt: str) -> list[tuple[int, int]]:
    """Character [start, end) of each prompt token (fast tokenizers' offsets; else cumulative decoded lengths)."""
    if getattr(tok, "is_fast", False):
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(o) for o in enc["offset_mapping"]]
    offsets, pos = [], 0
    for i in encode(tok, prompt, bos_token=False):  # the published code's method: decode each token, concatenate
        n = len(tok.decode([i]))
        offsets.append((pos, pos + n))
        pos += n
    return offsets


def subject_range(tok, prompt: str, subject: str, case_id=None) -> tuple[int, int]:
    """Token range [b, e) of the first occurrence of ``subject`` in ``prompt``, counted in the ids of
    :func:`helpers.scoring.encode` (so a tokenizer's BOS, when it adds one, is position 0).

    b is the first token ending after the subject's first character, e is one past the last token starting
    before its end. Raises :class:`SubjectNotFoundError` (naming ``case_id``, prompt and subject) if absent.
    """
    c0, c1 = _char_span(prompt, subject, case_id)
    offsets = _token_offsets(tok, prompt)
    b = next((i for i, (_, end) in enumerate(offsets) if end > c0), None)
    e = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < c1), None)
    if b is None or e is None or e < b:
        raise SubjectNotFoundError(case_id, prompt, subject)
    shift = len(bos(tok))
    return b + shift, e + 1 + shift


def fill_prompt(prompt: str, subject: str) -> str:
    """The prompt text: a CounterFact template with ``{}`` gets the subject; a full prompt is returned as is."""
    return prompt.replace("{}", subject) if "{}" in prompt else prompt


# --------------------------------------------------------------------------------------------------------------
# Windows and noise
# --------------------------------------------------------------------------------------------------------------


def window_layers(layer: int, window: int, n_layer: int) -> range:
    """W(l, w), clipped at the edges (see :func:`helpers.models.window`)."""
    return models_window(layer, window, n_layer)


def noise_draws(n_samples: int, n_subject_tokens: int, d_model: int, seed: int = NOISE_SEED) -> np.ndarray:
    """Unscaled standard-normal draws (n_samples, n_subject_tokens, d_model), float64, exactly as the published
    code draws them: a fresh ``np.random.RandomState(seed)`` (seed 1) and one ``randn`` call."""
    return np.random.RandomState(seed=seed).randn(n_samples, n_subject_tokens, d_model)


def model_name(model: nn.Module) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")


def paper_sigma(model: nn.Module) -> float | None:
    """The paper's σ for GPT-J (0.094) / GPT2-XL (0.1), matched by hub name or a folder named like it."""
    name = model_name(model).rstrip("/")
    for key, sigma in PAPER_NOISE.items():
        if name == key or name.split("/")[-1] == key.split("/")[-1]:
            return sigma
    return None


@torch.no_grad()
def subject_embedding_std(model: nn.Module, tok, subjects: Iterable[str]) -> float:
    """Standard deviation of all token-embedding entries of the (bare, un-prefixed) subject tokens, as ROME's
    ``collect_embedding_std`` computes it (one pooled std over every entry)."""
    emb = module(model, "embed")
    rows = [emb(torch.tensor([encode(tok, s, bos_token=False)]))[0]
            for s in dict.fromkeys(subjects) if s and encode(tok, s, bos_token=False)]
    if not rows:
        raise ValueError("no subject tokens to compute the embedding std from")
    return float(torch.cat(rows).double().std())


def noise_sigma(model: nn.Module, tok=None, subjects: Iterable[str] | None = None) -> float:
    """σ of the tracing noise: the paper's value for GPT-J / GPT2-XL, else 3 × :func:`subject_embedding_std`."""
    sigma = paper_sigma(model)
    if sigma is not None:
        return sigma
    if tok is None or subjects is None:
        raise ValueError(f"model {model_name(model)!r} has no paper σ: pass tok and subjects to compute 3 × std")
    sigma = 3.0 * subject_embedding_std(model, tok, subjects)
    log.info("noise σ = 3 × subject-embedding std = %.5f", sigma)
    return sigma


# --------------------------------------------------------------------------------------------------------------
# One fact
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Fact:
    """One prompt/subject/target with its tokenization: ``ids`` = prompt ‖ target ids, T = ``prompt_len``."""

    case_id: object
    prompt: str
    subject: str
    target: str
    batch: Batch  # a 1-row prompt‖target batch (scoring.make_batch)
    prompt_len: int
    target_len: int
    b: int
    e: int
    tokens: list[str]  # decoded prompt tokens

    @property
    def ids(self) -> torch.Tensor:
        return self.batch.input_ids[0]


def prepare_fact(tok, prompt: str, subject: str, target: str, case_id=None) -> Fact:
    """Tokenize one fact (``prompt`` may be a template with ``{}``) and locate its subject tokens."""
    text = fill_prompt(prompt, subject)
    b, e = subject_range(tok, text, subject, case_id)
    batch = make_batch(tok, [text], [target])
    T = batch.prompt_len[0]
    ids = batch.input_ids[0, :T].tolist()
    return Fact(case_id, text, subject, target, batch, T, batch.target_len[0], b, e, [tok.decode([i]) for i in ids])


def _repeat(batch: Batch, n: int) -> Batch:
    return Batch(
        batch.input_ids.repeat(n, 1), batch.attention_mask.repeat(n, 1), batch.position_ids.repeat(n, 1),
        batch.prompt_len * n, batch.target_len * n, batch.start * n,
    )


def _noise_tensor(model: nn.Module, fact: Fact, sigma: float, n_samples: int, seed: int) -> torch.Tensor:
    """σ · draws, float64, (n_samples, e - b, d)."""
    d = module(model, "embed").weight.shape[1]
    return sigma * torch.from_numpy(noise_draws(n_samples, fact.e - fact.b, d, seed))


def _add_noise(x: torch.Tensor, noise: torch.Tensor, b: int, e: int, first_row: int) -> torch.Tensor:
    """Embedding output with noise added at [b, e) of rows first_row.. (the sum taken in float64, like the
    published code's in-place ``x[1:, b:e] += noise`` with a float64 right-hand side)."""
    x = x.clone()
    rows = slice(first_row, first_row + noise.shape[0])
    x[rows, b:e] = (x[rows, b:e].double() + noise).to(x.dtype)
    return x


def _probs(model: nn.Module, batch: Batch, edit=None, modules: Sequence[str] = ()) -> torch.Tensor:
    """(B,) p(target) of each row of ``batch`` with the optional hook ``edit`` on ``modules``."""
    with trace(model, list(modules), edit=edit, retain_output=False):
        logits = model(**batch.model_inputs()).logits
    return target_logprob_from_logits(logits, batch).exp()


# ---------- reference path: one site at a time, full forward of N + 1 rows with hooks -------------------------


@torch.no_grad()
def reference_run(
    model: nn.Module, fact: Fact, noise: torch.Tensor, restore: dict[str, Sequence[int]] | None = None
) -> tuple[float, float]:
    """One published-code forward pass: row 0 clean, rows 1..N noised at the subject; in rows 1..N the outputs
    of the modules named in ``restore`` are overwritten at the given positions with row 0's values.

    Returns (p of row 0, mean p of rows 1..N). ``restore`` maps a module name to token positions (any positions,
    so tests can restore many sites at once).
    """
    restore = restore or {}
    embed = module_name(model, "embed")
    n = noise.shape[0]
    pos = {name: torch.as_tensor(list(p), dtype=torch.long) for name, p in restore.items()}

    def edit(out: torch.Tensor, name: str):
        if name == embed:
            return _add_noise(out, noise.to(out.device), fact.b, fact.e, 1)
        new = out.clone()
        new[1:, pos[name]] = out[0, pos[name]]
        return new

    p = _probs(model, _repeat(fact.batch, n + 1), edit, [embed, *restore])
    return float(p[0]), float(p[1:].mean())


@torch.no_grad()
def clean_prob(model: nn.Module, fact: Fact) -> float:
    """p(target | prompt) from its own clean pass (§4.2 step 4)."""
    return float(_probs(model, fact.batch)[0])


def _site_list(fact: Fact, windows: Sequence[int], L: int,
               tokens: Sequence[int] | None = None) -> list[tuple[int, int, int, int, int]]:
    """(t, window, layer, l0, l1) for every traced site: t in [b, T) (or in ``tokens``), every layer and window."""
    return [
        (t, w, l, r.start, r.stop)
        for t in (range(fact.b, fact.prompt_len) if tokens is None else tokens)
        for w in windows
        for l in range(L)
        for r in [window_layers(l, w, L)]
    ]


@dataclass
class TraceArrays:
    """Result of tracing one fact with one kind: p_restored[window] is (T, L); rows t < b hold p_corrupt."""

    p_clean: float
    p_corrupt: float
    p_restored: dict[int, np.ndarray]


@torch.no_grad()
def reference_trace(
    model: nn.Module, fact: Fact, kind: str, windows: Sequence[int], noise: torch.Tensor, progress: bool = False,
    tokens: Sequence[int] | None = None,
) -> TraceArrays:
    """The ground truth: one forward pass of N + 1 rows per (t, layer, window) site, as in the published code."""
    L = n_layers(model)
    p_clean = clean_prob(model, fact)
    _, p_corrupt = reference_run(model, fact, noise)
    out = {w: np.full((fact.prompt_len, L), p_corrupt) for w in windows}
    sites = _site_list(fact, windows, L, tokens)
    if progress:
        from tqdm.auto import tqdm

        sites = tqdm(sites, desc=f"reference {kind}", leave=False)
    for t, w, l, l0, l1 in sites:
        restore = {module_name(model, _MODULE_KIND[kind], j): [t] for j in range(l0, l1)}
        out[w][t, l] = reference_run(model, fact, noise, restore)[1]
    return TraceArrays(p_clean, p_corrupt, out)


# ---------- fast path: every architecture (helpers.tracing_fast) ----------------------------------------------


def fast_path_supported(model: nn.Module) -> bool:
    """True for every architecture of :data:`helpers.models.ARCHITECTURES` (the fast path runs the model's own
    decoder layers; see :mod:`helpers.tracing_fast`)."""
    try:
        arch_of(model)
    except ValueError:
        return False
    return True


@torch.no_grad()
def fast_trace(
    model: nn.Module,
    fact: Fact,
    kind: str,
    windows: Sequence[int],
    noise: torch.Tensor,
    max_rows: int = 4096,
    progress: bool = False,
    tokens: Sequence[int] | None = None,
    span: int | None = None,
) -> TraceArrays:
    """Exact causal tracing that recomputes only what a restoration can change (:mod:`helpers.tracing_fast`):
    the corrupted pass once; per token t, its sites batched from their window start at positions >= t,
    attending to the cached keys/values of positions < t. ``max_rows`` bounds sites x N x suffix length per
    batch; ``span`` bounds how far apart the window starts of one batch may be (default L // 6)."""
    from . import tracing_fast

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    L = n_layers(model)
    sites = _site_list(fact, windows, L, tokens)
    c, result = tracing_fast.fast_p_restored(model, fact, kind, [(t, l0, l1) for t, _, _, l0, l1 in sites],
                                             noise, _add_noise, max_rows=max_rows, span=span, progress=progress)
    return TraceArrays(c.p_clean, c.p_corrupt, tracing_fast.as_arrays(c, result, sites, windows, fact.prompt_len, L))


# ---------- representation zeroing (§4.5) ---------------------------------------------------------------------


@torch.no_grad()
def zero_fact(model: nn.Module, fact: Fact, window: int = 5) -> tuple[float, np.ndarray]:
    """(p_clean, p_zeroed (L,)): clean pass with the MLP outputs at **all** subject positions set to zero over
    W(l, window), for each central layer l (the paper's App. B version). One pass of L rows, one per l."""
    L = n_layers(model)
    names = [module_name(model, "mlp", j) for j in range(L)]
    rows_of = {names[j]: [l for l in range(L) if j in window_layers(l, window, L)] for j in range(L)}

    def edit(out: torch.Tensor, name: str):
        new = out.clone()
        new[rows_of[name], fact.b : fact.e] = 0
        return new

    p = _probs(model, _repeat(fact.batch, L), edit, names)
    return clean_prob(model, fact), p.numpy().astype(np.float64)


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
    fact = prepare_fact(tok, prompt, subject, target, case_id)
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
) -> pd.DataFrame:
    """Trace every fact of ``facts`` (columns case_id, subject, prompt (template with ``{}`` or full text),
    target_true) and return the long table (:data:`TABLE_COLUMNS`).

    σ defaults to :func:`noise_sigma` over all the facts' subjects (stored in the ``sigma`` column).
    ``on_missing``: "skip" drops a fact whose subject is not in its prompt (logged, and listed in
    ``table.attrs["skipped"]``), "raise" re-raises :class:`SubjectNotFoundError`.
    """
    from tqdm.auto import tqdm

    if on_missing not in ("skip", "raise"):
        raise ValueError("on_missing must be 'skip' or 'raise'")
    if sigma is None:
        sigma = noise_sigma(model, tok, facts["subject"].tolist())
    frames, skipped = [], []
    rows = facts.itertuples(index=False)
    for r in tqdm(rows, total=len(facts), desc="tracing", disable=not progress):
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
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TABLE_COLUMNS)
    table.attrs["skipped"] = skipped
    return table


# --------------------------------------------------------------------------------------------------------------
# Effects (§4.3, §4.4): computed here and nowhere else
# --------------------------------------------------------------------------------------------------------------

_GROUP = ["case_id", "kind", "window"]


def _with_restore_effects(table: pd.DataFrame, denominator: str) -> pd.DataFrame:
    """Row-level effects: restore_effect, high_score (recomputed), denominator, zero_denominator, fraction."""
    if denominator not in ("code", "paper"):
        raise ValueError("denominator must be 'code' or 'paper'")
    t = table.copy()
    t["restore_effect"] = t["p_restored"] - t["p_corrupt"]
    t["high_score"] = np.maximum(t["p_clean"], t.groupby(_GROUP, sort=False)["p_restored"].transform("max"))
    if denominator == "code":  # |p_corrupt - high_score|, high_score = max(p_clean, max restored)
        den = (t["p_corrupt"] - t["high_score"]).abs()
    else:  # the paper's p_clean - p_corrupt
        den = t["p_clean"] - t["p_corrupt"]
    t["corruption_effect"] = t["p_corrupt"] - (t["high_score"] if denominator == "code" else t["p_clean"])
    t["denominator"] = den
    t["zero_denominator"] = ~(den > 0)
    safe = den.where(den > 0, 1.0)
    t["fraction_restored"] = np.where(t["zero_denominator"], 0.0, (t["restore_effect"] / safe).clip(lower=0))
    t["subj_fraction"] = np.where(t["zero_denominator"], 0.0, t["restore_effect"] / safe)
    return t


def effects(table: pd.DataFrame, denominator: str = "code") -> pd.DataFrame:
    """One row per (case_id, kind, window, layer) from the long table (SCIENCE.md §4.3).

    Columns: p_clean, p_corrupt, high_score, corruption_effect, denominator, zero_denominator,
    te (max over tokens of fraction_restored = max(0, restore_effect / denominator); the regression variable),
    subj_effect (restore_effect at the last subject token, probability units), subj_effect_fraction (the same
    divided by the denominator, not clipped), restore_effect_max (max over tokens).

    ``denominator="code"`` divides by |p_corrupt - high_score| (te in [0, 1]); ``"paper"`` by p_clean - p_corrupt
    (te ≥ 0, above 1 when a restoration overshoots p_clean). A denominator ≤ 0 (corruption had no effect) sets
    zero_denominator = True and te = subj_effect_fraction = 0, never NaN; such cases are logged.

    Rows of kind "zero" (representation zeroing) get te = subj_effect_fraction = (p_clean - p_zeroed) / p_clean,
    subj_effect = p_clean - p_zeroed, restore_effect_max = p_zeroed - p_clean, denominator = p_clean.
    """
    zero = table[table["kind"] == "zero"]
    tr = table[table["kind"] != "zero"]
    keys = _GROUP + ["layer"]
    parts = []
    if len(tr):
        t = _with_restore_effects(tr, denominator)
        g = t.groupby(keys, sort=True)
        out = g.agg(
            p_clean=("p_clean", "first"),
            p_corrupt=("p_corrupt", "first"),
            high_score=("high_score", "first"),
            corruption_effect=("corruption_effect", "first"),
            denominator=("denominator", "first"),
            zero_denominator=("zero_denominator", "first"),
            te=("fraction_restored", "max"),
            restore_effect_max=("restore_effect", "max"),
        )
        last = t[t["is_last_subject"]].set_index(keys)
        out["subj_effect"] = last["restore_effect"]
        out["subj_effect_fraction"] = last["subj_fraction"]
        parts.append(out.reset_index())
    if len(zero):
        z = zero.copy()
        den = z["p_clean"]
        z["zero_denominator"] = ~(den > 0)
        frac = np.where(z["zero_denominator"], 0.0, (z["p_clean"] - z["p_restored"]) / den.where(den > 0, 1.0))
        parts.append(
            pd.DataFrame(
                {
                    **{k: z[k].values for k in keys},
                    "p_clean": z["p_clean"].values,
                    "p_corrupt": z["p_corrupt"].values,
                    "high_score": z["p_clean"].values,
                    "corruption_effect": 0.0,
                    "denominator": den.values,
                    "zero_denominator": z["zero_denominator"].values,
                    "te": frac,
                    "restore_effect_max": (z["p_restored"] - z["p_clean"]).values,
                    "subj_effect": (z["p_clean"] - z["p_restored"]).values,
                    "subj_effect_fraction": frac,
                }
            )
        )
    if not parts:
        return pd.DataFrame(columns=keys + ["te"])
    out = pd.concat(parts, ignore_index=True)
    out["zero_denominator"] = out["zero_denominator"].astype(bool)
    flagged = out.loc[out["zero_denominator"], _GROUP].drop_duplicates()
    if len(flagged):
        log.warning(
            "%d (case, kind, window) groups have a zero denominator (corruption had no effect); te set to 0: %s",
            len(flagged), flagged["case_id"].tolist()[:20],
        )
    cols = keys + ["te", "subj_effect", "subj_effect_fraction", "restore_effect_max", "p_clean", "p_corrupt",
                   "high_score", "corruption_effect", "denominator", "zero_denominator"]
    return out[cols]


def zero_denominator_cases(eff: pd.DataFrame) -> pd.DataFrame:
    """The (case_id, kind, window) groups whose denominator is zero (te reported as 0 there)."""
    return eff.loc[eff["zero_denominator"], _GROUP].drop_duplicates().reset_index(drop=True)


def peak_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Peak site(s) per (case_id, kind, window): rows with restore_effect ≥ its max over all (t, l) **and** > 0
    (ties kept, so a case can have several rows; a case with no positive effect has none). Tracing kinds only.

    Columns: case_id, kind, window, layer, token_idx, restore_effect.
    """
    t = table[table["kind"] != "zero"]
    eff = t["p_restored"] - t["p_corrupt"]
    best = eff.groupby([t[k] for k in _GROUP], sort=False).transform("max")
    keep = (eff >= best) & (eff > 0)
    out = t.loc[keep, _GROUP + ["layer", "token_idx"]].copy()
    out["restore_effect"] = eff[keep]
    return out.reset_index(drop=True)


def concentrated(eff: pd.DataFrame, threshold: float = 0.5, max_others: int = 3) -> pd.DataFrame:
    """§4.4: per (case_id, kind, window), whether the per-layer curve ``te`` is concentrated: at most
    ``max_others`` layers besides the argmax reach ≥ ``threshold`` × the curve's maximum.

    Columns: case_id, kind, window, peak_layer (first argmax), te_max, n_above (layers besides the argmax at
    ≥ threshold × max), concentrated. A flat zero curve is not concentrated (every layer reaches 0).
    """
    rows = []
    for key, g in eff.sort_values("layer").groupby(_GROUP, sort=True):
        te = g["te"].to_numpy()
        i = int(np.argmax(te))
        n_above = int((te >= threshold * te[i]).sum()) - 1
        rows.append((*key, int(g["layer"].iloc[i]), float(te[i]), n_above, n_above <= max_others))
    return pd.DataFrame(rows, columns=_GROUP + ["peak_layer", "te_max", "n_above", "concentrated"])


def layer_thirds(peaks: pd.DataFrame, n_layer: int) -> pd.Series:
    """Share of peak rows in the first / middle / last third of the network (for prose numbers)."""
    third = pd.cut(peaks["layer"], bins=[-1, n_layer / 3 - 1e-9, 2 * n_layer / 3 - 1e-9, n_layer],
                   labels=["early", "middle", "late"])
    return third.value_counts(normalize=True).reindex(["early", "middle", "late"]).fillna(0.0)
