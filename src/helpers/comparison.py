"""The chapters that compare studies: each study's tables in one object, side-by-side tables with 95% intervals
beside the paper's GPT-J numbers, and the sentences that say where a study agrees with the paper.

A book of several studies (a profile with ``studies``) runs tracing and editing once per study; chapters 04-07
read every study's tables through :func:`load_tables` and show them side by side. Sentences comparing a study
with the paper are generated here from the numbers (and unit-tested), so the prose cannot disagree with the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import analysis, paper, sweep, tables
from .study import Study, effects_of

log = logging.getLogger(__name__)

PAPER_LABEL = "GPT-J (paper)"
#: A gain in R² from adding tracing to layer below this reads as "tracing adds little" (the paper's largest
#: gain over all 20 cells is 0.032, Fact Forcing with FT-5).
SMALL_GAIN = 0.05
#: Table 1's quantities: (column of :func:`helpers.analysis.regression_table`, row label).
TABLE1_ROWS = (("r2_layer", "R² layer"), ("r2_trace", "R² tracing"), ("r2_both", "R² both"), ("diff", "added by tracing"))


@dataclass
class StudyTables:
    """One study's tables as the comparing chapters use them (the study's model is not loaded).

    ``eff``: per (case_id, layer) tracing effects at the study's analysis window (MLP); ``edits``: every edit
    row of its sweep; ``joined``: edits with the tracing effect at the edit's central layer."""

    name: str
    study: Study
    window: int
    n_boot: int
    eff: pd.DataFrame
    edits: pd.DataFrame
    joined: pd.DataFrame

    @property
    def label(self) -> str:
        return self.study.label

    @property
    def results(self) -> Path:
        return self.study.results

    def cell(self, method: str, problem: str) -> pd.DataFrame:
        """The joined rows of one (method, problem) cell (empty when the study did not run it)."""
        j = self.joined
        return j[(j["method"] == method) & (j["problem"] == problem)]

    @property
    def problems(self) -> list[str]:
        return [p for p in paper.PROBLEMS if p in set(self.joined["problem"])]


def load_tables(studies: dict[str, Study]) -> dict[str, StudyTables]:
    """Every study's tracing effects and edits, by study name (the book's order)."""
    out = {}
    for name, st in studies.items():
        window = int(st.profile.analysis.get("window", 5))
        eff = effects_of(st, window=window)
        edits = sweep.load_edits(st.results)
        out[name] = StudyTables(name, st, window, int(st.profile.analysis.get("n_boot", 200)), eff, edits,
                                analysis.join_effects(edits, eff))
    return out


def ci_text(value: float, lo: float, hi: float, digits: int = 3) -> str:
    """``"0.947 [0.930, 0.960]"``; ``"–"`` for a value that could not be computed; the interval is left out
    when it is missing."""
    if value is None or not np.isfinite(value):
        return "–"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def p_text(p: float) -> str:
    """An F-test p-value as the chapters print it: ``"< 1e-4"`` below 1e-4, else two significant digits."""
    if p is None or not np.isfinite(p):
        return "–"
    return "< 1e-4" if p < 1e-4 else f"{p:.2g}"


def regression_row(joined: pd.DataFrame, metric: str = "rewrite", n_boot: int = 0, seed: int = 0) -> pd.Series:
    """The three regressions (layer, tracing, both) of one cell's rows with bootstrap intervals over facts
    (:func:`helpers.analysis.regression_table` without grouping); NaN statistics when the cell is empty."""
    if joined.empty:
        return pd.Series({k: np.nan for k, _ in TABLE1_ROWS} | {"p_value": np.nan, "n": 0, "n_facts": 0, "n_layers": 0})
    return analysis.regression_table(joined, by=[], metrics=[metric], n_boot=n_boot, seed=seed).iloc[0]


