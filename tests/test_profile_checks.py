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
