"""The paper's published numbers (SCIENCE.md §8.3) as data, for side-by-side comparison with our runs.

Keys: problems ``"ei"`` (Error Injection), ``"tr"`` (Tracing Reversal), ``"fe"`` (Fact Erasure),
``"fa"`` (Fact Amplification), ``"ff"`` (Fact Forcing); methods ``"ft1"``, ``"ft5"``, ``"rome"``,
``"memit"``; metrics ``"rewrite"``, ``"paraphrase"``, ``"neighborhood"``, ``"overall"`` (the same
names as :mod:`helpers.metrics` score columns and :func:`helpers.analysis.regression_table`).

Regression-table schema (Tables 1-6, one row per (problem, method, metric)):

- ``table``: "1" .. "6"; ``problem``, ``method``, ``metric``: keys above
- ``r2_layer``, ``r2_trace``, ``r2_both``, ``diff``: floats as printed (``diff`` = both - layer)
- ``p_value``: float F-test p of Both vs Layer; **"<1e-4" is stored as 1e-4 with
  ``p_is_bound = True``** (the printed value is an upper bound); NaN where the paper gives none
- ``p_is_bound``: bool, True when ``p_value`` is an upper bound
- ``n``: number of facts (652; 489 for Fact Erasure; 74 for Table 2), as stated in the paper
- ``note``: free text, empty if none

Layers in the headline numbers are given both 1-indexed (paper) and 0-indexed (code).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PROBLEMS: dict[str, str] = {
    "ei": "Error Injection",
    "tr": "Tracing Reversal",
    "fe": "Fact Erasure",
    "fa": "Fact Amplification",
    "ff": "Fact Forcing",
}
METHODS: dict[str, str] = {"ft1": "FT-1", "ft5": "FT-5", "rome": "ROME", "memit": "MEMIT"}
METRICS: tuple[str, ...] = ("rewrite", "paraphrase", "neighborhood", "overall")

#: Facts in the main analysis, in the Fact Erasure subset (p(o_true) > .02), and "concentrated" (Table 2).
N_POINTS: int = 652
N_FACT_ERASURE: int = 489
N_CONCENTRATED: int = 74
#: GPT-J's parameter count (GPT-J-6B: 6.05 billion), for "a model N times smaller than GPT-J".
GPT_J_PARAMS: float = 6.05e9
#: GPT-J's central layers edited per fact (0-idx {0, 4, 8, 12, 16, 20, 24, 27} plus {5}, SCIENCE.md §5).
N_EDIT_LAYERS: int = 9

REGRESSION_COLUMNS: tuple[str, ...] = (
    "table", "problem", "method", "metric", "r2_layer", "r2_trace", "r2_both", "diff", "p_value", "p_is_bound", "n", "note",
)

# Cells "layer/trace/both/diff/p" in method order ft1, ft5, rome, memit (SCIENCE.md §8.3).
_TABLE3 = {
    "ei": (".756/.062/.758/.002/<1e-4", ".775/.055/.777/.002/<1e-4", ".947/.016/.948/.001/<1e-4", ".677/.024/.678/.001/.199"),
    "tr": (".067/0/.067/0/.997", ".751/.045/.752/.001/.032", ".294/.017/.31/.015/<1e-4", ".212/.036/.218/.006/<1e-4"),
    "fe": (".643/.028/.646/.003/<1e-4", ".698/.025/.70/.002/<1e-4", ".857/.019/.858/0/.555", ".925/.019/.925/0/.669"),
    "fa": (".383/.014/.393/.01/<1e-4", ".424/.01/.436/.011/<1e-4", ".88/.02/.88/0/.654", ".905/.018/.906/.001/<1e-4"),
    "ff": (".697/.104/.724/.027/<1e-4", ".634/.10/.666/.032/<1e-4", ".422/.004/.425/.003/<1e-4", ".345/.041/.354/.009/<1e-4"),
}
_TABLE6 = {
    "ei": (".642/.054/.643/.002/.001", ".663/.047/.665/.002/.001", ".62/.003/.629/.009/<1e-4", ".525/.008/.534/.009/<1e-4"),
    "tr": (".294/.025/.296/.002/.054", ".751/.045/.752/.001/.032", ".296/.016/.31/.014/<1e-4", ".21/.036/.216/.006/<1e-4"),
    "fe": (".28/.007/.283/.004/.008", ".119/0/.124/.004/.015", ".718/.023/.718/0/.729", ".794/.025/.794/0/.555"),
    "fa": (".188/.003/.199/.011/<1e-4", ".224/.002/.236/.013/<1e-4", ".583/.005/.59/.007/<1e-4", ".597/.005/.607/.01/<1e-4"),
    "ff": (".487/.056/.5/.013/<1e-4", ".459/.057/.475/.017/<1e-4", ".285/.004/.291/.006/<1e-4", ".226/.017/.227/.001/.419"),
}
# Readable cells only (the source extraction of Tables 4 and 5 is partly garbled).
_TABLE4 = {
    ("ei", "rome"): ".279/.001/.303/.024/<1e-4",
    ("ei", "memit"): ".246/0/.269/.023/<1e-4",
    ("fa", "rome"): ".24/.002/.267/.027/<1e-4",
    ("fe", "rome"): ".537/.012/.539/.001/.218",
    ("fe", "memit"): ".586/.015/.587/.001/.184",
}
_TABLE5 = {
    ("ei", "ft1"): ".005/0/.008/.002/.197",
    ("ei", "rome"): ".011/.003/.015/.005/.001",
}
_NOTE_TABLE6_TR_FT5 = "identical to Table 3's TR FT-5 row; probably a transcription artifact in the paper"


def parse_p(text: str) -> tuple[float, bool]:
    """Parse a printed p-value: "<1e-4" -> (1e-4, True); ".032" -> (0.032, False)."""
    t = text.strip()
    if t.startswith("<"):
        return float(t[1:]), True
    return float(t), False


def _parse_cell(cell: str) -> dict[str, object]:
    layer, trace, both, diff, p = cell.split("/")
    p_value, bound = parse_p(p)
    return {
        "r2_layer": float(layer),
        "r2_trace": float(trace),
        "r2_both": float(both),
        "diff": float(diff),
        "p_value": p_value,
        "p_is_bound": bound,
    }


def _n(problem: str) -> int:
    return N_FACT_ERASURE if problem == "fe" else N_POINTS


def _grid(table: str, cells: dict, metric: str) -> pd.DataFrame:
    rows = []
    for problem, row in cells.items():
        for method, cell in zip(METHODS, row):
            note = _NOTE_TABLE6_TR_FT5 if (table == "6" and problem == "tr" and method == "ft5") else ""
            rows.append({"table": table, "problem": problem, "method": method, "metric": metric,
                         **_parse_cell(cell), "n": _n(problem), "note": note})
    return pd.DataFrame(rows, columns=list(REGRESSION_COLUMNS))


def _partial(table: str, cells: dict, metric: str) -> pd.DataFrame:
    rows = [{"table": table, "problem": pr, "method": me, "metric": metric, **_parse_cell(c), "n": _n(pr),
             "note": "readable cell of a partly garbled table"} for (pr, me), c in cells.items()]
    return pd.DataFrame(rows, columns=list(REGRESSION_COLUMNS))


def table1() -> pd.DataFrame:
    """Table 1: ROME, Error Injection, rewrite score, n = 652 (no p-value printed)."""
    row = {"table": "1", "problem": "ei", "method": "rome", "metric": "rewrite", "r2_layer": 0.947, "r2_trace": 0.016,
           "r2_both": 0.948, "diff": 0.001, "p_value": np.nan, "p_is_bound": False, "n": N_POINTS, "note": ""}
    return pd.DataFrame([row], columns=list(REGRESSION_COLUMNS))


def table2() -> pd.DataFrame:
    """Table 2: as Table 1 on the 74 "concentrated" facts (SCIENCE.md §4.4)."""
    row = {"table": "2", "problem": "ei", "method": "rome", "metric": "rewrite", "r2_layer": 0.927, "r2_trace": 0.02,
           "r2_both": 0.929, "diff": 0.002, "p_value": np.nan, "p_is_bound": False, "n": N_CONCENTRATED,
           "note": "concentrated subset"}
    return pd.DataFrame([row], columns=list(REGRESSION_COLUMNS))


def table3() -> pd.DataFrame:
    """Table 3: rewrite score, full 5 problems x 4 methods grid."""
    return _grid("3", _TABLE3, "rewrite")


def table4() -> pd.DataFrame:
    """Table 4 (paraphrase score): the readable cells only."""
    return _partial("4", _TABLE4, "paraphrase")


def table5() -> pd.DataFrame:
    """Table 5 (neighborhood score): the readable cells only."""
    return _partial("5", _TABLE5, "neighborhood")


def table6() -> pd.DataFrame:
    """Table 6: overall score (mean of RS, PS, NS), full 5 x 4 grid."""
    return _grid("6", _TABLE6, "overall")


def regression_tables() -> pd.DataFrame:
    """Tables 3-6 stacked (one row per (problem, method, metric)); the input to ``compare_with_paper``."""
    return pd.concat([table3(), table4(), table5(), table6()], ignore_index=True)


def wide(table: pd.DataFrame, value: str = "diff") -> pd.DataFrame:
    """Pivot a regression table to the paper's layout: problems as rows, methods as columns."""
    out = table.pivot(index="problem", columns="method", values=value)
    return out.reindex(index=[p for p in PROBLEMS if p in out.index], columns=[m for m in METHODS if m in out.columns])