def table1_side_by_side(rows: dict[str, pd.Series], paper_row: pd.Series | None = None) -> pd.DataFrame:
    """Table 1 as printed: one row per quantity (R² layer, tracing, both, added by tracing, F-test p, n), the
    paper's column first, then one column per study (label -> :func:`regression_row`) with its 95% interval."""
    index = [label for _, label in TABLE1_ROWS] + ["F-test p (both vs layer)", "edits (facts × layers)"]
    cols = {}
    if paper_row is not None:
        cols[PAPER_LABEL] = [f"{paper_row[k]:.3f}" for k, _ in TABLE1_ROWS] + [
            p_text(paper_row.get("p_value", np.nan)), f"{int(paper_row['n'])} × {paper.N_EDIT_LAYERS}"]
    for label, r in rows.items():
        cells = [ci_text(r[k], r.get(f"{k}_lo", np.nan), r.get(f"{k}_hi", np.nan)) for k, _ in TABLE1_ROWS]
        n = f"{int(r['n_facts'])} × {int(r['n_layers'])}" if int(r.get("n", 0) or 0) else "–"
        cols[label] = cells + [p_text(r["p_value"]), n]
    return pd.DataFrame(cols, index=index)


def tidy_regressions(rows: dict[str, pd.Series]) -> pd.DataFrame:
    """The same numbers as a tidy table (one row per study × quantity: value, lo, hi) for the CSV."""
    out = []
    for label, r in rows.items():
        for k, _ in TABLE1_ROWS:
            out.append({"study": label, "quantity": k, "value": r[k], "lo": r.get(f"{k}_lo", np.nan),
                        "hi": r.get(f"{k}_hi", np.nan)})
        out.append({"study": label, "quantity": "p_value", "value": r["p_value"], "lo": np.nan, "hi": np.nan})
    return pd.DataFrame(out)


def gain_verdict(diff: float, hi: float, paper_diff: float) -> str:
    """Whether a study's gain in R² from adding tracing agrees with the paper's, in words.

    The paper's conclusion holds when the gain is small (below :data:`SMALL_GAIN`); where the interval is known
    and reaches past it, the data cannot rule a larger gain out."""
    if diff is None or not np.isfinite(diff):
        return "the gain cannot be estimated here (the regressions are degenerate: too few facts or constant scores)"
    if diff < SMALL_GAIN:
        if hi is not None and np.isfinite(hi) and hi >= SMALL_GAIN:
            return (f"small, as in the paper (+{paper_diff:.3f}), though the interval reaches {hi:.3f}: "
                    "too few facts to rule out a larger gain")
        return f"small, as in the paper (+{paper_diff:.3f}): tracing adds almost nothing to the layer"
    return (f"larger than the paper's +{paper_diff:.3f}: here the tracing effect does carry information about "
            "edit success beyond the layer")


def table1_sentence(label: str, r: pd.Series, paper_row: pd.Series) -> str:
    """One sentence per study: its Table 1 numbers against GPT-J's, with the verdict of :func:`gain_verdict`."""
    if not int(r.get("n", 0) or 0):
        return f"{label}: this study did not run ROME on Error Injection."
    if not (np.isfinite(r["r2_layer"]) and np.isfinite(r["r2_trace"])):
        which = "the fits are degenerate"
    elif r["r2_layer"] >= r["r2_trace"]:
        which = "the layer explains far more than tracing, as in GPT-J"
    else:
        which = "unlike in GPT-J, tracing alone explains at least as much as the layer"
    return (f"{label}: R² {r['r2_layer']:.3f} (layer), {r['r2_trace']:.3f} (tracing), {r['r2_both']:.3f} (both) "
            f"against GPT-J's {paper_row['r2_layer']:.3f} / {paper_row['r2_trace']:.3f} / {paper_row['r2_both']:.3f}; "
            f"{which}. Adding tracing gains {ci_text(r['diff'], r.get('diff_lo', np.nan), r.get('diff_hi', np.nan))} "
            f"(F-test p {p_text(r['p_value'])}): {gain_verdict(r['diff'], r.get('diff_hi', np.nan), paper_row['diff'])}.")


