from __future__ import annotations

import copy
import json

import pytest

from helpers import data
from conftest import SAMPLE_COUNTERFACT


@pytest.fixture()
def raw():
    return json.loads(SAMPLE_COUNTERFACT.read_text())


def test_loads_official_schema_and_flattens(raw):
    recs = data.load_counterfact(SAMPLE_COUNTERFACT)
    assert [r.case_id for r in recs] == list(range(5))
    r0 = recs[0]
    assert r0.requested_rewrite.filled == "The mother tongue of Danielle Darrieux is"
    assert r0.requested_rewrite.target_true == data.Target("French", "Q150")
    assert len(r0.paraphrase_prompts) == 2 and len(r0.neighborhood_prompts) == 10
    assert r0.to_json() == raw[0]  # round trip, every field kept
    df = data.to_frame(recs)
    assert list(df["target_new"]) == ["English", "Islam", "piano", "Sweden", "English"]
    assert df.loc[0, "paraphrase_prompts"] == raw[0]["paraphrase_prompts"]


def test_first_n_and_folder(raw, tmp_path):
    (tmp_path / "counterfact.json").write_text(json.dumps(raw))
    first = data.load_counterfact(tmp_path, n=2)
    assert [r.case_id for r in first] == [raw[0]["case_id"], raw[1]["case_id"]]  # the file's first two, in order
    assert [r.to_json() for r in first] == raw[:2]


@pytest.mark.parametrize(
    "mutate, field, problem",
    [
        (lambda r: r["requested_rewrite"].pop("subject"), "requested_rewrite.subject", "missing"),
        (lambda r: r["requested_rewrite"].__setitem__("prompt", "The mother tongue is"), "requested_rewrite.prompt", "exactly one"),
        (lambda r: r["requested_rewrite"]["target_new"].__setitem__("str", "  "), "requested_rewrite.target_new.str", "empty"),
        (lambda r: r["requested_rewrite"]["target_new"].__setitem__("str", r["requested_rewrite"]["target_true"]["str"]), "requested_rewrite.target_new", "equals target_true"),
        (lambda r: r.__setitem__("paraphrase_prompts", "not a list"), "paraphrase_prompts", "expected list"),
        (lambda r: r["neighborhood_prompts"].__setitem__(3, 7), "neighborhood_prompts[3]", "non-empty string"),
        (lambda r: r.__setitem__("case_id", "3"), "case_id", "expected int"),
    ],
)
def test_malformed_records_name_case_and_field(raw, mutate, field, problem):
    bad = copy.deepcopy(raw)
    mutate(bad[2])
    with pytest.raises(data.RecordError) as info:
        data.parse_records(bad)
    msg = str(info.value)
    assert f"field {field!r}" in msg and problem in msg
    assert ("case_id=2" in msg) or field == "case_id"


def test_subject_that_tokenizes_to_nothing(raw, tokenizer):
    recs = data.parse_records(raw)
    data.validate_tokens(recs, tokenizer)  # the fixture is fine
    bad = copy.deepcopy(raw)
    bad[1]["requested_rewrite"]["subject"] = "\u200b"
    rec = data.parse_records(bad)
    tok_nothing = type("T", (), {"__call__": lambda self, text, add_special_tokens=False: {"input_ids": [] if text == "\u200b" else [1]}})()
    with pytest.raises(data.RecordError, match=r"case_id=1: field 'requested_rewrite.subject': tokenizes to nothing"):
        data.validate_tokens(rec, tok_nothing)


def test_not_a_list_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="JSON list"):
        data.parse_records({"case_id": 0})
    p = tmp_path / "cf.json"
    p.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.load_counterfact(p)


def test_offline_download_error_says_how_to_supply(tmp_path):
    with pytest.raises(OSError, match="pass its path as the profile's `data:`"):
        data.fetch_official(tmp_path, url="http://127.0.0.1:9/counterfact.json")
    assert not list((tmp_path / "data").glob("*.json"))  # nothing half-written


def test_correctness_rule():
    from helpers.generation import is_correct

    assert is_correct("  french, and also English", "French ")
    assert not is_correct("English", "French")
