from __future__ import annotations

import json
import logging
import subprocess

import pytest

from helpers import data, zsre
from conftest import FIXTURES

SAMPLE = FIXTURES / "zsre_sample.json"
MALFORMED = FIXTURES / "zsre_malformed.json"


@pytest.fixture()
def raw():
    return json.loads(SAMPLE.read_text())


@pytest.fixture()
def recs():
    return zsre.load_zsre(SAMPLE, check=False)


def test_prompts_and_targets_built_as_specified(recs):
    z = recs[0]
    rr = z.record.requested_rewrite
    assert z.case_id == 0 and z.record.pararel_idx == -1
    assert rr.prompt == "Question: What is the native language of {}? Answer:"
    assert rr.filled == "Question: What is the native language of Danielle Darrieux? Answer:"
    assert rr.subject == "Danielle Darrieux" and rr.relation_id == "zsRE"
    assert rr.target_true == data.Target("French", "")
    assert z.record.paraphrase_prompts == ("Question: Which language did Danielle Darrieux speak natively? Answer:",)
    assert z.loc_prompt == "Question: Who sings the song let it go in frozen Answer:"
    assert z.record.neighborhood_prompts == (z.loc_prompt,)
    assert z.loc_answer == "Idina Menzel"
    assert z.record.attribute_prompts == () and z.record.generation_prompts == ()
    # o_true is answers[0] even when there are several answers
    assert recs[4].record.requested_rewrite.target_true.str == "Samsung"
    assert recs[4].record.requested_rewrite.prompt == "Question: Which company manufactured {}? Answer:"


def test_case_ids_are_positions(recs, raw):
    assert [z.case_id for z in recs] == list(range(len(raw)))


def test_o_false_comes_from_another_record_and_differs(raw):
    for seed in range(20):
        for z in zsre.load_zsre(SAMPLE, seed=seed, check=False):
            rr = z.record.requested_rewrite
            assert z.o_false_from != z.case_id
            assert rr.target_new.str == raw[z.o_false_from]["answers"][0]
            assert rr.target_new.str.casefold() != rr.target_true.str.casefold()
    # records 0 and 6 share o_true "French": neither may receive the other's answer
    draws = {zsre.load_zsre(SAMPLE, seed=s, check=False)[0].o_false_from for s in range(50)}
    assert 6 not in draws and len(draws) > 1


def test_draw_matches_documented_recipe(raw):
    import numpy as np

    rng = np.random.RandomState(0)
    answers = [r["answers"][0].casefold() for r in raw]
    expected = []
    for i in range(len(raw)):
        while True:
            j = int(rng.randint(len(raw) - 1))
            j = j + 1 if j >= i else j
            if answers[j] != answers[i]:
                break
        expected.append(j)
    assert [z.o_false_from for z in zsre.load_zsre(SAMPLE, seed=0, check=False)] == expected


def test_deterministic_with_seed_and_independent_of_n(recs):
    again = zsre.load_zsre(SAMPLE, seed=0, check=False)
    assert [z.to_json() for z in again] == [z.to_json() for z in recs]
    first3 = zsre.load_zsre(SAMPLE, n=3, seed=0, check=False)
    assert [z.to_json() for z in first3] == [z.to_json() for z in recs[:3]]
    assert zsre.load_zsre(SAMPLE, n=0, check=False) == []
    others = [[z.o_false_from for z in zsre.load_zsre(SAMPLE, seed=s, check=False)] for s in (1, 2, 3)]
    assert any(o != [z.o_false_from for z in recs] for o in others)


def test_records_parse_with_the_counterfact_type(recs):
    for z in recs:
        assert data.parse_record(z.record.to_json()) == z.record
        assert data.parse_record(z.to_json()) == z.record  # extra keys ignored


def test_malformed_file_reports_every_bad_record_at_once():
    with pytest.raises(zsre.ZsreDataError) as info:
        zsre.load_zsre(MALFORMED, check=False)
    err = info.value
    assert isinstance(err, ValueError)
    found = {(p.index, p.field) for p in err.problems}
    assert found == {(1, "answers"), (2, "answers"), (3, "src"), (4, "answers"), (4, "loc_ans")}
    msg = str(err)
    assert str(MALFORMED) in msg and "5 problem(s) in 4 zsRE record(s)" in msg
    assert "record 1: field 'answers': missing" in msg
    assert "record 2: field 'answers': empty list" in msg
    assert "record 3: field 'src': subject 'Edwin of Northumbria' not found" in msg
    assert "record 4: field 'answers': expected a list of str, got str" in msg
    assert "record 4: field 'loc_ans': expected str, got int" in msg


def test_problem_report_is_capped(tmp_path, raw):
    bad = [dict(raw[0], answers=[]) for _ in range(30)]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(zsre.ZsreDataError) as info:
        zsre.load_zsre(path, check=False)
    lines = str(info.value).splitlines()
    assert len(info.value.problems) == 30
    assert len(lines) == 1 + 20 + 1 and lines[-1].strip() == "and 10 more"


