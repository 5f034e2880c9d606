"""The paper's regressions (SCIENCE.md §8): does the tracing effect explain edit success beyond the edit layer?

For one (problem, method, metric) the unit of analysis is one row per (case_id, central layer c), holding
an edit-success score and the tracing effect TE at layer c. Three OLS models are fitted:

- Layer: ``score ~ C(layer)``        (one intercept per layer)
- Trace: ``score ~ te``              (pooled over layers)
- Both:  ``score ~ C(layer) * te``   (per-layer intercepts and slopes)

and we report plain R² of each, ``diff = R²_both - R²_layer``, the F-test p of Both vs Layer
(``anova_lm``), Pearson rho(score, te), in-sample RMSE/MAE, and optionally cluster-bootstrap 95%
intervals (resampling facts, so a fact's rows stay together).

Table schemas
-------------
Joined table (:func:`join_effects`): the edit rows' columns (``case_id``, ``central_layer``, scores ...)
plus ``layer`` (= ``central_layer``) and the tracing-effect columns (``te`` ...). Effect columns whose
names clash with edit columns get the suffix ``_trace``.

Regression table (:func:`regression_table`), one row per (*by, metric):
``*by`` (default ``problem, method``), ``metric``, ``n`` (rows used), ``n_facts``, ``n_layers``,
``r2_layer, r2_trace, r2_both, diff, f_stat, p_value, rho, rho_p``,
``rmse_layer, rmse_trace, rmse_both, mae_layer, mae_trace, mae_both``; with ``n_boot > 0`` also
``r2_layer_lo, r2_layer_hi, r2_trace_lo, r2_trace_hi, r2_both_lo, r2_both_hi, diff_lo, diff_hi,
rho_lo, rho_hi, n_boot``.

Degenerate inputs (documented behaviour):

- NaN rows (in score, te or layer) are dropped and the count is logged.
- A constant score: every R², diff, p and rho are NaN (R² is 0/0); RMSE and MAE are 0. A warning is logged.
- A single layer: the Layer model is intercept-only, so ``r2_layer = 0`` and Both reduces to
  ``score ~ te``; the F-test then tests the te slope.
- A constant te: ``r2_trace = 0``, ``rho`` NaN, Both equals Layer (``diff = 0``, ``p_value`` NaN).
- Fewer than 3 rows: everything NaN.

The models are fitted in :mod:`helpers.regression_fit`, the bootstrap is in :mod:`helpers.regression_bootstrap`
and the comparison with the paper in :mod:`helpers.paper_comparison`; this module joins the tables, builds the
regression table and re-exports their names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

# Re-exported: the public names of this module before it was split.
from .paper_comparison import METHOD_ALIASES, PROBLEM_ALIASES, compare_with_paper
from .regression_bootstrap import BOOT_STATS, BootstrapResult, bootstrap, design_matrices, r2_numpy
from .regression_fit import STATS, RegressionResult, fit_models

log = logging.getLogger(__name__)

DEFAULT_METRICS: tuple[str, ...] = ("rewrite", "paraphrase", "neighborhood", "essence", "overall")


def _truthy(s: pd.Series) -> pd.Series:
    """Boolean mask of truthy values (True / 1); NaN counts as False."""
    return s.map(lambda v: bool(v) if pd.notna(v) else False).astype(bool)


def join_effects(
    edits: pd.DataFrame,
    effects: pd.DataFrame,
    edit_layer: str = "central_layer",
    effect_layer: str = "layer",
    case_id: str = "case_id",
) -> pd.DataFrame:
    """Inner-join edit rows with per-(case_id, layer) tracing effects on (case_id, central layer).

    Keeps only ``is_correct`` rows when either table has that column, and drops edit rows with
    ``central_layer < 0``. ``effects`` must be unique on (case_id, layer) (filter window/kind first).
    The output has a ``layer`` column equal to ``central_layer`` (see module docstring).
    """
    for name, t, cols in (("edits", edits, [case_id, edit_layer]), ("effects", effects, [case_id, effect_layer])):
        missing = [c for c in cols if c not in t.columns]
        if missing:
            raise KeyError(f"join_effects: {name} lacks columns {missing}")
    if effects.duplicated([case_id, effect_layer]).any():
        raise ValueError("join_effects: effects has several rows per (case_id, layer); select one window/kind first")

    e = edits
    n0 = len(e)
    if "is_correct" in e.columns:
        e = e[_truthy(e["is_correct"])]
    e = e[e[edit_layer] >= 0]
    f = effects
    if "is_correct" in f.columns:
        f = f[_truthy(f["is_correct"])]
        if "is_correct" in e.columns:
            f = f.drop(columns="is_correct")
    if len(e) < n0:
        log.info("join_effects: kept %d of %d edit rows (is_correct and central_layer >= 0)", len(e), n0)
    out = e.merge(f, left_on=[case_id, edit_layer], right_on=[case_id, effect_layer], how="inner",
                  suffixes=("", "_trace"), validate="many_to_one")
    out["layer"] = out[edit_layer]
    n_unmatched = len(e) - len(out)
    if n_unmatched:
        log.warning("join_effects: %d edit rows had no tracing effect (case_id, layer) and were dropped", n_unmatched)
    return out.reset_index(drop=True)


def regression_table(
    joined: pd.DataFrame,
    by: Sequence[str] = ("problem", "method"),
    metrics: Sequence[str] = DEFAULT_METRICS,
    te: str = "te",
    layer: str = "layer",
    case_id: str = "case_id",
    n_boot: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (*by, metric) with the statistics of :func:`fit_models` (and bootstrap CIs if n_boot > 0).

    Metrics absent from ``joined`` are skipped with a log message. See the module docstring for columns.
    """
    by = [b for b in by]
    present = [m for m in metrics if m in joined.columns]
    skipped = [m for m in metrics if m not in joined.columns]
    if skipped:
        log.info("regression_table: metrics not in table, skipped: %s", skipped)
    groups = joined.groupby(by, sort=True, dropna=False) if by else [((), joined)]
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for m in present:
            res = fit_models(g, score=m, te=te, layer=layer, case_id=case_id if case_id in g.columns else None)
            row = {**dict(zip(by, key)), "metric": m, **res.to_dict()}
            if n_boot > 0:
                row.update(bootstrap(g, score=m, te=te, layer=layer, case_id=case_id, n_boot=n_boot, seed=seed).to_dict())
            rows.append(row)
    cols = [*by, "metric", "n", "n_facts", "n_layers", *STATS]
    if n_boot > 0:
        cols += [f"{k}_{s}" for k in BOOT_STATS for s in ("lo", "hi")] + ["n_boot"]
    return pd.DataFrame(rows, columns=cols)
