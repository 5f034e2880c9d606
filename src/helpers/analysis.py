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
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps

from . import paper as paper_mod

log = logging.getLogger(__name__)

STATS: tuple[str, ...] = (
    "r2_layer", "r2_trace", "r2_both", "diff", "f_stat", "p_value", "rho", "rho_p",
    "rmse_layer", "rmse_trace", "rmse_both", "mae_layer", "mae_trace", "mae_both",
)
BOOT_STATS: tuple[str, ...] = ("r2_layer", "r2_trace", "r2_both", "diff", "rho")
DEFAULT_METRICS: tuple[str, ...] = ("rewrite", "paraphrase", "neighborhood", "essence", "overall")

_NAN = float("nan")


@dataclass
class RegressionResult:
    """Fit statistics of the Layer / Trace / Both models for one score (see module docstring)."""

    r2_layer: float
    r2_trace: float
    r2_both: float
    diff: float
    f_stat: float
    p_value: float
    rho: float
    rho_p: float
    rmse_layer: float
    rmse_trace: float
    rmse_both: float
    mae_layer: float
    mae_trace: float
    mae_both: float
    n: int
    n_layers: int
    n_facts: int | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass
class BootstrapResult:
    """Cluster-bootstrap percentile intervals. ``samples``: one row per replicate, columns ``BOOT_STATS``."""

    intervals: dict[str, tuple[float, float]]
    samples: pd.DataFrame = field(repr=False)
    n_boot: int = 0
    seed: int = 0
    level: float = 0.95

    def to_dict(self) -> dict[str, float]:
        """Flat ``{stat}_lo`` / ``{stat}_hi`` entries plus ``n_boot``."""
        out: dict[str, float] = {}
        for k, (lo, hi) in self.intervals.items():
            out[f"{k}_lo"] = lo
            out[f"{k}_hi"] = hi
        out["n_boot"] = self.n_boot
        return out


# --------------------------------------------------------------------------- data preparation


def _clean(df: pd.DataFrame, cols: Sequence[str], what: str) -> pd.DataFrame:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"{what}: missing columns {missing}")
    sub = df[list(cols)]
    keep = sub.notna().all(axis=1)
    n_drop = int((~keep).sum())
    if n_drop:
        log.warning("%s: dropped %d of %d rows with NaN in %s", what, n_drop, len(df), list(cols))
    return df.loc[keep]


def _nan_result(n: int, n_layers: int, n_facts: int | None) -> RegressionResult:
    return RegressionResult(*([_NAN] * 14), n=n, n_layers=n_layers, n_facts=n_facts)


# --------------------------------------------------------------------------- the three models (statsmodels)


