"""Bad CounterFact input is reported all at once: every bad record, with its case_id and field, in one error."""

from __future__ import annotations

import copy
import json

import pytest

from helpers import data
from conftest import SAMPLE_COUNTERFACT


@pytest.fixture()
def raw():
    return json.loads(SAMPLE_COUNTERFACT.read_text())


def many(raw: list[dict], k: int) -> list[dict]:
    """``k`` copies of the fixture's records with distinct case_ids."""
    out = []
    for i in range(k):
        rec = copy.deepcopy(raw[i % len(raw)])
        rec["case_id"] = i
        out.append(rec)
    return out


def test_every_bad_record_is_reported_in_one_error(raw, tmp_path):
    bad = many(raw, 7)
    bad[1]["requested_rewrite"].pop("relation_id")  # missing field
    bad[2]["paraphrase_prompts"] = "not a list"  # wrong type
    bad[3]["requested_rewrite"]["prompt"] = "The mother tongue is"  # no {}
    bad[4]["requested_rewrite"]["target_new"]["str"] = bad[4]["requested_rewrite"]["target_true"]["str"]
    bad[6]["requested_rewrite"]["subject"] = "  "  # empty subject
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(data.RecordError) as info:  # a RecordError, so existing handlers still catch it
        data.load_counterfact(path)
    err = info.value
    assert isinstance(err, data.RecordErrors) and isinstance(err, ValueError)
    expected = [
        (1, "requested_rewrite.relation_id", "missing"),
        (2, "paraphrase_prompts", "expected list, got str"),
        (3, "requested_rewrite.prompt", "must contain exactly one '{}'"),
        (4, "requested_rewrite.target_new", "equals target_true"),
        (6, "requested_rewrite.subject", "empty subject"),
    ]
    assert [(e.case_id, e.field) for e in err.errors] == [(c, f) for c, f, _ in expected]
    msg = str(err)
    lines = msg.splitlines()
    assert lines[0] == "5 bad CounterFact records (5 problems):"
    for line, (case_id, fld, problem) in zip(lines[1:], expected):
        assert line.startswith(f"  case_id={case_id}: field {fld!r}: {problem}")
    assert len(lines) == 6 and "more" not in msg
    assert (err.case_id, err.field) == (1, "requested_rewrite.relation_id")  # the first problem's attributes


def test_every_problem_of_one_record_is_reported(raw):
    bad = copy.deepcopy(raw)
    rr = bad[2]["requested_rewrite"]
    rr["prompt"], rr["subject"] = "no slot", ""
    bad[2]["neighborhood_prompts"][1] = 7
    bad[2]["neighborhood_prompts"][4] = ""
    with pytest.raises(data.RecordErrors) as info:
        data.parse_records(bad)
    fields = [e.field for e in info.value.errors]
    assert fields == ["requested_rewrite.prompt", "requested_rewrite.subject", "neighborhood_prompts[1]",
                      "neighborhood_prompts[4]"]
    assert str(info.value).splitlines()[0] == "1 bad CounterFact record (4 problems):"


def test_more_than_twenty_are_capped_with_the_count(raw):
    bad = many(raw, 30)
    for rec in bad:
        rec["requested_rewrite"]["subject"] = ""
    with pytest.raises(data.RecordErrors) as info:
        data.parse_records(bad)
    lines = str(info.value).splitlines()
    assert len(info.value.errors) == 30 and len(lines) == 1 + data.MAX_ERROR_LINES + 1
    assert lines[0] == "30 bad CounterFact records (30 problems):"
    assert lines[1] == "  case_id=0: field 'requested_rewrite.subject': empty subject"
    assert lines[20].startswith("  case_id=19:")
    assert lines[-1] == "  ... and 10 more bad records (10 more problems not listed)"


def test_one_problem_reads_like_a_single_record_error(raw):
    bad = copy.deepcopy(raw)
    bad[3]["requested_rewrite"]["subject"] = ""
    with pytest.raises(data.RecordError) as info:
        data.parse_records(bad)
    assert str(info.value) == str(data.RecordError(3, "requested_rewrite.subject", "empty subject"))
    assert str(info.value) == "CounterFact record case_id=3: field 'requested_rewrite.subject': empty subject"


def test_only_the_first_n_are_validated(raw):
    bad = many(raw, 6)
    bad[5]["requested_rewrite"]["subject"] = ""
    assert [r.case_id for r in data.parse_records(bad, n=5)] == list(range(5))


def test_good_path_is_unchanged(raw):
    recs = data.parse_records(raw)
    assert [r.to_json() for r in recs] == raw
    assert [r.case_id for r in data.load_counterfact(SAMPLE_COUNTERFACT, n=3)] == [0, 1, 2]


def test_validate_tokens_reports_every_problem(raw):
    recs = data.parse_records(raw)
    empty = {recs[0].requested_rewrite.subject, " " + recs[2].requested_rewrite.target_new.str}

    def tok(text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [] if text in empty else [1]}

    with pytest.raises(data.RecordErrors) as info:
        data.validate_tokens(recs, tok)
    assert [(e.case_id, e.field) for e in info.value.errors] == [
        (0, "requested_rewrite.subject"), (2, "requested_rewrite.target_new.str")]
    assert "tokenizes to nothing" in str(info.value).splitlines()[2]