def cells_side_by_side(regs: dict[str, pd.DataFrame], metric: str = "rewrite",
                       paper_table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tables 3-6 for several studies: one row per (problem, method) cell that some study ran, the paper's
    R² layer / tracing / added first, then per study (label -> its :func:`helpers.analysis.regression_table`) the
    same with the added R²'s 95% interval and the F-test p. Cells a study did not run are left empty ("")."""
    paper_table = paper.regression_tables() if paper_table is None else paper_table
    key = ["problem", "method"]
    ran = pd.concat([r[r["metric"] == metric][key] for r in regs.values()], ignore_index=True).drop_duplicates()
    order = {p: i for i, p in enumerate(paper.PROBLEMS)} | {m: i for i, m in enumerate(paper.METHODS)}
    ran = ran.sort_values(key, key=lambda c: c.map(order)).reset_index(drop=True)
    pt = paper_table[paper_table["metric"] == metric].set_index(key)
    cols: dict[tuple[str, str], list[str]] = {}
    for prob, meth in ran.itertuples(index=False):
        pr = pt.loc[(prob, meth)] if (prob, meth) in pt.index else None
        for q, k in (("R² layer", "r2_layer"), ("R² tracing", "r2_trace"), ("added", "diff")):
            cols.setdefault((PAPER_LABEL, q), []).append("–" if pr is None else f"{pr[k]:.3f}")
        for label, reg in regs.items():
            r = reg[(reg["metric"] == metric) & (reg["problem"] == prob) & (reg["method"] == meth)]
            r = r.iloc[0] if len(r) else None
            cells = (["", "", "", ""] if r is None else  # the study did not run this cell
                     [ci_text(r["r2_layer"], np.nan, np.nan), ci_text(r["r2_trace"], np.nan, np.nan),
                      ci_text(r["diff"], r.get("diff_lo", np.nan), r.get("diff_hi", np.nan)), p_text(r["p_value"])])
            for q, v in zip(("R² layer", "R² tracing", "added [95% CI]", "F-test p"), cells):
                cols.setdefault((label, q), []).append(v)
    index = pd.MultiIndex.from_tuples([(paper.PROBLEMS[p], paper.METHODS[m]) for p, m in ran.itertuples(index=False)],
                                      names=["problem", "method"])
    return pd.DataFrame(cols, index=index)


#: Cells smaller than this do not take part in the largest gain (:func:`largest_gain`) while a larger cell exists.
#: With a few facts the tracing effect, one value per fact and layer, can stand in for the fact itself and fit
#: the fact-to-fact spread of edit success: in the book ``complete`` (session 27), SmolLM2's FT-5 × Error
#: Injection cell of 10 facts × 2 layers gained 0.866 R², MEMIT's 10 × 3 0.612, while every cell of 20 or more
#: facts over 5-6 layers gained at most 0.114. A judgement call of this project, not the paper's (its cells
#: hold 652 facts).
MIN_FACTS_FOR_MAX = 20
MIN_LAYERS_FOR_MAX = 3


def sized_for_max(reg: pd.DataFrame) -> pd.Series:
    """Per row, whether its cell has at least :data:`MIN_FACTS_FOR_MAX` facts and :data:`MIN_LAYERS_FOR_MAX`
    layers (True where the table does not record its sizes)."""
    ok = pd.Series(True, index=reg.index)
    if "n_facts" in reg:
        ok &= reg["n_facts"].fillna(0) >= MIN_FACTS_FOR_MAX
    if "n_layers" in reg:
        ok &= reg["n_layers"].fillna(0) >= MIN_LAYERS_FOR_MAX
    return ok


def _fitted(reg: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of ``metric`` whose gain could be fitted (no degenerate fit)."""
    return reg[reg["metric"] == metric].dropna(subset=["diff"])


def largest_gain(reg: pd.DataFrame, metric: str = "rewrite") -> pd.Series | None:
    """The (problem, method) row of a regression table where adding tracing gains most R², among the cells
    :func:`sized_for_max` (all cells when none is; None when every fit is degenerate)."""
    valid = _fitted(reg, metric)
    sized = valid[sized_for_max(valid)]
    if not sized.empty:
        valid = sized
    return None if valid.empty else valid.loc[valid["diff"].idxmax()]


def small_cells_note(reg: pd.DataFrame, metric: str = "rewrite") -> str:
    """A sentence on the cells :func:`largest_gain` left out (their count and largest gain), or on every cell
    being small (the maximum then over all of them); "" when every cell is sized."""
    valid = _fitted(reg, metric)
    sized = sized_for_max(valid)
    small = valid[~sized]
    if small.empty:
        return ""
    limits = f"fewer than {MIN_FACTS_FOR_MAX} facts or {MIN_LAYERS_FOR_MAX} layers"
    why = "with so few facts the tracing effect, one value per fact and layer, can fit each fact's own success"
    if not sized.any():
        return (f"Every cell here has {limits}, so this maximum is over all of them; {why}, so the gain may be "
                "inflated: a larger profile settles it.")
    big = small.loc[small["diff"].idxmax()]
    return (f"{len(small)} smaller cell(s), of {limits}, are left out of this maximum: {why} (the largest of them: "
            f"{big['diff']:.3f} for {cell_name(big.problem, big.method)}, {int(big['n_facts'])} facts × "
            f"{int(big['n_layers'])} layers).")


def cell_name(problem: str, method: str) -> str:
    """``"Fact Forcing with FT-5"``."""
    return f"{paper.PROBLEMS.get(problem, problem)} with {paper.METHODS.get(method, method)}"


def meaning_sentence(label: str, n_params: int, r: pd.Series) -> str:
    """What a study's Table 1 means for the paper's conclusion, given the model's size against GPT-J's."""
    size = (f"a model {paper.GPT_J_PARAMS / n_params:.0f} times smaller than GPT-J" if n_params < paper.GPT_J_PARAMS
            else "this model")
    diff, hi = r.get("diff", np.nan), r.get("diff_hi", np.nan)
    if not np.isfinite(diff):
        return f"For {label} the regressions are degenerate, so this run says nothing either way about {size}."
    if diff < SMALL_GAIN and not (np.isfinite(hi) and hi >= SMALL_GAIN):
        return (f"So on {size} the paper's conclusion holds: knowing where tracing localizes a fact adds almost "
                "nothing to knowing the edit layer.")
    if diff < SMALL_GAIN:
        return (f"So on {size} the estimate agrees with the paper's conclusion, but the interval is too wide to "
                "exclude a modest gain: more facts would settle it.")
    return (f"So on {size} the paper's conclusion does not carry over as it stands: tracing adds {diff:.3f} R² "
            "beyond the layer. Smaller models, 4-bit weights and different facts are candidate reasons (see the "
            "discussion).")


def last_subject_share(study: Study, window: int) -> float:
    """Share of the mean corrupted-to-clean gap that restoring the MLP outputs at the last subject token
    recovers (the paper's denominator; :func:`~helpers.tracing_effects.last_subject_by_layer`), at the best
    central layer (window ``window``)."""
    from .tracing_effects import last_subject_by_layer

    return float(last_subject_by_layer(tables.read_table(study.results / "tracing.parquet"), window).max())


def panels(n: int, width: float = 5.5, height: float = 3.8):
    """A row of ``n`` axes (one per study), as (fig, list of axes)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, folder: Path, name: str):
    """Save a chapter's figure as PNG and SVG into ``folder``; return it, closed, to be shown once."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    tables.save_figure(fig, folder / f"{name}.png", dpi=130, bbox_inches="tight")
    tables.save_figure(fig, folder / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    return fig
