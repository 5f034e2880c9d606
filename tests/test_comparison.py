"""The chapters' side-by-side tables and generated comparison sentences (helpers.comparison): known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import comparison, paper


def _row(**kw) -> pd.Series:
    base = {"r2_layer": 0.6, "r2_trace": 0.05, "r2_both": 0.62, "diff": 0.02, "p_value": 0.3, "n": 120,
            "n_facts": 20, "n_layers": 6, "diff_lo": 0.01, "diff_hi": 0.04, "r2_layer_lo": 0.5, "r2_layer_hi": 0.7}
    return pd.Series({**base, **kw})


def test_number_formats():
    assert comparison.ci_text(0.9471, 0.93, 0.96) == "0.947 [0.930, 0.960]"
    assert comparison.ci_text(0.5, np.nan, np.nan) == "0.500"
    assert comparison.ci_text(np.nan, 0.1, 0.2) == "–"
    assert comparison.p_text(3e-6) == "< 1e-4" and comparison.p_text(0.0312) == "0.031" and comparison.p_text(np.nan) == "–"


@pytest.mark.parametrize("diff, hi, expected", [
    (0.001, 0.004, "small, as in the paper"),
    (0.02, 0.09, "too few facts to rule out a larger gain"),
    (0.12, 0.2, "larger than the paper's"),
    (np.nan, np.nan, "cannot be estimated"),
])
def test_gain_verdict(diff, hi, expected):
    assert expected in comparison.gain_verdict(diff, hi, 0.001)


def test_table1_side_by_side_puts_the_paper_first_and_intervals_beside_each_study():
    p1 = paper.table1().iloc[0]
    t = comparison.table1_side_by_side({"A": _row(), "B": _row(r2_layer=0.1, diff=0.2, diff_lo=np.nan, diff_hi=np.nan)}, p1)
    assert list(t.columns) == [comparison.PAPER_LABEL, "A", "B"]
    assert t.loc["R² layer", comparison.PAPER_LABEL] == "0.947"
    assert t.loc["R² layer", "A"] == "0.600 [0.500, 0.700]"
    assert t.loc["added by tracing", "A"] == "0.020 [0.010, 0.040]" and t.loc["added by tracing", "B"] == "0.200"
    assert t.loc["edits (facts × layers)", "A"] == "20 × 6" and t.loc["edits (facts × layers)", comparison.PAPER_LABEL] == "652 × 9"
    tidy = comparison.tidy_regressions({"A": _row()})
    assert tidy.set_index("quantity").loc["diff", ["value", "lo", "hi"]].tolist() == [0.02, 0.01, 0.04]


def test_table1_sentence_says_where_a_study_disagrees():
    p1 = paper.table1().iloc[0]
    agree = comparison.table1_sentence("SmolLM2", _row(), p1)
    assert agree.startswith("SmolLM2: R² 0.600 (layer), 0.050 (tracing), 0.620 (both) against GPT-J's 0.947 / 0.016 / 0.948")
    assert "the layer explains far more than tracing, as in GPT-J" in agree and "F-test p 0.3" in agree
    flip = comparison.table1_sentence("W", _row(r2_layer=0.1, r2_trace=0.3, diff=0.2, diff_hi=0.3), p1)
    assert "unlike in GPT-J, tracing alone explains at least as much" in flip and "larger than the paper's" in flip
    assert "did not run ROME" in comparison.table1_sentence("X", _row(n=0), p1)
    assert "the fits are degenerate" in comparison.table1_sentence("D", _row(r2_layer=np.nan, r2_trace=np.nan), p1)


def test_meaning_sentence_scales_the_model_and_reads_the_interval():
    small = comparison.meaning_sentence("S", 134_515_008, _row(diff=0.004, diff_hi=0.01))
    assert "a model 45 times smaller than GPT-J" in small and "conclusion holds" in small
    assert "too wide" in comparison.meaning_sentence("S", 134_515_008, _row(diff=0.01, diff_hi=0.08))
    assert "does not carry over" in comparison.meaning_sentence("S", 134_515_008, _row(diff=0.2, diff_hi=0.3))


def test_cells_side_by_side_lists_only_the_cells_run_and_blanks_a_study_that_skipped_one():
    def reg(cells):
        return pd.DataFrame([{"problem": p, "method": m, "metric": "rewrite", "r2_layer": 0.5, "r2_trace": 0.1,
                              "r2_both": 0.52, "diff": d, "diff_lo": d - 0.01, "diff_hi": d + 0.01, "p_value": 0.01}
                             for p, m, d in cells])
    regs = {"A": reg([("ff", "rome", 0.03), ("ei", "rome", 0.001)]), "B": reg([("ei", "rome", 0.002), ("ei", "ft1", 0.0)])}
    t = comparison.cells_side_by_side(regs)
    # paper order: problems then methods; only the three cells some study ran
    assert list(t.index) == [("Error Injection", "FT-1"), ("Error Injection", "ROME"), ("Fact Forcing", "ROME")]
    assert t.loc[("Error Injection", "ROME"), (comparison.PAPER_LABEL, "added")] == "0.001"
    assert t.loc[("Fact Forcing", "ROME"), ("A", "added [95% CI]")] == "0.030 [0.020, 0.040]"
    assert t.loc[("Fact Forcing", "ROME"), ("B", "added [95% CI]")] == ""  # B did not run it
    assert t.loc[("Error Injection", "FT-1"), ("B", "F-test p")] == "0.01"


def test_largest_gain_skips_degenerate_fits():
    reg = pd.DataFrame({"problem": ["ei", "ff", "fa"], "method": ["rome"] * 3, "metric": ["rewrite"] * 3,
                        "diff": [0.01, np.nan, 0.03]})
    assert comparison.largest_gain(reg)["problem"] == "fa"
    assert comparison.largest_gain(reg.assign(diff=np.nan)) is None
    assert comparison.cell_name("ff", "ft5") == "Fact Forcing with FT-5"


def test_largest_gain_leaves_out_small_cells_while_a_sized_cell_exists():
    """A cell of few facts or layers, whose tracing effect can fit each fact, does not set the maximum."""
    reg = pd.DataFrame({"problem": ["ei", "ei", "ff", "ei"], "method": ["rome", "ft5", "ft1", "memit"],
                        "metric": ["rewrite"] * 4, "diff": [0.002, 0.866, 0.363, 0.612],
                        "n_facts": [50, 10, 20, 20], "n_layers": [6, 2, 3, 2]})
    assert comparison.MIN_FACTS_FOR_MAX == 20 and comparison.MIN_LAYERS_FOR_MAX == 3
    assert list(comparison.sized_for_max(reg)) == [True, False, True, False]
    assert comparison.largest_gain(reg)["method"] == "ft1"  # 20 facts x 3 layers: sized; 0.866 and 0.612 are not
    assert comparison.largest_gain(reg.iloc[:2])["method"] == "rome"
    small = reg.assign(n_facts=5)  # no cell is sized: the maximum over all of them
    assert comparison.largest_gain(small)["method"] == "ft5"
    note = comparison.small_cells_note(reg)
    assert note.startswith("2 smaller cell(s)") and "0.866 for Error Injection with FT-5, 10 facts × 2 layers" in note
    assert comparison.small_cells_note(small).startswith("Every cell here has fewer than 20 facts or 3 layers")
    assert comparison.small_cells_note(reg.iloc[:1]) == ""  # every cell sized: nothing to say


def test_open_studies_reads_a_book_profile_like_the_pipeline(tmp_path):
    """A reader's own kernel (the explorer run live) passes only the book's profile and results folder: the
    studies are found where the pipeline wrote them."""
    from helpers import pipeline
    from helpers.study import open_studies

    book = pipeline.load_profile("quick")
    got = open_studies("quick", tmp_path / "quick", tmp_path / "cache")
    assert list(got) == ["smollm2", "world"]
    assert got["world"].results == tmp_path / "quick" / "world"
    assert got["world"].profile.path == book.study_profiles()["world"].path
    assert got["smollm2"].label == "SmolLM2-135M"
    single = open_studies("smoke", tmp_path / "smoke", tmp_path / "cache")
    assert list(single) == ["smoke"] and single["smoke"].results == tmp_path / "smoke"
