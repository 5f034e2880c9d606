"""Cluster-bootstrap intervals for the regressions of :mod:`helpers.analysis`: R² of the three models by numpy
least squares with frequency weights (a fact drawn k times has weight k), diff and rho."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .regression_fit import _NAN, _clean

log = logging.getLogger(__name__)

BOOT_STATS: tuple[str, ...] = ("r2_layer", "r2_trace", "r2_both", "diff", "rho")


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
        from .progress import tqdm

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
