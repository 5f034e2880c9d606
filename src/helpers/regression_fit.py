"""The three OLS models of :mod:`helpers.analysis` (Layer, Trace, Both) fitted with statsmodels for one score,
with their fit statistics (:class:`RegressionResult`) and the NaN-row cleaning shared with the bootstrap."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

log = logging.getLogger(__name__)

STATS: tuple[str, ...] = (
    "r2_layer", "r2_trace", "r2_both", "diff", "f_stat", "p_value", "rho", "rho_p",
    "rmse_layer", "rmse_trace", "rmse_both", "mae_layer", "mae_trace", "mae_both",
)

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