TABLE78_COLUMNS: tuple[str, ...] = (
    "table", "dataset", "method", "problem", "metric",
    "r2_layer", "r2_trace", "rmse_layer", "rmse_trace", "mae_layer", "mae_trace",
)


def table7() -> pd.DataFrame:
    """Table 7: CounterFact, ROME, Error Injection: R², RMSE, MAE of the Layer and Trace models."""
    rows = [
        ("7", "counterfact", "rome", "ei", "rewrite", 0.947, 0.016, 0.073, 0.315, 0.02, 0.206),
        ("7", "counterfact", "rome", "ei", "overall", 0.618, 0.003, 0.133, 0.216, 0.11, 0.183),
    ]
    return pd.DataFrame(rows, columns=list(TABLE78_COLUMNS))


def table8() -> pd.DataFrame:
    """Table 8: zsRE, ROME: R², RMSE, MAE of the Layer and Trace models."""
    rows = [
        ("8", "zsre", "rome", "ei", "rewrite", 0.795, 0.042, 0.158, 0.341, 0.072, 0.254),
        ("8", "zsre", "rome", "ei", "overall", 0.654, 0.059, 0.136, 0.223, 0.097, 0.188),
    ]
    return pd.DataFrame(rows, columns=list(TABLE78_COLUMNS))