@pytest.mark.parametrize(
    "mutate, field, problem",
    [
        (lambda r: r.update(src=7), "src", "expected str, got int"),
        (lambda r: r.update(rephrase="  "), "rephrase", "empty"),
        (lambda r: r.pop("loc"), "loc", "missing"),
        (lambda r: r.update(loc="nq question: "), "loc", "no question"),
        (lambda r: r.update(answers=[3]), "answers[0]", "non-empty string"),
        (lambda r: r.update(src="Where is {Autonomous University of Madrid}?"), "src", "brace"),
    ],
)
def test_single_field_problems(tmp_path, raw, mutate, field, problem):
    mutate(raw[2])
    path = tmp_path / "z.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(zsre.ZsreDataError) as info:
        zsre.load_zsre(path, check=False)
    (p,) = info.value.problems
    assert (p.index, p.field) == (2, field) and problem in p.problem


def test_no_possible_o_false(tmp_path, raw):
    path = tmp_path / "same.json"
    path.write_text(json.dumps([raw[0], raw[6]]))  # both "French"
    with pytest.raises(zsre.ZsreDataError, match="no other record has a different answer"):
        zsre.load_zsre(path, check=False)


def test_file_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        zsre.load_zsre(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        zsre.load_zsre(bad)
    obj = tmp_path / "obj.json"
    obj.write_text('{"subject": "x"}')
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list of zsRE records, got dict"):
        zsre.load_zsre(obj)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="holds no zsRE records"):
        zsre.load_zsre(empty)
    with pytest.raises(ValueError, match="n must be"):
        zsre.load_zsre(SAMPLE, n=-1)


def test_nq_question():
    assert zsre.nq_question("nq question: who wrote hamlet") == "Who wrote hamlet"
    assert zsre.nq_question("NQ question:where is paris") == "Where is paris"
    assert zsre.nq_question("who wrote iPhone apps") == "Who wrote iPhone apps"  # no prefix: kept, capitalised


def test_git_blob_sha1_matches_git(tmp_path):
    f = tmp_path / "blob.json"
    f.write_bytes(b'[{"subject": "x"}]\n' * 1000 + "é\0".encode())
    expected = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True, check=True).stdout
    assert zsre.git_blob_sha1(f) == expected.strip()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert zsre.git_blob_sha1(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
    assert zsre.ZSRE_GIT_BLOB == "8546c90abc10b77ebc9fd69de178cf7837ff86dc"


def test_check_warns_on_a_different_blob(caplog):
    with caplog.at_level(logging.WARNING, logger="helpers.zsre"):
        zsre.load_zsre(SAMPLE, n=1, check=False)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="helpers.zsre"):
        recs = zsre.load_zsre(SAMPLE, n=1)
    assert len(recs) == 1
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING and zsre.ZSRE_GIT_BLOB in rec.getMessage()
    assert zsre.git_blob_sha1(SAMPLE) in rec.getMessage()
    assert zsre.check_blob(SAMPLE, expected=zsre.git_blob_sha1(SAMPLE))


def test_to_frame_columns(recs):
    df = zsre.to_frame(recs)
    base = list(data.to_frame([z.record for z in recs]).columns)
    assert list(df.columns) == base + ["loc_prompt", "loc_answer"]
    assert len(df) == len(recs)
    assert df.loc[0, "target_true"] == "French" and df.loc[0, "loc_answer"] == "Idina Menzel"
    assert df.loc[0, "neighborhood_prompts"] == [recs[0].loc_prompt]
    assert df.loc[0, "prompt"].format(df.loc[0, "subject"]) == recs[0].record.requested_rewrite.filled


def test_a_profile_names_a_zsre_file_as_its_data(tmp_path):
    """``data: zsre:<path>`` loads the file through the zsRE recipe into CounterFact records (the data stage's
    loader), and the pre-flight size check counts its records; a malformed file names its bad records."""
    from helpers import pipeline, profile_checks

    recs = data.load_counterfact(f"{data.ZSRE_PREFIX}{SAMPLE}", n=3)
    expected = [z.record for z in zsre.load_zsre(SAMPLE, n=3, check=False)]
    assert recs == expected and len(recs) == 3
    prompt = recs[0].requested_rewrite.prompt
    assert prompt.startswith("Question: ") and prompt.endswith(" Answer:")
    prof = tmp_path / "z.yaml"
    prof.write_text(f"name: z\nmodel: gpt2\ndata: 'zsre:{SAMPLE}'\nn_records: 1000\n")
    notes = profile_checks.preflight(pipeline.load_profile(prof))
    assert any(f"holds {len(json.loads(SAMPLE.read_text()))} records" in n for n in notes)
    with pytest.raises(zsre.ZsreDataError, match="record"):
        data.load_counterfact(f"zsre:{MALFORMED}")