def fit_models(
    df: pd.DataFrame, score: str = "rewrite", te: str = "te", layer: str = "layer", case_id: str | None = "case_id"
) -> RegressionResult:
    """Fit Layer / Trace / Both OLS models with statsmodels' formula API and summarise them.

    ``df``: one row per (case_id, layer); columns ``score`` (float), ``te`` (float), ``layer`` (treated
    as categorical). ``case_id`` is used only to count facts (skipped if absent or None).
    """
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    d0 = _clean(df, [score, te, layer], f"fit_models({score})")
    d = pd.DataFrame({"y": d0[score].to_numpy(float), "te": d0[te].to_numpy(float), "layer": d0[layer].to_numpy()})
    n = len(d)
    n_layers = int(d["layer"].nunique())
    n_facts = int(d0[case_id].nunique()) if case_id and case_id in d0.columns else None
    if n < 3:
        log.warning("fit_models(%s): only %d rows; returning NaN", score, n)
        return _nan_result(n, n_layers, n_facts)

    y = d["y"].to_numpy()
    constant_y = bool(np.ptp(y) == 0)
    constant_te = bool(np.ptp(d["te"].to_numpy()) == 0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f_layer = smf.ols("y ~ C(layer)", d).fit()
        f_trace = smf.ols("y ~ te", d).fit()
        f_both = smf.ols("y ~ C(layer) * te", d).fit()
        err = {}
        for name, f in (("layer", f_layer), ("trace", f_trace), ("both", f_both)):
            r = np.asarray(f.resid, float)
            err[f"rmse_{name}"] = float(np.sqrt(np.mean(r**2)))
            err[f"mae_{name}"] = float(np.mean(np.abs(r)))

        if constant_y:
            log.warning("fit_models(%s): constant score (%.6g) over %d rows; R², p and rho are NaN", score, y[0], n)
            return RegressionResult(_NAN, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, n=n, n_layers=n_layers,
                                    n_facts=n_facts, **err)

        r2_layer = 0.0 if n_layers == 1 else float(f_layer.rsquared)
        r2_trace = 0.0 if constant_te else float(f_trace.rsquared)
        r2_both = float(f_both.rsquared)
        f_stat, p_value = _NAN, _NAN
        if f_both.df_model > f_layer.df_model and f_both.df_resid > 0:
            tab = anova_lm(f_layer, f_both)
            f_stat, p_value = float(tab["F"].iloc[1]), float(tab["Pr(>F)"].iloc[1])
        if constant_te:
            rho, rho_p = _NAN, _NAN
        else:
            res = sps.pearsonr(y, d["te"].to_numpy())
            rho, rho_p = float(res.statistic), float(res.pvalue)
    return RegressionResult(
        r2_layer=r2_layer, r2_trace=r2_trace, r2_both=r2_both, diff=r2_both - r2_layer, f_stat=f_stat,
        p_value=p_value, rho=rho, rho_p=rho_p, n=n, n_layers=n_layers, n_facts=n_facts, **err,
    )


# --------------------------------------------------------------------------- numpy fast path


def design_matrices(te: np.ndarray, layer_codes: np.ndarray, n_layers: int) -> dict[str, np.ndarray]:
    """Design matrices spanning the same column spaces as the three formulas.

    Layer: one-hot of the layer (cell means; spans the intercept). Trace: [1, te].
    Both: [one-hot, one-hot * te] (per-layer intercept and slope). Shapes (n, G), (n, 2), (n, 2G).
    """
    onehot = np.zeros((len(te), n_layers))
    onehot[np.arange(len(te)), layer_codes] = 1.0
    return {
        "layer": onehot,
        "trace": np.column_stack([np.ones(len(te)), te]),
        "both": np.hstack([onehot, onehot * te[:, None]]),
    }


def _wls_r2(X: np.ndarray, y: np.ndarray, sw: np.ndarray, sst: float) -> float:
    """Weighted R² with sqrt-weights ``sw`` (rows duplicated ``w`` times == weight ``w``)."""
    beta, *_ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
    r = (y - X @ beta) * sw
    return float(1.0 - (r @ r) / sst) if sst > 0 else _NAN


def r2_numpy(
    y: np.ndarray, te: np.ndarray, layer: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """R² of the three models by numpy least squares (optionally with integer frequency ``weights``).

    Equals statsmodels' ``rsquared`` of the corresponding formulas (unweighted case). Returns
    ``{"r2_layer", "r2_trace", "r2_both", "diff"}``; NaN when the (weighted) score is constant.
    """
    y = np.asarray(y, float)
    te = np.asarray(te, float)
    codes, uniq = pd.factorize(np.asarray(layer), sort=True)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
    X = design_matrices(te, codes, len(uniq))
    return _r2_from_design(X, y, te, w)


def _r2_from_design(X: dict[str, np.ndarray], y: np.ndarray, te: np.ndarray, w: np.ndarray) -> dict[str, float]:
    sw = np.sqrt(w)
    W = w.sum()
    ybar = (w @ y) / W
    sst = float(w @ (y - ybar) ** 2)
    if sst <= 1e-300:
        return {"r2_layer": _NAN, "r2_trace": _NAN, "r2_both": _NAN, "diff": _NAN}
    out = {f"r2_{k}": _wls_r2(M, y, sw, sst) for k, M in X.items()}
    out["diff"] = out["r2_both"] - out["r2_layer"]
    return out


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    W = w.sum()
    xc = x - (w @ x) / W
    yc = y - (w @ y) / W
    sxx, syy = w @ (xc * xc), w @ (yc * yc)
    if sxx <= 0 or syy <= 0:
        return _NAN
    return float((w @ (xc * yc)) / np.sqrt(sxx * syy))


def bootstrap(
    df: pd.DataFrame,
    score: str = "rewrite",
    te: str = "te",
    layer: str = "layer",
    case_id: str = "case_id",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Cluster bootstrap over facts: percentile intervals for R² (each model), diff and rho.

    Each replicate draws as many case_ids as there are, with replacement; all rows of a drawn fact
    enter with it (a fact drawn k times gets frequency weight k, which equals duplicating its rows).
    Deterministic given ``seed`` and independent of row order. Replicates with a constant score give
    NaN and are ignored by the percentiles (their count is logged).
    """
    d = _clean(df, [score, te, layer, case_id], f"bootstrap({score})")
    y = d[score].to_numpy(float)
    x = d[te].to_numpy(float)
    lcodes, luniq = pd.factorize(d[layer].to_numpy(), sort=True)
    ccodes, cuniq = pd.factorize(d[case_id].to_numpy(), sort=True)
    K = len(cuniq)
    X = design_matrices(x, lcodes, len(luniq))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, K, size=(n_boot, K))
    counts = np.bincount((draws + (np.arange(n_boot) * K)[:, None]).ravel(), minlength=n_boot * K).reshape(n_boot, K)

    rows = np.empty((n_boot, len(BOOT_STATS)))
    try:
        from tqdm.auto import tqdm

        it = tqdm(range(n_boot), desc=f"bootstrap {score}", leave=False, disable=n_boot * len(y) < 2_000_000)
    except ImportError:  # pragma: no cover
        it = range(n_boot)
    for b in it:
        w = counts[b, ccodes].astype(float)
        keep = w > 0
        wk, yk, xk = w[keep], y[keep], x[keep]
        r = _r2_from_design({k: M[keep] for k, M in X.items()}, yk, xk, wk)
        rows[b] = [r["r2_layer"], r["r2_trace"], r["r2_both"], r["diff"], _weighted_pearson(xk, yk, wk)]
    samples = pd.DataFrame(rows, columns=list(BOOT_STATS))
    n_bad = int(samples["r2_layer"].isna().sum())
    if n_bad:
        log.warning("bootstrap(%s): %d of %d replicates had a constant score (ignored)", score, n_bad, n_boot)
    alpha = (1.0 - level) / 2.0
    intervals: dict[str, tuple[float, float]] = {}
    for k in BOOT_STATS:
        v = samples[k].to_numpy()
        v = v[~np.isnan(v)]
        intervals[k] = (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) if len(v) else (_NAN, _NAN)
    return BootstrapResult(intervals=intervals, samples=samples, n_boot=n_boot, seed=seed, level=level)


# --------------------------------------------------------------------------- joining and tables


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