#: Headline scalars. ``relation`` says how the printed number bounds the quantity ("=", "<", ">", "~", "<=").
_HEADLINES: list[tuple[str, float, str, str]] = [
    ("rome_rs_layer6", 0.99, "=", "ROME mean rewrite score at paper layer 6 (code layer 5), GPT-J, EI"),
    ("rome_rs_other_layers_min", 0.96, ">", "ROME mean rewrite score at every edit layer except paper layer 28"),
    ("rho_rs_te_layer6", -0.13, "=", "Fig. 4: Pearson rho(RS, TE), ROME EI, paper layer 6 (code 5)"),
    ("rho_rs_te_layer6_p", 1e-3, "<", "Fig. 4: p-value of that correlation"),
    ("table1_r2_layer", 0.947, "=", "Table 1: R² of score ~ C(layer)"),
    ("table1_r2_trace", 0.016, "=", "Table 1: R² of score ~ TE"),
    ("table1_r2_both", 0.948, "=", "Table 1: R² of score ~ C(layer) * TE"),
    ("table1_diff", 0.001, "=", "Table 1: R² added by tracing"),
    ("table2_r2_layer", 0.927, "=", "Table 2 (74 concentrated facts): layer R²"),
    ("table2_r2_trace", 0.02, "=", "Table 2: trace R²"),
    ("table2_r2_both", 0.929, "=", "Table 2: both R²"),
    ("table2_diff", 0.002, "=", "Table 2: R² added by tracing"),
    ("max_diff", 0.032, "=", "max R² added by tracing over the 20 (problem x method) cells: FF with FT-5"),
    ("ff_ft_diff", 0.03, "~", "R² added by tracing for Fact Forcing with fine-tuning"),
    ("other_max_diff", 0.015, "<=", "R² added by tracing in every other experiment"),
    ("layer_r2_mean_claimed", 0.585, "=", "stated average layer R² across Fig. 6 conditions (not reproducible from Table 3)"),
    ("table3_layer_r2_mean_all", 0.615, "=", "mean of Table 3's layer column over all 20 cells (computed)"),
    ("table3_layer_r2_mean_no_ei", 0.571, "=", "mean of Table 3's layer column excluding EI (computed)"),
    ("paraphrase_max_diff", 0.03, "~", "Table 4: maximum R² added by tracing, paraphrase score"),
    ("neighborhood_max_diff", 0.02, "<=", "Table 5: maximum R² added by tracing, neighborhood score"),
    ("neighborhood_layer_r2_typical", 0.06, "<", "Table 5: layer R² values mostly below this"),
    ("gpt2xl_max_diff", 0.02, "~", "GPT2-XL (Fig. 13, window 10): maximum R² added by tracing (FF with FT)"),
    ("unscaled_rho_layer6", -0.006, "=", "Fig. 14: rho(unscaled magnitude, last-subject-token effect), ROME EI layer 6"),
    ("fig2_p_true_clean", 0.923, "=", "Fig. 2 example: p(o_true | s, r)"),
    ("fig2_p_true_noised", 0.001, "=", "Fig. 2 example: p(o_true | s_noise, r)"),
    ("n_points", float(N_POINTS), "=", "facts GPT-J gets right (main analysis)"),
    ("n_fact_erasure", float(N_FACT_ERASURE), "=", "facts with p(o_true) > .02 (Fact Erasure)"),
    ("n_concentrated", float(N_CONCENTRATED), "=", "facts with concentrated tracing effects (Table 2)"),
    ("n_edit_layers", 9.0, "=", "central edit layers per fact for GPT-J"),
    ("rome_default_layer_paper", 6.0, "=", "ROME's default edit layer for GPT-J, 1-indexed (code layer 5)"),
]

#: ``{key: value}`` view of the headline scalars.
HEADLINES: dict[str, float] = {k: v for k, v, _, _ in _HEADLINES}


def headlines() -> pd.DataFrame:
    """Headline scalars as a table: key, value, relation, description."""
    return pd.DataFrame(_HEADLINES, columns=["key", "value", "relation", "description"])
