"""Known-answer tests of the regressions (SCIENCE.md §8) and of the paper's numbers as data."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats as sps

from helpers import analysis as A
from helpers import paper as P


def make_data(n_facts: int = 60, n_layers: int = 5, seed: int = 0, slope: float = 0.3, noise: float = 0.1) -> pd.DataFrame:
    """Synthetic (case_id, layer) table: score = layer effect + per-layer slope * te + noise."""
    rng = np.random.default_rng(seed)
    case = np.repeat(np.arange(n_facts), n_layers)
    layer = np.tile(np.arange(n_layers) * 3, n_facts)  # non-contiguous layer labels on purpose
    te = rng.random(len(case))
    lvl = rng.normal(0, 1, n_layers)[layer // 3]
    sl = slope * (1 + layer / 3)
    y = lvl + sl * te + rng.normal(0, noise, len(case)) + 0.2 * rng.normal(0, 1, n_facts)[case]
    return pd.DataFrame({"case_id": case, "layer": layer, "te": te, "rewrite": y})


def hand_fit(df: pd.DataFrame) -> dict[str, float]:
    """R², SSRs, RMSE/MAE of the three models computed directly (group means, polyfit)."""
    y, x, g = df["rewrite"].to_numpy(), df["te"].to_numpy(), df["layer"].to_numpy()
    sst = ((y - y.mean()) ** 2).sum()
    res_layer = y - df.groupby("layer")["rewrite"].transform("mean").to_numpy()
    b1, b0 = np.polyfit(x, y, 1)
    res_trace = y - (b0 + b1 * x)
    res_both = np.empty_like(y)
    for lv in np.unique(g):
        m = g == lv
        c1, c0 = np.polyfit(x[m], y[m], 1)
        res_both[m] = y[m] - (c0 + c1 * x[m])
    ssr = {k: float((r**2).sum()) for k, r in (("layer", res_layer), ("trace", res_trace), ("both", res_both))}
    out = {f"r2_{k}": 1 - v / sst for k, v in ssr.items()}
    out.update({f"ssr_{k}": v for k, v in ssr.items()})
    out["rmse_layer"] = float(np.sqrt(np.mean(res_layer**2)))
    out["mae_trace"] = float(np.mean(np.abs(res_trace)))
    return out


# ----------------------------------------------------------------------------- fit_models


def test_fit_models_matches_hand_computation():
    df = make_data()
    r = A.fit_models(df)
    h = hand_fit(df)
    for k in ("r2_layer", "r2_trace", "r2_both"):
        assert getattr(r, k) == pytest.approx(h[k], abs=1e-10)
    assert r.diff == pytest.approx(h["r2_both"] - h["r2_layer"], abs=1e-10)
    assert r.rmse_layer == pytest.approx(h["rmse_layer"], abs=1e-10)
    assert r.mae_trace == pytest.approx(h["mae_trace"], abs=1e-10)
    assert (r.n, r.n_layers, r.n_facts) == (300, 5, 60)
    # simple-regression R² is the squared Pearson correlation
    rho = np.corrcoef(df["rewrite"], df["te"])[0, 1]
    assert r.rho == pytest.approx(rho, abs=1e-12)
    assert r.r2_trace == pytest.approx(rho**2, abs=1e-10)


def test_f_test_p_matches_manual_scipy():
    df = make_data(seed=3, slope=0.05, noise=0.3)
    r = A.fit_models(df)
    h = hand_fit(df)
    n, G = len(df), df["layer"].nunique()
    df_layer, df_both = n - G, n - 2 * G
    F = ((h["ssr_layer"] - h["ssr_both"]) / (df_layer - df_both)) / (h["ssr_both"] / df_both)
    p = sps.f.sf(F, df_layer - df_both, df_both)
    assert r.f_stat == pytest.approx(F, rel=1e-9)
    assert r.p_value == pytest.approx(p, rel=1e-7, abs=1e-300)
    # rho's p from the t distribution
    rho = r.rho
    t = rho * math.sqrt((n - 2) / (1 - rho**2))
    assert r.rho_p == pytest.approx(2 * sps.t.sf(abs(t), n - 2), rel=1e-7)


def test_score_equal_to_layer_means_gives_r2_layer_one():
    df = make_data()
    means = {0: 0.1, 3: 0.9, 6: 0.5, 9: 0.3, 12: 0.7}
    df["rewrite"] = df["layer"].map(means)
    r = A.fit_models(df)
    assert r.r2_layer == pytest.approx(1.0, abs=1e-12)
    assert r.r2_both == pytest.approx(1.0, abs=1e-12)
    assert r.diff == pytest.approx(0.0, abs=1e-12)
    assert r.rmse_layer == pytest.approx(0.0, abs=1e-12)


def test_score_independent_of_te_has_small_known_r2_trace():
    rng = np.random.default_rng(1)
    n = 2000
    df = pd.DataFrame({"case_id": np.arange(n), "layer": rng.integers(0, 4, n), "te": rng.random(n), "rewrite": rng.random(n)})
    r = A.fit_models(df)
    expected = np.corrcoef(df["rewrite"], df["te"])[0, 1] ** 2
    assert r.r2_trace == pytest.approx(expected, abs=1e-12)
    assert r.r2_trace < 0.01


def test_constant_score_is_nan_not_error(caplog):
    df = make_data()
    df["rewrite"] = 0.99
    with caplog.at_level(logging.WARNING, logger="helpers.analysis"):
        r = A.fit_models(df)
    assert all(math.isnan(getattr(r, k)) for k in ("r2_layer", "r2_trace", "r2_both", "diff", "p_value", "rho"))
    assert r.rmse_layer == pytest.approx(0.0, abs=1e-12) and r.n == 300
    assert "constant score" in caplog.text


def test_single_layer_reduces_to_trace_model():
    df = make_data()
    df = df[df["layer"] == 6]
    r = A.fit_models(df)
    assert r.r2_layer == 0.0 and r.n_layers == 1
    assert r.r2_both == pytest.approx(r.r2_trace, abs=1e-10)
    # the F-test of the te slope equals the correlation test
    assert r.p_value == pytest.approx(r.rho_p, rel=1e-7)


def test_constant_te():
    df = make_data()
    df["te"] = 0.5
    r = A.fit_models(df)
    assert r.r2_trace == 0.0 and math.isnan(r.rho)
    assert r.diff == pytest.approx(0.0, abs=1e-10)
    assert math.isnan(r.p_value)


def test_nan_rows_dropped_and_logged(caplog):
    df = make_data()
    full = A.fit_models(df.iloc[3:])
    df.loc[0, "rewrite"] = np.nan
    df.loc[1, "te"] = np.nan
    df.loc[2, "layer"] = np.nan
    with caplog.at_level(logging.WARNING, logger="helpers.analysis"):
        r = A.fit_models(df)
    assert r.n == 297
    assert "dropped 3" in caplog.text
    assert r.r2_both == pytest.approx(full.r2_both, abs=1e-12)


# ----------------------------------------------------------------------------- numpy fast path, bootstrap


def test_numpy_r2_equals_statsmodels():
    df = make_data(seed=5)
    fast = A.r2_numpy(df["rewrite"], df["te"], df["layer"])
    for k, formula in (("r2_layer", "rewrite ~ C(layer)"), ("r2_trace", "rewrite ~ te"), ("r2_both", "rewrite ~ C(layer) * te")):
        assert fast[k] == pytest.approx(smf.ols(formula, df).fit().rsquared, abs=1e-10)


def test_weighted_numpy_r2_equals_duplicated_rows():
    df = make_data(seed=6)
    w = np.random.default_rng(0).integers(0, 4, len(df))
    dup = df.loc[df.index.repeat(w)]
    fast = A.r2_numpy(df["rewrite"], df["te"], df["layer"], weights=w)
    ref = A.fit_models(dup)
    for k in ("r2_layer", "r2_trace", "r2_both"):
        assert fast[k] == pytest.approx(getattr(ref, k), abs=1e-10)


def test_bootstrap_deterministic_contains_estimate_and_is_cluster():
    df = make_data(n_facts=80, seed=2)
    r = A.fit_models(df)
    b1 = A.bootstrap(df, n_boot=100, seed=7)
    b2 = A.bootstrap(df.sample(frac=1.0, random_state=0), n_boot=100, seed=7)  # row order does not matter
    b3 = A.bootstrap(df, n_boot=100, seed=8)
    pd.testing.assert_frame_equal(b1.samples, b2.samples, atol=1e-12, rtol=0)
    assert not np.allclose(b1.samples.to_numpy(), b3.samples.to_numpy())
    for k in ("r2_layer", "r2_trace", "r2_both", "diff", "rho"):
        lo, hi = b1.intervals[k]
        assert lo <= getattr(r, k) <= hi, k
    # replicate 0 equals a statsmodels fit on the explicitly resampled facts (rows kept together)
    cases = np.sort(df["case_id"].unique())
    draw = np.random.default_rng(7).integers(0, len(cases), size=(100, len(cases)))[0]
    resampled = pd.concat([df[df["case_id"] == cases[i]] for i in draw])
    ref = A.fit_models(resampled)
    assert b1.samples.loc[0, "r2_layer"] == pytest.approx(ref.r2_layer, abs=1e-10)
    assert b1.samples.loc[0, "diff"] == pytest.approx(ref.diff, abs=1e-10)
    assert b1.samples.loc[0, "rho"] == pytest.approx(ref.rho, abs=1e-10)
    d = b1.to_dict()
    assert d["n_boot"] == 100 and d["diff_lo"] <= d["diff_hi"]


def test_bootstrap_intervals_at_paper_scale_cover_the_estimate_and_are_tight():
    """600 facts x 9 layers (the paper's size): the percentile intervals contain the full-data estimates, are
    ordered, and narrow (a cluster bootstrap that resampled rows, or one fact only, would not be)."""
    df = make_data(n_facts=600, n_layers=9, seed=4)
    b = A.bootstrap(df, n_boot=200, seed=0)
    full = A.fit_models(df)
    assert len(b.samples) == 200 and b.samples.notna().all().all()
    for stat in ("r2_layer", "r2_both", "diff"):
        lo, hi = b.intervals[stat]
        assert lo <= getattr(full, stat) <= hi
        assert 0 < hi - lo < 0.05


# ----------------------------------------------------------------------------- join and tables


def test_join_effects_filters_and_matches():
    edits = pd.DataFrame({
        "case_id": [1, 1, 2, 2, 3, 4],
        "central_layer": [0, 1, 0, -1, 0, 5],
        "rewrite": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    })
    effects = pd.DataFrame({
        "case_id": [1, 1, 2, 3, 4],
        "layer": [0, 1, 0, 0, 0],
        "te": [0.9, 0.8, 0.7, 0.6, 0.5],
        "is_correct": [True, True, True, False, True],
    })
    j = A.join_effects(edits, effects)
    # case 2 layer -1 dropped, case 3 not correct, case 4 layer 5 has no effect row
    assert sorted(zip(j["case_id"], j["layer"])) == [(1, 0), (1, 1), (2, 0)]
    assert j.set_index(["case_id", "layer"]).loc[(1, 1), "te"] == 0.8
    assert (j["layer"] == j["central_layer"]).all()
    with pytest.raises(ValueError):
        A.join_effects(edits, pd.concat([effects, effects]))


def test_join_effects_is_correct_in_edits():
    edits = pd.DataFrame({"case_id": [1, 2], "central_layer": [0, 0], "is_correct": [1, 0], "rewrite": [0.1, 0.2]})
    effects = pd.DataFrame({"case_id": [1, 2], "layer": [0, 0], "te": [0.3, 0.4]})
    j = A.join_effects(edits, effects)
    assert j["case_id"].tolist() == [1]


def test_regression_table_rows_and_values():
    a, b = make_data(seed=10), make_data(seed=11)
    a["problem"], a["method"] = "ei", "rome"
    b["problem"], b["method"] = "ff", "ft5"
    for t in (a, b):
        t["overall"] = t["rewrite"] * 0.5 + t["te"]
    joined = pd.concat([a, b], ignore_index=True)
    tab = A.regression_table(joined, metrics=["rewrite", "overall", "essence"])
    assert len(tab) == 4  # essence absent -> skipped
    assert list(tab.columns[:3]) == ["problem", "method", "metric"]
    for c in ("r2_layer", "r2_trace", "r2_both", "diff", "p_value", "rho", "rho_p", "rmse_layer", "mae_trace", "n"):
        assert c in tab.columns
    row = tab[(tab.problem == "ff") & (tab.metric == "rewrite")].iloc[0]
    assert row["r2_both"] == pytest.approx(A.fit_models(b).r2_both, abs=1e-12)
    tab_b = A.regression_table(joined, metrics=["rewrite"], n_boot=20, seed=0)
    for c in ("r2_layer_lo", "r2_layer_hi", "diff_lo", "diff_hi", "rho_lo", "rho_hi", "n_boot"):
        assert c in tab_b.columns
    assert (tab_b["diff_lo"] <= tab_b["diff_hi"]).all()
    single = A.regression_table(a, by=[], metrics=["rewrite"])
    assert len(single) == 1 and single["r2_layer"].iloc[0] == pytest.approx(A.fit_models(a).r2_layer)


def test_compare_with_paper():
    ours = pd.DataFrame({
        "problem": ["fact_forcing", "error_injection"], "method": ["FT-5", "ROME"], "metric": ["rewrite", "rewrite"],
        "r2_layer": [0.6, 0.9], "r2_trace": [0.1, 0.02], "r2_both": [0.63, 0.91], "diff": [0.03, 0.01],
        "p_value": [1e-6, 0.5], "n": [500, 500], "diff_lo": [0.02, 0.02], "diff_hi": [0.04, 0.03],
    })
    cmp = A.compare_with_paper(ours)
    ff = cmp[cmp.problem == "ff"].iloc[0]
    assert ff["r2_layer_ours"] == 0.6 and ff["r2_layer_paper"] == pytest.approx(0.634)
    assert ff["diff_paper"] == pytest.approx(0.032) and bool(ff["diff_paper_in_ci"])
    ei = cmp[cmp.problem == "ei"].iloc[0]
    assert ei["diff_paper"] == pytest.approx(0.001) and not bool(ei["diff_paper_in_ci"])
    assert bool(ei["p_paper_is_bound"]) and ei["p_value_paper"] == pytest.approx(1e-4)
    assert len(A.compare_with_paper(ours, how="outer")) > len(cmp)


# ----------------------------------------------------------------------------- the paper's numbers


def test_paper_tables():
    t3, t6 = P.table3(), P.table6()
    assert len(t3) == 20 and len(t6) == 20
    assert set(t3.problem) == set(P.PROBLEMS) and set(t3.method) == set(P.METHODS)
    cell = t3.set_index(["problem", "method"]).loc[("ff", "ft5")]
    assert (cell.r2_layer, cell.r2_trace, cell.r2_both, cell["diff"]) == (0.634, 0.10, 0.666, 0.032)
    assert bool(cell.p_is_bound) and cell.p_value == 1e-4
    assert t3["diff"].max() == 0.032
    assert (t3[t3.problem == "fe"].n == 489).all() and (t3[t3.problem != "fe"].n == 652).all()
    assert t3["r2_layer"].mean() == pytest.approx(P.HEADLINES["table3_layer_r2_mean_all"], abs=5e-4)
    assert t3[t3.problem != "ei"]["r2_layer"].mean() == pytest.approx(P.HEADLINES["table3_layer_r2_mean_no_ei"], abs=5e-4)
    assert t6.set_index(["problem", "method"]).loc[("tr", "ft5"), "note"] != ""
    assert t6.set_index(["problem", "method"]).loc[("ei", "ft1"), "p_value"] == 0.001
    assert not bool(t6.set_index(["problem", "method"]).loc[("ei", "ft1"), "p_is_bound"])
    t1 = P.table1().iloc[0]
    assert (t1.r2_layer, t1.r2_trace, t1.r2_both) == (0.947, 0.016, 0.948)
    assert P.table2().iloc[0].n == 74
    assert len(P.table4()) == 5 and len(P.table5()) == 2
    assert len(P.regression_tables()) == 47
    assert P.table7().set_index("metric").loc["rewrite", "rmse_trace"] == 0.315
    assert P.table8().set_index("metric").loc["overall", "mae_layer"] == 0.097
    assert P.HEADLINES["rho_rs_te_layer6"] == -0.13 and P.HEADLINES["max_diff"] == 0.032
    assert P.parse_p("<1e-4") == (1e-4, True) and P.parse_p(".199") == (0.199, False)
    w = P.wide(t3, "r2_layer")
    assert list(w.index) == list(P.PROBLEMS) and list(w.columns) == list(P.METHODS)
