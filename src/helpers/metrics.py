"""Edit-success metrics of the paper (SCIENCE.md §7), as pure numpy/pandas functions.

Every probability below is a (multi-token) sequence probability of the problem's ``target_new``;
``a`` is its value under the unedited model ("pre") and ``b`` under the edited model ("post").
All element-wise functions accept scalars, numpy arrays or pandas Series and broadcast; a NaN input
gives a NaN output (never an exception), so failed edits simply drop out of the analysis.

Score table schema (:func:`score_table`)
---------------------------------------
Input: one row per edit (problem, method, central layer, case_id ...). Columns used:

=====================  ===============  =====================================================
column                 type             meaning
=====================  ===============  =====================================================
rewrite_pre            float            p(target_new | prompt), unedited model
rewrite_post           float            same, edited model
paraphrase_pre         list[float]      one probability per paraphrase prompt (pre)
paraphrase_post        list[float]      same prompts, edited model (same length as ``_pre``)
neighborhood_pre       list[float]      one probability per neighborhood prompt (pre)
neighborhood_post      list[float]      same prompts, edited model
direction              str, optional    "raise" (EI/TR/FA/FF) or "lower" (FE); if the column is
                                        missing, the ``direction`` argument is used for all rows
essence_ppl_pre        float, optional  mean perplexity of the essence texts, unedited model
essence_ppl_post       float, optional  same texts, edited model
rewrite_base_post      float, optional  p(request_baseline | prompt), edited model (unscaled)
paraphrase_base_post   list, optional   p(request_baseline | paraphrase), edited model
neighborhood_base_post list, optional   p(request_baseline | neighbor prompt), edited model
=====================  ===============  =====================================================

Output: a copy of the input with these float columns added (all in [0, 1] except the ppl diff and
``magnitude``):

- ``rewrite``                       rewrite score (recovered or erased form, by direction)
- ``paraphrase``                    paraphrase score averaged over the paraphrase prompts (paper)
- ``paraphrase_first``              paraphrase score on the first paraphrase only (official code)
- ``neighborhood``                  neighborhood score averaged over neighbor prompts (paper)
- ``neighborhood_first``            neighborhood score on the first neighbor prompt (official code)
- ``essence_ppl_diff``              essence_ppl_post - essence_ppl_pre (NaN if the columns are absent)
- ``essence``                       Essence Score, 1 - clip(diff, 0, 5) / 5
- ``overall`` / ``overall_first``   mean(rewrite, paraphrase, neighborhood), paper / code variants
- ``overall_essence`` / ``overall_essence_first``   mean of the four scores incl. ``essence``
- when the ``*_base_post`` columns are present: ``magnitude`` (unscaled rewrite magnitude,
  p(new) - p(baseline) post edit, on the rewrite prompt), ``rewrite_success``,
  ``paraphrase_success``, ``neighborhood_success`` (ROME-style binary success fractions).

Conventions and edge cases (documented decisions):

- Rewrite ("recovered") score, a == 1: there is no headroom, so the formula is 0/0. We define it as
  1.0 when b >= a (the target stays certain: nothing was lost) and as the lower clamp 2e-8
  otherwise (the edit lowered a target it was asked to raise). Never NaN.
- Erasure score, a == 0: nothing to erase; defined as 0.0 (the clamp value of the formula).
- Paraphrase / neighborhood scores over an empty prompt list are NaN.
- Perplexity of a one-token text (no predicted tokens) is exp(0) = 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, Union

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ArrayLike = Union[float, np.ndarray, pd.Series, Sequence[float]]
Direction = Literal["raise", "lower"]

#: Lower clamp of the rewrite ("recovered") score in the official code.
RS_FLOOR: float = 2e-8
#: Essence Score saturates when the perplexity rises by this much.
ESSENCE_PPL_CAP: float = 5.0

DIRECTIONS: tuple[str, ...] = ("raise", "lower")


def _arr(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _wrap(out: np.ndarray, like: object) -> ArrayLike:
    """Return a float for scalar inputs, a Series (same index) for Series inputs, else an array."""
    if isinstance(like, pd.Series):
        return pd.Series(out, index=like.index)
    if np.ndim(out) == 0:
        return float(out)
    return out


# --------------------------------------------------------------------------- element-wise scores


def rewrite_score(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """"Recovered" score max(2e-8, (b - a) / (1 - a)) for problems that raise the target.

    ``a``, ``b``: pre- and post-edit probabilities (broadcastable). At a == 1 the result is 1.0 if
    b >= a else 2e-8 (see module docstring). NaN in, NaN out.
    """
    A, B = _arr(a), _arr(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = (B - A) / (1.0 - A)
    raw = np.where(A == 1.0, np.where(B >= A, 1.0, RS_FLOOR), raw)
    out = np.where(np.isnan(A) | np.isnan(B), np.nan, np.maximum(RS_FLOOR, raw))
    return _wrap(out, a if isinstance(a, pd.Series) else b)


def erasure_score(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """"Erased" score max(0, (a - b) / a): the fraction of the pre-edit probability removed (FE).

    At a == 0 the result is 0.0. NaN in, NaN out.
    """
    A, B = _arr(a), _arr(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = (A - B) / A
    raw = np.where(A == 0.0, 0.0, raw)
    out = np.where(np.isnan(A) | np.isnan(B), np.nan, np.maximum(0.0, raw))
    return _wrap(out, a if isinstance(a, pd.Series) else b)


def _check_direction(direction: object) -> np.ndarray:
    d = np.asarray(direction, dtype=object)
    bad = set(np.unique(d.astype(str)).tolist()) - set(DIRECTIONS)
    if bad:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {sorted(bad)}")
    return d.astype(str)


def score(a: ArrayLike, b: ArrayLike, direction: Union[Direction, Sequence[str], np.ndarray, pd.Series] = "raise") -> ArrayLike:
    """Rewrite-type score: :func:`rewrite_score` if direction == "raise", :func:`erasure_score` if "lower".

    ``direction`` may be one string or an array of strings broadcastable to ``a``/``b``.
    """
    d = _check_direction(direction)
    if d.ndim == 0:
        return rewrite_score(a, b) if d.item() == "raise" else erasure_score(a, b)
    r = np.asarray(rewrite_score(_arr(a), _arr(b)), dtype=float)
    e = np.asarray(erasure_score(_arr(a), _arr(b)), dtype=float)
    out = np.where(d == "lower", e, r)
    like = a if isinstance(a, pd.Series) else (b if isinstance(b, pd.Series) else direction)
    return _wrap(out, like)


def neighborhood_score(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """Neighborhood score 1 - |b - a| / (0.5 + |a - 0.5|) (1 = unchanged, 0 = maximal change).

    The denominator is the largest possible change from ``a`` (never below 0.5). NaN in, NaN out.
    """
    A, B = _arr(a), _arr(b)
    out = 1.0 - np.abs(B - A) / (0.5 + np.abs(A - 0.5))
    return _wrap(out, a if isinstance(a, pd.Series) else b)


# --------------------------------------------------------------------------- scores over prompt lists


def _ragged(lists: object) -> tuple[np.ndarray, np.ndarray]:
    """Flatten a sequence of 1-D lists into (values, lengths)."""
    items = [np.atleast_1d(np.asarray(x, dtype=float)) if x is not None else np.empty(0) for x in lists]
    lengths = np.array([len(x) for x in items], dtype=int)
    values = np.concatenate(items) if len(items) and lengths.sum() else np.empty(0)
    return values, lengths


def _reduce_lists(pre: object, post: object, fn, variant: str, extra: object = None) -> np.ndarray:
    """Apply element-wise ``fn(a, b[, extra])`` to ragged lists, then mean (or first) per row."""
    va, la = _ragged(pre)
    vb, lb = _ragged(post)
    if not np.array_equal(la, lb):
        raise ValueError("pre and post prompt lists differ in length")
    n = len(la)
    if extra is not None:
        e = np.repeat(np.broadcast_to(np.asarray(extra, dtype=object), (n,)), la)
        vals = np.asarray(fn(va, vb, e), dtype=float)
    else:
        vals = np.asarray(fn(va, vb), dtype=float)
    out = np.full(n, np.nan)
    nonempty = la > 0
    starts = np.concatenate([[0], np.cumsum(la)[:-1]]).astype(int)
    if variant == "first":
        out[nonempty] = vals[starts[nonempty]]
    elif variant == "mean":
        if nonempty.any():
            sums = np.add.reduceat(vals, starts[nonempty]) if len(vals) else np.empty(0)
            out[nonempty] = sums / la[nonempty]
    else:
        raise ValueError(f"variant must be 'mean' or 'first', got {variant!r}")
    return out


def _is_single_list(x: object) -> bool:
    """True when ``x`` is one list of probabilities (not a column of lists)."""
    if isinstance(x, pd.Series):
        return False
    arr = np.asarray(x, dtype=object)
    return arr.ndim == 1 and all(np.ndim(v) == 0 for v in arr)


def paraphrase_score(
    pre: object, post: object, direction: Union[Direction, Sequence[str]] = "raise", variant: Literal["mean", "first"] = "mean"
) -> ArrayLike:
    """Paraphrase score: the rewrite-type :func:`score` on each paraphrase prompt, then reduced.

    ``pre``/``post``: one list of probabilities (one per paraphrase prompt) -> float, or a column
    (Series / list) of such lists -> one value per row. ``variant="mean"`` averages over the
    paraphrases (paper); ``"first"`` uses only the first paraphrase (official code). Empty list -> NaN.
    """
    if _is_single_list(pre):
        if np.ndim(direction) != 0:
            raise ValueError("a single prompt list needs a single direction string")
        return float(_reduce_lists([pre], [post], score, variant, extra=direction)[0])
    out = _reduce_lists(list(pre), list(post), score, variant, extra=direction)
    return _wrap(out, pre) if isinstance(pre, pd.Series) else out


def paraphrase_score_first(pre: object, post: object, direction: Union[Direction, Sequence[str]] = "raise") -> ArrayLike:
    """Paraphrase score on the first paraphrase prompt only (the official code's ``[0]``)."""
    return paraphrase_score(pre, post, direction, variant="first")


def neighborhood_score_lists(pre: object, post: object, variant: Literal["mean", "first"] = "mean") -> ArrayLike:
    """Neighborhood score over a list of neighbor prompts: mean (paper) or first prompt only (code).

    Same input conventions as :func:`paraphrase_score`.
    """
    if _is_single_list(pre):
        return float(_reduce_lists([pre], [post], neighborhood_score, variant)[0])
    out = _reduce_lists(list(pre), list(post), neighborhood_score, variant)
    return _wrap(out, pre) if isinstance(pre, pd.Series) else out


def neighborhood_score_mean(pre: object, post: object) -> ArrayLike:
    """Neighborhood score averaged over the neighbor prompts (paper)."""
    return neighborhood_score_lists(pre, post, "mean")


def neighborhood_score_first(pre: object, post: object) -> ArrayLike:
    """Neighborhood score on the first neighbor prompt only (official code)."""
    return neighborhood_score_lists(pre, post, "first")


# --------------------------------------------------------------------------- aggregates


def overall_score(rs: ArrayLike, ps: ArrayLike, ns: ArrayLike) -> ArrayLike:
    """Overall Score (Table 6): arithmetic mean of rewrite, paraphrase and neighborhood scores."""
    out = (_arr(rs) + _arr(ps) + _arr(ns)) / 3.0
    return _wrap(out, rs)


def overall_with_essence(rs: ArrayLike, ps: ArrayLike, ns: ArrayLike, es: ArrayLike) -> ArrayLike:
    """Overall Score with essence (Fig. 9 right): mean of RS, PS, NS and the Essence Score."""
    out = (_arr(rs) + _arr(ps) + _arr(ns) + _arr(es)) / 4.0
    return _wrap(out, rs)


def perplexity(token_logprobs: ArrayLike, n_tokens: int | None = None) -> float:
    """Perplexity exactly as the official code: exp(-(1/N) * sum_{i=2..N} log p(x_i | x_<i)).

    ``token_logprobs``: natural-log probabilities of tokens 2..N given their prefixes (length N-1,
    i.e. what a causal LM yields for ``ids[1:]`` from ``logits[:-1]``). ``n_tokens`` = N, the text
    length in tokens after truncation; default ``len(token_logprobs) + 1``. Note the division by N,
    not N - 1 (the official code's choice). A one-token text has perplexity 1.
    """
    lp = np.asarray(token_logprobs, dtype=float).ravel()
    n = len(lp) + 1 if n_tokens is None else int(n_tokens)
    if n < len(lp) + 1:
        raise ValueError(f"n_tokens={n} but {len(lp)} log-probs given (need n_tokens >= len + 1)")
    return float(np.exp(-lp.sum() / n))


def essence_ppl(texts_logprobs: Sequence[ArrayLike]) -> float:
    """Mean perplexity over the essence texts (each given as its per-token log-probs, see :func:`perplexity`)."""
    if len(texts_logprobs) == 0:
        return float("nan")
    return float(np.mean([perplexity(lp) for lp in texts_logprobs]))


def essence_score(ppl_pre: ArrayLike, ppl_post: ArrayLike) -> ArrayLike:
    """Essence Score 1 - clip(ppl_post - ppl_pre, 0, 5) / 5: 1 if perplexity did not rise, 0 if it rose >= 5."""
    diff = _arr(ppl_post) - _arr(ppl_pre)
    out = 1.0 - np.clip(diff, 0.0, ESSENCE_PPL_CAP) / ESSENCE_PPL_CAP
    return _wrap(out, ppl_pre if isinstance(ppl_pre, pd.Series) else ppl_post)


# --------------------------------------------------------------------------- unscaled (ROME-paper) metrics


def rewrite_magnitude(p_new_post: ArrayLike, p_base_post: ArrayLike) -> ArrayLike:
    """Unscaled rewrite magnitude p*(target_new) - p*(request_baseline), both post-edit (in [-1, 1])."""
    out = _arr(p_new_post) - _arr(p_base_post)
    return _wrap(out, p_new_post)


def success_fraction(p_new: object, p_base: object, neighborhood: bool = False) -> ArrayLike:
    """ROME-style binary success: fraction of prompts with p(target_new) > p(request_baseline).

    For ``neighborhood=True`` the comparison is reversed (the neighbor should keep its baseline).
    ``p_new``/``p_base``: one list of per-prompt probabilities -> float, or a column of such lists ->
    one value per row. A scalar pair counts as a list of one prompt.
    """
    cmp = (lambda x, y: (y > x).astype(float)) if neighborhood else (lambda x, y: (x > y).astype(float))

    def fn(x, y):
        out = cmp(x, y)
        return np.where(np.isnan(x) | np.isnan(y), np.nan, out)

    if np.isscalar(p_new) or (isinstance(p_new, np.ndarray) and p_new.ndim == 0):
        return float(fn(np.asarray([p_new], float), np.asarray([p_base], float))[0])
    if _is_single_list(p_new):
        return float(_reduce_lists([p_new], [p_base], fn, "mean")[0])
    out = _reduce_lists(list(p_new), list(p_base), fn, "mean")
    return _wrap(out, p_new) if isinstance(p_new, pd.Series) else out


# --------------------------------------------------------------------------- table


SCORE_COLUMNS: tuple[str, ...] = (
    "rewrite",
    "paraphrase",
    "paraphrase_first",
    "neighborhood",
    "neighborhood_first",
    "essence_ppl_diff",
    "essence",
    "overall",
    "overall_first",
    "overall_essence",
    "overall_essence_first",
)
UNSCALED_COLUMNS: tuple[str, ...] = ("magnitude", "rewrite_success", "paraphrase_success", "neighborhood_success")


def score_table(df: pd.DataFrame, direction: Direction = "raise") -> pd.DataFrame:
    """Add the score columns of the module docstring to a table of pre/post probabilities.

    Returns a new DataFrame (same index, all input columns kept). ``direction`` is used only when
    the table has no ``direction`` column. Missing essence columns give NaN essence scores.
    """
    required = ["rewrite_pre", "rewrite_post", "paraphrase_pre", "paraphrase_post", "neighborhood_pre", "neighborhood_post"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise KeyError(f"score_table: missing columns {missing}")
    out = df.copy()
    d = df["direction"].to_numpy() if "direction" in df.columns else direction
    _check_direction(d)

    out["rewrite"] = np.asarray(score(df["rewrite_pre"].to_numpy(float), df["rewrite_post"].to_numpy(float), d), float)
    pp, pq = list(df["paraphrase_pre"]), list(df["paraphrase_post"])
    out["paraphrase"] = _reduce_lists(pp, pq, score, "mean", extra=d)
    out["paraphrase_first"] = _reduce_lists(pp, pq, score, "first", extra=d)
    npre, npost = list(df["neighborhood_pre"]), list(df["neighborhood_post"])
    out["neighborhood"] = _reduce_lists(npre, npost, neighborhood_score, "mean")
    out["neighborhood_first"] = _reduce_lists(npre, npost, neighborhood_score, "first")

    if {"essence_ppl_pre", "essence_ppl_post"} <= set(df.columns):
        e_pre, e_post = df["essence_ppl_pre"].to_numpy(float), df["essence_ppl_post"].to_numpy(float)
        out["essence_ppl_diff"] = e_post - e_pre
        out["essence"] = np.asarray(essence_score(e_pre, e_post), float)
    else:
        out["essence_ppl_diff"] = np.nan
        out["essence"] = np.nan

    rs = out["rewrite"].to_numpy(float)
    es = out["essence"].to_numpy(float)
    for suffix, ps_col, ns_col in (("", "paraphrase", "neighborhood"), ("_first", "paraphrase_first", "neighborhood_first")):
        ps, ns = out[ps_col].to_numpy(float), out[ns_col].to_numpy(float)
        out["overall" + suffix] = np.asarray(overall_score(rs, ps, ns), float)
        out["overall_essence" + suffix] = np.asarray(overall_with_essence(rs, ps, ns, es), float)

    if "rewrite_base_post" in df.columns:
        out["magnitude"] = np.asarray(
            rewrite_magnitude(df["rewrite_post"].to_numpy(float), df["rewrite_base_post"].to_numpy(float)), float
        )
        out["rewrite_success"] = np.asarray(
            success_fraction(
                [[x] for x in df["rewrite_post"].to_numpy(float)], [[x] for x in df["rewrite_base_post"].to_numpy(float)]
            ),
            float,
        )
    if "paraphrase_base_post" in df.columns:
        out["paraphrase_success"] = np.asarray(success_fraction(pq, list(df["paraphrase_base_post"])), float)
    if "neighborhood_base_post" in df.columns:
        out["neighborhood_success"] = np.asarray(
            success_fraction(npost, list(df["neighborhood_base_post"]), neighborhood=True), float
        )
    n_nan = int(out["rewrite"].isna().sum())
    if n_nan:
        log.info("score_table: %d of %d rows have a NaN rewrite score (NaN input probabilities)", n_nan, len(out))
    return out
