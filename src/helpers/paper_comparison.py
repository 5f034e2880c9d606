"""Our regression table side by side with the paper's (Tables 3-6, :mod:`helpers.paper`), problem and method
names normalised to the paper's keys."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from . import paper as paper_mod


PROBLEM_ALIASES: dict[str, str] = {
    "error_injection": "ei", "falsehood_injection": "ei", "tracing_reversal": "tr", "fact_erasure": "fe",
    "fact_amplification": "fa", "fact_forcing": "ff",
}
METHOD_ALIASES: dict[str, str] = {"ft-1": "ft1", "ft_1": "ft1", "ft-5": "ft5", "ft_5": "ft5"}


def _canon(s: pd.Series, aliases: dict[str, str]) -> pd.Series:
    def f(v: object) -> object:
        if not isinstance(v, str):
            return v
        k = v.strip().lower().replace(" ", "_")
        return aliases.get(k, k)

    return s.map(f)


def compare_with_paper(
    table: pd.DataFrame,
    paper_table: pd.DataFrame | None = None,
    on: Sequence[str] = ("problem", "method", "metric"),
    stats: Sequence[str] = ("r2_layer", "r2_trace", "r2_both", "diff", "p_value"),
    how: str = "left",
) -> pd.DataFrame:
    """Side-by-side table: for each stat, ``{stat}_ours`` and ``{stat}_paper``.

    ``paper_table`` defaults to :func:`helpers.paper.regression_tables` (Tables 3-6). Problem and
    method names are normalised to the paper's keys (e.g. "fact_forcing" -> "ff", "FT-5" -> "ft5").
    Where our table has bootstrap bounds ``{stat}_lo/_hi`` they are kept, and ``{stat}_paper_in_ci``
    says whether the paper's value lies inside our interval. ``p_paper_is_bound`` marks "<1e-4" cells.
    ``how``: merge type ("left" keeps every row of ours, "outer" also keeps paper-only cells).
    """
    paper_table = paper_mod.regression_tables() if paper_table is None else paper_table
    on = list(on)
    ours, theirs = table.copy(), paper_table.copy()
    for t in (ours, theirs):
        if "problem" in t.columns:
            t["problem"] = _canon(t["problem"], PROBLEM_ALIASES)
        if "method" in t.columns:
            t["method"] = _canon(t["method"], METHOD_ALIASES)
    stats = [s for s in stats if s in ours.columns or s in theirs.columns]
    keep_ours = on + [c for c in ours.columns if c in stats or c == "n"]
    keep_ours += [f"{s}_{b}" for s in stats for b in ("lo", "hi") if f"{s}_{b}" in ours.columns]
    keep_theirs = on + [c for c in theirs.columns if c in stats or c in ("n", "p_is_bound", "table", "note")]
    a = ours[keep_ours].rename(columns={s: f"{s}_ours" for s in [*stats, "n"]})
    b = theirs[keep_theirs].rename(columns={s: f"{s}_paper" for s in [*stats, "n"]})
    b = b.rename(columns={"p_is_bound": "p_paper_is_bound", "table": "paper_table", "note": "paper_note"})
    out = a.merge(b, on=on, how=how)
    cols = list(on)
    for s in stats:
        for c in (f"{s}_ours", f"{s}_lo", f"{s}_hi", f"{s}_paper"):
            if c in out.columns:
                cols.append(c)
        if f"{s}_lo" in out.columns and f"{s}_paper" in out.columns:
            lo, hi, pv = out[f"{s}_lo"], out[f"{s}_hi"], out[f"{s}_paper"]
            out[f"{s}_paper_in_ci"] = ((pv >= lo) & (pv <= hi)).where(pv.notna() & lo.notna())
            cols.append(f"{s}_paper_in_ci")
    cols += [c for c in ("p_paper_is_bound", "n_ours", "n_paper", "paper_table", "paper_note") if c in out.columns]
    return out[cols]
