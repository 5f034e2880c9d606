"""A profile that asks for more than its data or model holds says so before any work starts."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import pipeline
from helpers.profile_checks import ProfileSizeError, data_records, model_layers, preflight
from conftest import SAMPLE_COUNTERFACT


def _profile(tmp_path, **over):
    prof = {"name": "sizes", "model": "world", "world": "smoke", "data": str(SAMPLE_COUNTERFACT), "n_records": 5,
            "max_facts": 3, "editing": {"layers": [0, 2], "facts": 3}}
    prof.update(over)
    path = tmp_path / "sizes.yaml"
    path.write_text(yaml.safe_dump(prof))
    return pipeline.load_profile(path)


def test_sizes_within_the_data_give_no_notes(tmp_path):
    n = len(json.loads(SAMPLE_COUNTERFACT.read_text()))
    prof = _profile(tmp_path, n_records=n)
    assert data_records(prof) == n and model_layers(prof) == 4
    assert preflight(prof) == []


def test_every_oversized_request_is_named(tmp_path):
    n = len(json.loads(SAMPLE_COUNTERFACT.read_text()))
    prof = _profile(tmp_path, n_records=500, max_facts=900, editing={"layers": [0, 1], "facts": 1000})
    notes = preflight(prof)
    assert notes == [f"n_records = 500, but the data ({SAMPLE_COUNTERFACT}) holds {n} records: all {n} are candidates",
                     f"max_facts = 900, but at most {n} candidate records exist (fewer pass the correctness filter)",
                     "editing.facts = 1000, but max_facts = 900 facts are kept: at most 900 are edited"]


def test_known_facts_count_and_missing_layers_are_an_error(tmp_path):
    prof = _profile(tmp_path, data="known", n_records=2000, editing={"layers": [0, 3, 4, 9], "facts": 2})
    with pytest.raises(ProfileSizeError, match=r"editing.layers \[4, 9\] do not exist: the model has 4 layers"):
        preflight(prof)
    prof = _profile(tmp_path, data="known", n_records=2000, stages=["01_data", "02_tracing"],
                    editing={"layers": [9], "facts": 2})
    assert preflight(prof) == ["n_records = 2000, but the data (known) holds 1209 records: all 1209 are candidates"]


def test_the_run_refuses_before_any_stage(tmp_path, model_dirs):
    prof = {"name": "sizes", "model": str(model_dirs["gpt2"]), "data": str(SAMPLE_COUNTERFACT), "n_records": 5,
            "editing": {"layers": [0, 7], "facts": 3}}
    path = tmp_path / "sizes.yaml"
    path.write_text(yaml.safe_dump(prof))
    with pytest.raises(ProfileSizeError, match=r"\[7\] do not exist: the model has 3 layers"):
        pipeline.run(path, book_dir=tmp_path / "book", results_root=tmp_path / "results")
    assert not list((tmp_path / "results" / "sizes" / ".stages").glob("*.json"))


def test_cells_of_their_own_size_are_validated_and_used(tmp_path, monkeypatch):
    """``editing.cells`` gives one cell its own facts and layers: only cells the profile runs, only those two keys;
    the preflight checks their layers and facts; the study edits them at those sizes and computes second moments
    for exactly the layers its ROME cells edit."""
    import pandas as pd

    from helpers import tables
    from helpers.study import Study

    editing = {"layers": [0, 2], "facts": 3, "methods": ["ft1", "rome"], "problems": ["ei", "ff"],
               "cells": {"rome__ff": {"facts": 1, "layers": [1]}}}
    prof = _profile(tmp_path, editing=editing)
    assert prof.editing["cells"] == {"rome__ff": {"facts": 1, "layers": [1]}} and preflight(prof) == []
    for cells, match in [({"memit__ei": {"facts": 1}}, "not a cell this profile runs"),
                         ({"rome": {"facts": 1}}, "not a cell this profile runs"),
                         ({"rome__ei": {"facts": 1, "window": 3}}, "sets only facts and layers")]:
        with pytest.raises(ValueError, match=match):
            _profile(tmp_path, editing={**editing, "cells": cells})
    big = _profile(tmp_path, editing={**editing, "cells": {"ft1__ei": {"facts": 9, "layers": [1, 7]}}})
    with pytest.raises(ProfileSizeError, match=r"editing.cells.ft1__ei.layers \[7\] do not exist"):
        preflight(big)

    prof = _profile(tmp_path, editing=editing)  # (each _profile call rewrites the same file)
    monkeypatch.setattr(Study, "n_layers", property(lambda self: 4))
    study = Study.open(str(prof.path), tmp_path / "res", tmp_path / "cache", load=False)
    tables.write_table(pd.DataFrame({"case_id": [10, 11, 12, 13], "kept": [True] * 4}), study.results / "facts.parquet")
    assert list(study.cell_facts("rome", "ff")["case_id"]) == [10] and study.cell_layers("rome", "ff") == [1]
    assert list(study.cell_facts("rome", "ei")["case_id"]) == [10, 11, 12] and study.cell_layers("rome", "ei") == [0, 2]
    monkeypatch.setattr(Study, "model", property(lambda self: None))
    monkeypatch.setattr("helpers.editing.edit_layers", lambda model, method, c, hp=None: [c])
    assert study.stats_layers() == [0, 1, 2]  # ROME's cells: EI at 0 and 2, FF at 1; FT-1 needs none
