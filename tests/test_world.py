"""Tests of the embedded world: generation, records, tokenizer, training determinism, caching, learning."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers.world import WORLD_PRESETS, TrainConfig, WorldConfig, build_world, ensure_world_model
from helpers.world.generate import RELATION_BY_ID, RELATIONS
from helpers.tracing import subject_range
from helpers.world.report import target_scores
from helpers.world.tokenizer import subject_token_lengths, train_tokenizer
from helpers.world.train import make_model, train_model

SMOKE_WORLD, SMOKE_TRAIN = WORLD_PRESETS["smoke"]


@pytest.fixture(scope="module")
def world():
    return build_world(SMOKE_WORLD)


@pytest.fixture(scope="module")
def tok(world):
    return train_tokenizer(world, SMOKE_TRAIN.vocab_size, seed=SMOKE_WORLD.seed)


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory):
    torch.set_num_threads(1)
    return ensure_world_model("smoke", tmp_path_factory.mktemp("cache"), progress=False)


def test_generation_is_deterministic(world):
    again = build_world(SMOKE_WORLD)
    assert again.records == world.records
    assert again.corpus == world.corpus
    other = build_world(dataclasses.replace(SMOKE_WORLD, seed=1))
    assert other.corpus != world.corpus


def test_presets_and_relations():
    assert {"smoke", "default"} <= set(WORLD_PRESETS)
    for wc, tc in WORLD_PRESETS.values():
        assert isinstance(wc, WorldConfig) and isinstance(tc, TrainConfig)
    assert WORLD_PRESETS["default"][1].n_layer >= 8
    assert len(RELATIONS) >= 10
    for rel in RELATIONS:
        assert len(rel.templates) >= 4 and all(t.count("{}") == 1 for t in rel.templates)
        assert len(set(rel.objects)) == len(rel.objects) >= 4


def test_every_record_has_the_official_schema(world):
    subjects_by_rel_obj = {}
    for e in world.entities:
        for rid, o in e.attributes.items():
            subjects_by_rel_obj.setdefault((rid, o), set()).add(e.name)
    seen = set()
    shared = [f for f in world.facts if len(subjects_by_rel_obj[(f.relation_id, f.object)]) > 1]
    assert len(world.records) == len(shared) > len(world.facts) // 2  # facts nobody else shares: no record
    for pos, r in enumerate(world.records):
        assert set(r) == {"case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts",
                          "neighborhood_prompts", "attribute_prompts", "generation_prompts"}
        assert r["case_id"] == pos and isinstance(r["pararel_idx"], int)
        rw = r["requested_rewrite"]
        assert set(rw) == {"prompt", "relation_id", "target_new", "target_true", "subject"}
        assert rw["prompt"].count("{}") == 1 and rw["prompt"] in RELATION_BY_ID[rw["relation_id"]].templates
        for t in ("target_true", "target_new"):
            assert set(rw[t]) == {"str", "id"} and isinstance(rw[t]["str"], str) and rw[t]["id"].startswith("Q")
            assert rw[t]["str"] == rw[t]["str"].strip() and rw[t]["str"] in RELATION_BY_ID[rw["relation_id"]].objects
        assert rw["target_true"]["str"] != rw["target_new"]["str"]
        assert rw["subject"] in rw["prompt"].format(rw["subject"])
        assert len(r["paraphrase_prompts"]) == 2
        assert all(rw["subject"] in p and "{}" not in p for p in r["paraphrase_prompts"])
        same = subjects_by_rel_obj[(rw["relation_id"], rw["target_true"]["str"])] - {rw["subject"]}
        n_phrasings = len(RELATION_BY_ID[rw["relation_id"]].templates)
        assert len(r["neighborhood_prompts"]) == min(10, len(same) * n_phrasings) >= 4  # as many as CounterFact
        assert len(set(r["neighborhood_prompts"])) == len(r["neighborhood_prompts"])  # distinct prompts
        about = {s for p in r["neighborhood_prompts"] for s in same if s in p}
        assert len(about) == min(10, len(same))  # every other subject before any repeats
        for p in r["neighborhood_prompts"]:
            assert rw["subject"] not in p and any(s in p for s in same)
        assert r["attribute_prompts"]  # target_new is some other subject's object
        assert all(isinstance(p, str) for p in r["attribute_prompts"] + r["generation_prompts"])
        assert len(r["generation_prompts"]) == 10
        key = (rw["subject"], rw["relation_id"])
        assert key not in seen  # one record per (subject, relation)
        seen.add(key)
    json.dumps(world.records)  # plain JSON


def test_frequencies_are_uneven_and_match_the_corpus(world):
    freqs = sorted(f.frequency for f in world.facts)
    median = max(1, freqs[len(freqs) // 2])
    assert freqs[-1] >= 4 * median  # a Zipf-like head ...
    assert freqs[len(freqs) // 10] <= median / 2  # ... and a tail of rarely mentioned facts
    # the total number of fact mentions equals the sum of frequencies (corpus covers each exactly)
    assert abs(sum(freqs) - SMOKE_WORLD.total_mentions) < 0.05 * SMOKE_WORLD.total_mentions
    f = max(world.facts, key=lambda f: f.frequency)
    text = " ".join(world.corpus)
    assert text.count(f.subject) >= f.frequency // 3


def test_tokenizer_is_gpt2_like(world, tok):
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    ids = tok.encode("Paris is nice")
    assert tok.eos_token_id not in ids  # no BOS/EOS added
    ids = tok.encode("The mother tongue of Bob is French")
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == "The mother tongue of Bob is French"
    assert " French" in pieces  # a word's token carries its leading space
    lengths = subject_token_lengths(tok, [e.name for e in world.entities])
    assert sum(lengths) / len(lengths) >= 2
    rw = world.records[0]["requested_rewrite"]
    b, e = subject_range(tok, rw["prompt"].format(rw["subject"]), rw["subject"])
    assert e - b >= 2


def test_training_is_deterministic(world, tok):
    torch.set_num_threads(1)
    cfg = dataclasses.replace(SMOKE_TRAIN, epochs=1, eval_every=10_000)
    small = dataclasses.replace(world, corpus=world.corpus[:40], index_corpus=world.index_corpus[:10])
    m1, rows1 = train_model(small, cfg, tok, progress=False)
    m2, rows2 = train_model(small, cfg, tok, progress=False)
    assert len(rows1) >= 2
    assert [r["loss"] for r in rows1] == [r["loss"] for r in rows2]
    for (n, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p1, p2), n
    fresh = make_model(cfg, tok).state_dict()
    assert not torch.equal(fresh["transformer.h.0.mlp.c_fc.weight"], m1.state_dict()["transformer.h.0.mlp.c_fc.weight"])


def test_smoke_model_learns_its_facts(smoke_folder):
    from helpers.models import load_model

    model, tok = load_model(smoke_folder)
    records = json.loads((smoke_folder / "counterfact.json").read_text())
    for name in ("config.json", "model.safetensors", "corpus.txt", "train_log.csv", "world.json", "facts.csv"):
        assert (smoke_folder / name).exists(), name
    rws = [r["requested_rewrite"] for r in records]
    prompts = [rw["prompt"].format(rw["subject"]) for rw in rws]
    true = target_scores(model, tok, prompts, [rw["target_true"]["str"] for rw in rws])
    new = target_scores(model, tok, prompts, [rw["target_new"]["str"] for rw in rws])
    acc = true["argmax_correct"].mean()
    n_objects = min(len(RELATION_BY_ID[rw["relation_id"]].objects) for rw in rws)
    assert acc > 2 / n_objects, acc  # at least twice chance (chance is at most 1/6)
    assert (true["p"] > new["p"]).mean() > 0.7


def test_cache_reuses_the_folder(smoke_folder):
    stamp = (smoke_folder / "model.safetensors").stat().st_mtime_ns
    again = ensure_world_model("smoke", smoke_folder.parent.parent, progress=False)
    assert again == smoke_folder
    assert (smoke_folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in smoke_folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_generator_version_is_part_of_the_cache_key(monkeypatch, tmp_path):
    from helpers.world import generate, world_folder

    before = world_folder("smoke", tmp_path)
    monkeypatch.setattr(generate, "GENERATOR_VERSION", generate.GENERATOR_VERSION + 1)
    assert world_folder("smoke", tmp_path) != before  # a world made by other generator code is not reused


def test_added_options_at_their_defaults_keep_the_cache_key():
    """Options added after worlds were cached leave the key unchanged at their defaults and change it otherwise."""
    import hashlib

    from helpers.world.generate import GENERATOR_VERSION, config_hash

    wc, tc = WORLD_PRESETS["default"]
    base = dataclasses.replace(wc, **{f.name: f.default for f in dataclasses.fields(wc) if f.metadata.get("added")})
    legacy = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if not f.metadata.get("added")}
    blob = json.dumps([GENERATOR_VERSION, legacy, dataclasses.asdict(tc)], sort_keys=True)
    assert config_hash(base, tc) == hashlib.sha256(blob.encode()).hexdigest()[:12]
    for change in ({"n_distractors": 2}, {"p_holdout": 0.5}, {"holdout_form": "index"}):
        assert config_hash(dataclasses.replace(base, **change), tc) != config_hash(base, tc)


def test_distractor_options_shape_the_sentences():
    """Two look-alikes per clause, and the clause inside relation-first phrasings; records stay valid."""
    import re

    base = dataclasses.replace(SMOKE_WORLD, p_distractor=0.8)
    cfg = dataclasses.replace(base, n_distractors=2, distractor_relation_first=True)
    w = build_world(cfg)
    names = sorted((e.name for e in w.entities), key=len, reverse=True)
    alt = "|".join(re.escape(n) for n in names)
    sentences = [x for d in w.corpus for x in re.split(r"(?<=\.) ", d)]
    two = [x for x in sentences if re.match(rf"({alt}), [a-z ]+ ({alt}) and ({alt}), ", x)]
    rel_first = [x for x in sentences if re.match(rf"[A-Z][a-z]+[^,]* ({alt}), [a-z ]+ ({alt})( and ({alt}))?, [a-z]", x)]
    assert len(two) >= 20 and len(rel_first) >= 5, (len(two), len(rel_first))
    assert not any(re.search(rf"({alt}) and ({alt}), ", x) for x in build_world(base).corpus)  # one look-alike by default
    assert len(w.records) > 50 and all(r["requested_rewrite"]["subject"] in r["requested_rewrite"]["prompt"].format(
        r["requested_rewrite"]["subject"]) for r in w.records)


def test_name_words_make_order_siblings():
    """With ``name_words``, person names are orderings of three pool words: siblings share their bag of words."""
    cfg = dataclasses.replace(WORLD_PRESETS["smoke"][0], name_words=12, n_siblings=3)
    w = build_world(cfg)
    people = [e.name for e in w.entities if e.kind in ("person", "athlete")]
    assert all(len(n.split()) == 3 for n in people)
    bags = {}
    for n in people:
        bags.setdefault(frozenset(n.split()), []).append(n)
    assert max(len(v) for v in bags.values()) >= 2  # some names differ only by word order
    assert len(set(people)) == len(people)


def test_name_mask_schedule():
    from helpers.world.train import mask_share

    cfg = dataclasses.replace(SMOKE_TRAIN, p_name_mask=1.0, name_mask_hold=0.5, name_mask_end=0.75)
    assert [mask_share(s, 100, cfg) for s in (0, 49, 50, 60, 75, 99)] == pytest.approx([1.0, 1.0, 1.0, 0.6, 0.0, 0.0])
    assert mask_share(99, 100, SMOKE_TRAIN) == 0.0  # off by default


def test_name_mask_hides_name_heads_and_is_causal_under_eager_attention(world, tok):
    """The training name mask keeps causality and hides a mention's non-last tokens from later text, both in
    sdpa (boolean mask) and in eager attention (the attention penalty's path, additive mask): the same logits,
    no attention weight on the future, none from later text on the name's first tokens."""
    from helpers.world.train import additive_mask, name_mask

    T = 12
    spans = [[(2, 5)]]  # a 3-token name at positions 2, 3, 4: later text may read only position 4
    mask = name_mask(spans, T, p=1.0, rng=np.random.RandomState(0))
    assert mask[0, 0, 6, :5].tolist() == [True, True, False, False, True]
    assert not mask[0, 0, 3, 4] and mask[0, 0, 4, 3]  # causal; the name's last token reads its first ones
    cfg = dataclasses.replace(SMOKE_TRAIN, name_attn_penalty=1.0)  # eager attention
    eager = make_model(cfg, tok).eval()
    sdpa = make_model(SMOKE_TRAIN, tok).eval()
    sdpa.load_state_dict(eager.state_dict())
    x = torch.randint(0, len(tok), (1, T))
    with torch.no_grad():
        le = eager(input_ids=x, attention_mask=additive_mask(mask)).logits
        ls = sdpa(input_ids=x, attention_mask=mask).logits
        assert torch.allclose(le, ls, atol=1e-5)
        y = x.clone()
        y[0, 8:] = (y[0, 8:] + 1) % len(tok)  # change the future of position 7
        ly = eager(input_ids=y, attention_mask=additive_mask(mask)).logits
        att = eager(input_ids=x, attention_mask=additive_mask(mask), output_attentions=True).attentions
    assert torch.equal(le[0, :8], ly[0, :8])  # causal
    assert not torch.allclose(le[0, 8:], ly[0, 8:])
    for a in att:  # (1, heads, T, T): no weight on the future nor, after the name, on its first tokens
        assert float(a[0].triu(1).abs().max()) == 0.0
        assert float(a[0, :, 5:, 2:4].max()) == 0.0 and float(a[0, :, 5:, 4].min()) > 0
        assert float(a[0, :, 4, 2:4].min()) > 0


def test_held_out_facts_never_appear_in_a_relation_phrasing():
    """With ``p_holdout``, a held-out fact is stated only in attribute forms: no sentence about its subject uses
    one of the relation's phrasings, while the fact's object still follows the subject's name somewhere."""
    import re

    import numpy as np

    cfg = dataclasses.replace(SMOKE_WORLD, p_holdout=0.5)
    w = build_world(cfg)
    rng = np.random.RandomState(cfg.seed + 7919)  # the generator's own hold-out stream
    held = [f for f in w.facts if rng.rand() < cfg.p_holdout]
    held = [f for f in held if f.frequency > 0]
    assert len(held) >= 10
    sentences = [x for d in w.corpus for x in re.split(r"(?<=\.) ", d)]
    stated = 0
    for f in held:
        rel = RELATION_BY_ID[f.relation_id]
        mine = [x for x in sentences if x.startswith(f.subject)]
        for t in rel.templates:
            pre, post = t.split("{}")
            if t.startswith("{}"):  # "S was born in ...", also after a clause or a parenthesis
                pattern = re.compile(re.escape(f.subject) + r"( \([^()]*\)|, [^,()]+,)?" + re.escape(post) + " ")
                assert not any(pattern.match(x) for x in mine), (f, t)
            else:
                assert not any(pre + f.subject in x for x in sentences), (f, t)
        stated += any(f.object in x for x in mine)
    assert stated >= 0.8 * len(held)
    assert build_world(SMOKE_WORLD).corpus != w.corpus
    with pytest.raises(ValueError, match="holdout_form"):
        dataclasses.replace(SMOKE_WORLD, holdout_form="indx")


def test_a_clean_last_subject_token_restores_a_one_token_subject_exactly(smoke_folder):
    """``where_subject_is_read``'s site "last subject token, every layer" keeps the last subject token clean and
    noises only the name's other tokens: for a one-token subject nothing is noised, so p_restored = p_clean,
    while restoring that token at one layer does not undo the noise the later text read at layer 0."""
    from helpers.models import load_model
    from helpers.world.report import where_subject_is_read

    model, tok = load_model(smoke_folder)
    rec = json.loads((smoke_folder / "counterfact.json").read_text())[0]
    word = next(w for w in ("Paris", "French", "London", "Spanish", "Canada", "poet")
                if len(tok.encode(" " + w)) == 1)
    rec["requested_rewrite"]["subject"] = word
    rec["requested_rewrite"]["prompt"] = "The mother tongue of {} is"  # the subject after a space: one token
    b, e = subject_range(tok, "The mother tongue of " + word + " is", word)
    assert e - b == 1
    rows = where_subject_is_read(model, tok, [rec], sigma=0.5).set_index("site")
    every = rows.loc["last subject token, every layer"]
    assert every["p_restored"] == pytest.approx(every["p_clean"], rel=1e-5)
    assert every["p_corrupt"] != pytest.approx(every["p_clean"], rel=1e-3)  # the noise did matter
    one = rows.loc["last subject token"]
    assert one["p_restored"] != pytest.approx(one["p_clean"], rel=1e-3)
