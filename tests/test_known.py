"""helpers.known: the vendored known_1000 facts and the CounterFact-schema records built from them."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict

import pytest

from helpers import data, known


@pytest.fixture(scope="module")
def facts() -> list[dict]:
    return known.load_known()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return known.known_records(seed=0)


@pytest.fixture(scope="module")
def by_known_id(facts) -> dict[int, dict]:
    return {f["known_id"]: f for f in facts}


@pytest.fixture(scope="module")
def by_filled(facts) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for f in facts:
        out[f["template"].format(f["subject"])].append(f)
    return out


def test_vendored_file_is_romes(facts):
    path = known.known_path()
    assert path == known.VENDORED_PATH
    assert hashlib.sha256(path.read_bytes()).hexdigest() == known.KNOWN_SHA256
    assert len(facts) == known.KNOWN_FACTS == 1209
    assert len({f["relation_id"] for f in facts}) == 33
    assert (known.VENDORED_PATH.parent / "LICENSE-known_1000.txt").read_text().count("Kevin Meng") >= 1


def test_tampered_copy_is_refused(tmp_path):
    raw = known.VENDORED_PATH.read_bytes()
    bad = tmp_path / "known_1000.json"
    bad.write_bytes(raw.replace(b"Vinson Massif", b"Vinson Massiv", 1))
    got = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(known.KnownDataError) as err:
        known.load_known(bad)
    msg = str(err.value)
    assert str(bad) in msg and known.KNOWN_SHA256 in msg and got in msg
    assert isinstance(err.value, ValueError)
    assert len(known.load_known(bad, sha256=None)) == 1209  # still valid JSON facts when unchecked


def _write(tmp_path, items) -> object:
    p = tmp_path / "facts.json"
    p.write_text(json.dumps(items))
    return p


def test_all_bad_records_reported_at_once(tmp_path, facts):
    items = [dict(f) for f in facts[:12]]
    items[3]["subject"] = "  "
    items[5]["template"] = "no placeholder here"
    del items[7]["relation_id"]
    items[8]["attribute"] = 42
    items[9]["known_id"] = items[10]["known_id"]
    items[11]["template"] = "{} and {}"
    with pytest.raises(known.KnownDataError) as err:
        known.load_known(_write(tmp_path, items), sha256=None)
    msg = str(err.value)
    assert "6 problem(s)" in msg and "facts.json" in msg
    for kid, fld in ((3, "subject"), (5, "template"), (7, "relation_id"), (8, "attribute"), (10, "known_id"),
                     (11, "template")):
        assert f"known_id={kid}: field {fld!r}" in msg, (kid, fld)
    assert "duplicate" in msg and "exactly one" in msg
    assert "known_id=0:" not in msg and "known_id=4:" not in msg


def test_problem_list_is_capped(tmp_path, facts):
    items = [dict(f, subject="") for f in facts[:25]]
    with pytest.raises(known.KnownDataError) as err:
        known.load_known(_write(tmp_path, items), sha256=None)
    msg = str(err.value)
    assert "25 problem(s)" in msg and "and 5 more" in msg
    assert msg.count("field 'subject'") == known.MAX_PROBLEM_LINES


def test_not_a_list_or_not_json(tmp_path):
    with pytest.raises(known.KnownDataError, match="non-empty JSON list"):
        known.load_known(_write(tmp_path, {"a": 1}), sha256=None)
    p = tmp_path / "broken.json"
    p.write_text("[{")
    with pytest.raises(known.KnownDataError, match="not valid JSON"):
        known.load_known(p, sha256=None)


def test_deterministic_in_seed(records):
    again = known.known_records(seed=0)
    assert json.dumps(again) == json.dumps(records)
    other = known.known_records(seed=1)
    assert len(other) == len(records)
    new0 = [r["requested_rewrite"]["target_new"]["str"] for r in records]
    new1 = [r["requested_rewrite"]["target_new"]["str"] for r in other]
    assert new0 != new1


def test_every_record_parses(records):
    parsed = data.parse_records(records)
    assert [r.case_id for r in parsed] == list(range(len(records)))
    assert all(r.pararel_idx == -1 for r in parsed)
    assert all(len(r.paraphrase_prompts) == 2 for r in parsed)
    assert all(len(r.neighborhood_prompts) <= 10 and 1 <= len(r.attribute_prompts) <= 10 for r in parsed)
    assert len(data.to_frame(parsed)) == len(records)


def test_left_out_only_relation_without_other_objects(records, facts):
    kept = {r["known_id"] for r in records}
    dropped = [f for f in facts if f["known_id"] not in kept]
    objects = defaultdict(set)
    for f in facts:
        objects[f["relation_id"]].add(f["attribute"])
    assert [f["relation_id"] for f in dropped] == ["P190"]
    assert all(len(objects[f["relation_id"]]) == 1 for f in dropped)
    assert len(records) == 1208


def test_targets(records, by_known_id, facts):
    objects = defaultdict(set)
    for f in facts:
        objects[f["relation_id"]].add(f["attribute"])
    for r in records:
        rr, fact = r["requested_rewrite"], by_known_id[r["known_id"]]
        assert rr["subject"] == fact["subject"] and rr["prompt"] == fact["template"]
        assert rr["target_true"]["str"] == fact["attribute"]
        new = rr["target_new"]["str"]
        assert new.strip().lower() != rr["target_true"]["str"].strip().lower()
        assert new in objects[rr["relation_id"]]
        assert rr["target_new"]["id"] == f"known:{rr['relation_id']}:{new}"
        assert rr["target_true"]["id"] == f"known:{rr['relation_id']}:{fact['attribute']}"


def test_paraphrases(records, facts):
    templates = defaultdict(set)
    for f in facts:
        templates[f["relation_id"]].add(f["template"])
    for r in records:
        rr = r["requested_rewrite"]
        own = rr["prompt"].format(rr["subject"])
        allowed = templates[rr["relation_id"]] | set(known.RELATION_PHRASINGS.get(rr["relation_id"], []))
        tails = []
        for p in r["paraphrase_prompts"]:
            assert own not in p, (own, p)
            assert rr["subject"] in p
            lead, tail = next((p[: -len(t.format(rr["subject"]))], t) for t in sorted(allowed, key=len, reverse=True)
                              if p.endswith(" " + t.format(rr["subject"])))
            assert tail != rr["prompt"] and lead.strip() in known.BUILTIN_SENTENCES
            tails.append(tail)
        assert len(set(tails)) == 2  # the vendored file always has two other phrasings


def test_corpus_sentences_are_used():
    corpus = ["Alpha beta gamma delta.", "Epsilon zeta eta theta.", "Iota kappa lambda mu.", ""]
    recs = known.known_records(seed=3, corpus_sentences=corpus)
    leads = Counter(p.split(".")[0] + "." for r in recs for p in r["paraphrase_prompts"])
    assert set(leads) <= set(corpus[:3]) and len(leads) == 3
    with pytest.raises(ValueError, match="no non-empty"):
        known.known_records(corpus_sentences=["", "  "])


def test_neighbourhood_prompts(records, by_filled):
    n_prompts = 0
    for r in records:
        rr = r["requested_rewrite"]
        assert len(set(r["neighborhood_prompts"])) == len(r["neighborhood_prompts"])
        for p in r["neighborhood_prompts"]:
            matches = [f for f in by_filled[p] if f["relation_id"] == rr["relation_id"]
                       and f["attribute"] == rr["target_true"]["str"] and f["subject"] != rr["subject"]]
            assert matches, (r["case_id"], p)
            n_prompts += 1
    assert n_prompts > 5000


def test_attribute_prompts(records, by_filled):
    for r in records:
        rr = r["requested_rewrite"]
        for p in r["attribute_prompts"]:
            assert any(f["relation_id"] == rr["relation_id"] and f["attribute"] == rr["target_new"]["str"]
                       for f in by_filled[p]), (r["case_id"], p)


def test_facts_without_neighbour(records, facts):
    lonely = {f["known_id"] for f in facts
              if not any(g["relation_id"] == f["relation_id"] and g["attribute"] == f["attribute"]
                         and g["known_id"] != f["known_id"] for g in facts)}
    assert len(lonely) == 237
    kept = {r["known_id"] for r in records}
    empty = {r["known_id"] for r in records if not r["neighborhood_prompts"]}
    assert empty == lonely & kept
    assert len(empty) == 236  # the P190 fact (no neighbour, no counterfactual object) is left out


def test_write_and_load(tmp_path, records):
    dest = known.write_known_counterfact(tmp_path / "out" / "known_cf.json", seed=0)
    assert dest == tmp_path / "out" / "known_cf.json"
    assert json.loads(dest.read_text(encoding="utf-8")) == records
    loaded = data.load_counterfact(dest)
    assert len(loaded) == len(records)
    assert loaded[5].requested_rewrite.subject == records[5]["requested_rewrite"]["subject"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["known_cf.json"]  # no temp file left
    folder = known.write_known_counterfact(tmp_path / "out", seed=0)
    assert folder.name == "counterfact.json" and len(data.load_counterfact(tmp_path / "out")) == len(records)
