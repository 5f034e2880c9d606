"""Known-answer tests of the edit metrics (SCIENCE.md §7), all values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from helpers import metrics as M

FLOOR = 2e-8


# ----------------------------------------------------------------------------- rewrite / erasure


@pytest.mark.parametrize(
    "a,b,expected",
    [
        (0.2, 0.6, 0.5),  # (0.6-0.2)/(1-0.2) = 0.4/0.8
        (0.9, 0.99, 0.9),  # 0.09/0.1
        (0.0, 0.3, 0.3),  # a = 0: plain b
        (0.0, 1.0, 1.0),
        (0.0, 0.0, FLOOR),  # no change from zero -> clamp
        (0.5, 0.5, FLOOR),  # b == a -> 0 -> clamp
        (0.5, 0.25, FLOOR),  # b < a -> negative -> clamp
        (1.0, 1.0, 1.0),  # a == 1, b >= a: defined as 1
        (1.0, 0.5, FLOOR),  # a == 1, b < a: defined as the clamp
    ],
)
def test_rewrite_score_known(a, b, expected):
    assert M.rewrite_score(a, b) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "a,b,expected",
    [
        (0.5, 0.1, 0.8),  # (0.5-0.1)/0.5
        (0.4, 0.0, 1.0),  # fully erased
        (0.5, 0.5, 0.0),  # b == a
        (0.5, 0.7, 0.0),  # b > a -> clamp at 0
        (0.0, 0.0, 0.0),  # a == 0: defined as 0
        (0.0, 0.3, 0.0),
        (1.0, 0.25, 0.75),
    ],
)
def test_erasure_score_known(a, b, expected):
    assert M.erasure_score(a, b) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_scores_vectorised_and_no_nan_at_edges():
    a = np.array([0.0, 0.2, 0.5, 1.0, 1.0])
    b = np.array([0.3, 0.6, 0.25, 1.0, 0.5])
    with np.errstate(all="raise"):  # no division warnings escape
        rs = M.rewrite_score(a, b)
        es = M.erasure_score(a, b)
    np.testing.assert_allclose(rs, [0.3, 0.5, FLOOR, 1.0, FLOOR], rtol=1e-12)
    np.testing.assert_allclose(es, [0.0, 0.0, 0.5, 0.0, 0.5], rtol=1e-12)
    assert not np.isnan(rs).any() and not np.isnan(es).any()


def test_nan_propagates():
    assert math.isnan(M.rewrite_score(np.nan, 0.5))
    assert math.isnan(M.erasure_score(0.5, np.nan))
    assert math.isnan(M.neighborhood_score(np.nan, 0.5))


def test_series_keeps_index():
    a = pd.Series([0.2, 0.5], index=[10, 20])
    b = pd.Series([0.6, 0.1], index=[10, 20])
    out = M.rewrite_score(a, b)
    assert isinstance(out, pd.Series) and list(out.index) == [10, 20]
    assert out.loc[10] == pytest.approx(0.5)


def test_score_dispatcher():
    assert M.score(0.2, 0.6, "raise") == pytest.approx(0.5)
    assert M.score(0.5, 0.1, "lower") == pytest.approx(0.8)
    out = M.score([0.2, 0.5], [0.6, 0.1], ["raise", "lower"])
    np.testing.assert_allclose(out, [0.5, 0.8])
    with pytest.raises(ValueError):
        M.score(0.2, 0.6, "up")


# ----------------------------------------------------------------------------- neighborhood


@pytest.mark.parametrize(
    "a,b,expected",
    [
        (0.5, 0.5, 1.0),
        (0.2, 0.2, 1.0),
        (0.2, 0.4, 0.75),  # 1 - 0.2/0.8
        (0.2, 1.0, 0.0),  # the largest possible change from 0.2
        (0.9, 0.0, 0.0),  # 1 - 0.9/0.9
        (0.5, 0.0, 0.0),  # 1 - 0.5/0.5
        (0.5, 0.75, 0.5),
        (0.0, 0.5, 0.5),  # 1 - 0.5/1
        (1.0, 0.75, 0.75),  # 1 - 0.25/1
    ],
)
def test_neighborhood_score_known(a, b, expected):
    assert M.neighborhood_score(a, b) == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------- lists of prompts


def test_paraphrase_mean_and_first():
    pre, post = [0.2, 0.0], [0.6, 0.9]  # scores 0.5 and 0.9
    assert M.paraphrase_score(pre, post) == pytest.approx(0.7)
    assert M.paraphrase_score_first(pre, post) == pytest.approx(0.5)
    # erasure direction: scores 0.8 and 0.25
    assert M.paraphrase_score([0.5, 0.4], [0.1, 0.3], "lower") == pytest.approx(0.525)
    assert M.paraphrase_score([0.5, 0.4], [0.1, 0.3], "lower", variant="first") == pytest.approx(0.8)


def test_paraphrase_column_of_lists_ragged_and_empty():
    pre = pd.Series([[0.2, 0.0], [0.5], []], index=[7, 8, 9])
    post = pd.Series([[0.6, 0.9], [0.1], []], index=[7, 8, 9])
    out = M.paraphrase_score(pre, post, ["raise", "lower", "raise"])
    assert list(out.index) == [7, 8, 9]
    np.testing.assert_allclose(out.to_numpy()[:2], [0.7, 0.8])
    assert math.isnan(out.iloc[2])
    first = M.paraphrase_score_first(pre, post, "raise")
    np.testing.assert_allclose(first.to_numpy()[:2], [0.5, FLOOR])


def test_list_length_mismatch_raises():
    with pytest.raises(ValueError):
        M.paraphrase_score([[0.1, 0.2]], [[0.3]])


def test_neighborhood_lists():
    pre, post = [0.2, 0.5], [0.4, 0.75]  # 0.75 and 0.5
    assert M.neighborhood_score_mean(pre, post) == pytest.approx(0.625)
    assert M.neighborhood_score_first(pre, post) == pytest.approx(0.75)
    out = M.neighborhood_score_mean([[0.2, 0.5], [0.9]], [[0.4, 0.75], [0.0]])
    np.testing.assert_allclose(out, [0.625, 0.0])


# ----------------------------------------------------------------------------- aggregates, essence


def test_overall_scores():
    assert M.overall_score(0.5, 0.7, 0.625) == pytest.approx(1.825 / 3)
    assert M.overall_with_essence(0.5, 0.7, 0.625, 0.8) == pytest.approx(2.625 / 4)
    np.testing.assert_allclose(M.overall_score(np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([0.3, 1.0])), [0.1, 1.0])


def test_perplexity_divides_by_n():
    lp = [-1.0, -2.0, -3.0]  # 3 predicted tokens of a 4-token text
    assert M.perplexity(lp) == pytest.approx(math.exp(6 / 4))
    assert M.perplexity(lp) != pytest.approx(math.exp(6 / 3))  # not the N-1 convention
    assert M.perplexity(lp, n_tokens=5) == pytest.approx(math.exp(6 / 5))
    assert M.perplexity([]) == 1.0  # a one-token text
    assert M.perplexity(np.log([0.5, 0.5, 0.5])) == pytest.approx(2 ** (3 / 4))
    with pytest.raises(ValueError):
        M.perplexity(lp, n_tokens=3)


def test_essence_ppl_and_score():
    assert M.essence_ppl([[-1.0, -2.0, -3.0], [0.0]]) == pytest.approx((math.exp(1.5) + 1.0) / 2)
    assert M.essence_score(10.0, 12.0) == pytest.approx(0.6)
    assert M.essence_score(10.0, 9.0) == 1.0  # perplexity fell: no penalty
    assert M.essence_score(10.0, 15.0) == pytest.approx(0.0)
    assert M.essence_score(10.0, 16.0) == 0.0  # clipped at 5
    np.testing.assert_allclose(M.essence_score(np.array([1.0, 1.0]), np.array([2.0, 3.5])), [0.8, 0.5])


# ----------------------------------------------------------------------------- unscaled


def test_magnitude_and_success():
    assert M.rewrite_magnitude(0.7, 0.2) == pytest.approx(0.5)
    assert M.rewrite_magnitude(0.1, 0.4) == pytest.approx(-0.3)
    p_new, p_base = [0.6, 0.1, 0.5, 0.3], [0.3, 0.2, 0.4, 0.3]  # tie counts for neither
    assert M.success_fraction(p_new, p_base) == pytest.approx(2 / 4)
    assert M.success_fraction(p_new, p_base, neighborhood=True) == pytest.approx(1 / 4)
    assert M.success_fraction(0.6, 0.3) == 1.0
    np.testing.assert_allclose(M.success_fraction([[0.6, 0.1], [0.9]], [[0.3, 0.2], [0.1]]), [0.5, 1.0])


# ----------------------------------------------------------------------------- score table


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case_id": [1, 2, 3],
            "rewrite_pre": [0.2, 0.5, 1.0],
            "rewrite_post": [0.6, 0.1, 1.0],
            "paraphrase_pre": [[0.2, 0.0], [0.5, 0.4], [0.5]],
            "paraphrase_post": [[0.6, 0.9], [0.1, 0.3], [0.25]],
            "neighborhood_pre": [[0.2, 0.5], [0.5], [0.9, 0.5]],
            "neighborhood_post": [[0.4, 0.75], [0.5], [0.0, 0.5]],
            "direction": ["raise", "lower", "raise"],
            "essence_ppl_pre": [10.0, 10.0, 10.0],
            "essence_ppl_post": [12.0, 9.0, 20.0],
        }
    )


def test_score_table_known_answers():
    df = _table()
    out = M.score_table(df)
    assert set(M.SCORE_COLUMNS) <= set(out.columns)
    assert "case_id" in out.columns and len(out) == 3
    np.testing.assert_allclose(out["rewrite"], [0.5, 0.8, 1.0])
    np.testing.assert_allclose(out["paraphrase"], [0.7, 0.525, FLOOR])
    np.testing.assert_allclose(out["paraphrase_first"], [0.5, 0.8, FLOOR])
    np.testing.assert_allclose(out["neighborhood"], [0.625, 1.0, 0.5])
    np.testing.assert_allclose(out["neighborhood_first"], [0.75, 1.0, 0.0])
    np.testing.assert_allclose(out["essence_ppl_diff"], [2.0, -1.0, 10.0])
    np.testing.assert_allclose(out["essence"], [0.6, 1.0, 0.0])
    np.testing.assert_allclose(out["overall"], [(0.5 + 0.7 + 0.625) / 3, (0.8 + 0.525 + 1.0) / 3, (1.0 + FLOOR + 0.5) / 3])
    np.testing.assert_allclose(out["overall_first"], [(0.5 + 0.5 + 0.75) / 3, (0.8 + 0.8 + 1.0) / 3, (1.0 + FLOOR) / 3])
    np.testing.assert_allclose(out["overall_essence"], [(0.5 + 0.7 + 0.625 + 0.6) / 4, (0.8 + 0.525 + 1.0 + 1.0) / 4,
                                                       (1.0 + FLOOR + 0.5 + 0.0) / 4])
    # input untouched
    assert "rewrite" not in df.columns


def test_score_table_default_direction_and_missing_essence():
    df = _table().drop(columns=["direction", "essence_ppl_pre", "essence_ppl_post"])
    out = M.score_table(df, direction="lower")
    np.testing.assert_allclose(out["rewrite"], [0.0, 0.8, 0.0])
    assert out["essence"].isna().all() and out["overall_essence"].isna().all()
    assert out["overall"].notna().all()
    with pytest.raises(KeyError):
        M.score_table(df.drop(columns=["rewrite_pre"]))


def test_score_table_unscaled_columns():
    df = _table()
    df["rewrite_base_post"] = [0.2, 0.3, 0.0]
    df["paraphrase_base_post"] = [[0.3, 0.95], [0.0, 0.0], [0.1]]
    df["neighborhood_base_post"] = [[0.5, 0.5], [0.9], [0.0, 0.1]]
    out = M.score_table(df)
    np.testing.assert_allclose(out["magnitude"], [0.4, -0.2, 1.0])
    np.testing.assert_allclose(out["rewrite_success"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(out["paraphrase_success"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(out["neighborhood_success"], [0.5, 1.0, 0.0])


def test_score_table_nan_rows_stay_nan():
    df = _table()
    df.loc[1, "rewrite_post"] = np.nan
    out = M.score_table(df)
    assert math.isnan(out.loc[1, "rewrite"]) and math.isnan(out.loc[1, "overall"])
    assert out.loc[0, "rewrite"] == pytest.approx(0.5)


def test_score_table_after_parquet_round_trip(tmp_path):
    """List columns come back from parquet as numpy arrays; scores must not change."""
    df = _table()
    path = tmp_path / "edits.parquet"
    df.to_parquet(path)
    back = pd.read_parquet(path)
    a, b = M.score_table(df), M.score_table(back)
    for c in M.SCORE_COLUMNS:
        np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), rtol=0, atol=0, err_msg=c)
