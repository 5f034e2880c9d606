"""Problems, evaluation and the resumable sweep, on a tiny random GPT-2 and the fixture records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import data, editing, evaluation, generation, sweep
from helpers.problems import PROBLEMS, ProblemOptions, get_problem, make_task
from conftest import SAMPLE_COUNTERFACT, tiny_model

SIGMA = 0.5


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_model("gpt2", len(tokenizer), seed=3).eval().requires_grad_(False), tokenizer


@pytest.fixture(scope="module")
def facts():
    return data.to_frame(data.load_counterfact(SAMPLE_COUNTERFACT))


def test_problem_table():
    assert [p.direction for p in PROBLEMS.values()] == ["raise", "raise", "lower", "raise", "raise"]
    assert [p.noised for p in PROBLEMS.values()] == [False, False, False, False, True]
    assert get_problem("fact_forcing").key == "ff"
    with pytest.raises(KeyError, match="unknown problem"):
        get_problem("xx")
    with pytest.raises(ValueError, match="tr_target"):
        ProblemOptions(tr_target="greedy")


def test_targets_per_problem(lm, facts):
    model, tok = lm
    f = facts.iloc[0]
    ei = make_task(model, tok, f, "ei", SIGMA)
    assert (ei.target, ei.baseline, ei.request.direction, ei.eval_sigma) == ("English", "French", "raise", None)
    fe = make_task(model, tok, f, "fe", SIGMA)
    assert (fe.target, fe.request.direction) == ("French", "lower")
    ff = make_task(model, tok, f, "ff", SIGMA)
    assert ff.target == "French" and ff.eval_sigma == SIGMA and ff.request.noise.n_samples == 10
    # Neighborhood target: o_false for every problem (paper) or the problem's target (code).
    assert fe.neighborhood_target == "English"
    assert make_task(model, tok, f, "fe", SIGMA, ProblemOptions(neighborhood_target="code")).neighborhood_target == "French"


def test_tracing_reversal_target_paper_vs_code(lm, facts):
    model, tok = lm
    f = facts.iloc[0]
    paper = make_task(model, tok, f, "tr", SIGMA, ProblemOptions(tr_max_out_len=30))
    code = make_task(model, tok, f, "tr", SIGMA, ProblemOptions(tr_target="code", tr_max_out_len=30))
    prompt = f["prompt"].format(f["subject"])
    assert code.target.startswith(prompt) and not paper.target.startswith(prompt)
    assert paper.target and make_task(model, tok, f, "tr", SIGMA, ProblemOptions(tr_max_out_len=30)).target == paper.target
    # Sampling under noise differs from sampling without it (the noise hook is really active).
    clean = generation.generate(model, tok, [prompt], max_out_len=40, top_k=5, seed=1)[0]
    noisy = make_task(model, tok, f, "tr", 5.0, ProblemOptions(tr_max_out_len=40)).target
    assert noisy != clean


def test_fact_forcing_evaluation_noise_is_identical_pre_and_post(lm, facts):
    model, tok = lm
    f = facts.iloc[1]
    task = make_task(model, tok, f, "ff", SIGMA)
    texts = evaluation.essence_texts(model, tok, f["subject"], n=2, max_out_len=20, seed=0)
    a = evaluation.measure(model, tok, task, f, texts)
    b = evaluation.measure(model, tok, task, f, texts)
    assert a == b
    clean = evaluation.measure(model, tok, make_task(model, tok, f, "fa", SIGMA), f, texts)
    assert clean["rewrite"] != a["rewrite"]  # the subject really is noised
    assert clean["neighborhood"] == a["neighborhood"]  # neighbours have no subject: never noised


def test_essence_texts_start_with_prompt_and_are_seeded(lm):
    model, tok = lm
    t1 = evaluation.essence_texts(model, tok, "Toko Yasuda", n=3, max_out_len=15, seed=4)
    assert len(t1) == 3 and all(t.startswith("Toko Yasuda is a") for t in t1)
    assert t1 == evaluation.essence_texts(model, tok, "Toko Yasuda", n=3, max_out_len=15, seed=4)


def test_essence_texts_of_several_subjects_are_their_one_subject_texts(lm):
    """Sampled together (left-padded, each subject's rows on their own generator), every subject gets the texts
    its own call gives, in fewer decoding passes."""
    model, tok = lm
    subjects, seeds = ["Toko Yasuda", "Danielle Darrieux", "Apple A5", "Paris"], [4, 7, 4, 0]
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        many = evaluation.essence_texts_many(model, tok, subjects, seeds, n=3, max_out_len=18, facts_per_pass=3)
        n_many = len(calls)
        one = [evaluation.essence_texts(model, tok, s, n=3, max_out_len=18, seed=sd) for s, sd in zip(subjects, seeds)]
    finally:
        handle.remove()
    assert many == one
    assert n_many < len(calls) - n_many  # two batches (3 + 1 subjects) against four one-subject calls
    assert many[0] != many[2]  # same seed, another subject: other texts
    with pytest.raises(ValueError, match="2 subjects but 1 seeds"):
        evaluation.essence_texts_many(model, tok, ["a", "b"], [1])


def test_one_seed_per_prompt_group_draws_as_that_group_alone(lm):
    """``seed`` as a list: each run of equal seeds draws from its own generator, also when a group is longer than
    a batch (its generator carries over), exactly as a call with that group and one seed."""
    model, tok = lm
    prompts = ["Toko Yasuda, the"] * 5 + ["The mother tongue of"] * 2
    got = generation.generate(model, tok, prompts, max_new_tokens=4, top_k=5, seed=[3] * 5 + [9] * 2, batch_size=4)
    alone = (generation.generate(model, tok, prompts[:5], max_new_tokens=4, top_k=5, seed=3, batch_size=4)
             + generation.generate(model, tok, prompts[5:], max_new_tokens=4, top_k=5, seed=9, batch_size=4))
    assert got == alone
    assert len(set(got[:5])) > 1  # the group's rows really are sampled, not copies


def test_pre_edit_rows_equal_the_one_fact_reference(lm, facts, tmp_path):
    """Chunked pre-edit rows (batched measurement, essence texts sampled together) equal make_task +
    essence_texts + evaluation.measure one fact at a time, up to float rounding; a second problem reuses the
    first one's essence texts."""
    model, tok = lm
    fs = facts.head(3)
    pre = sweep.pre_edit(model, tok, fs, "ff", SIGMA, tmp_path, essence_samples=2)
    for _, f in fs.iterrows():
        task = make_task(model, tok, f, "ff", SIGMA)
        texts = evaluation.essence_texts(model, tok, f["subject"], n=2, seed=int(f["case_id"]))
        ref = evaluation.measure(model, tok, task, f, texts)
        row = pre.loc[int(f["case_id"])]
        assert list(row["essence_texts"]) == texts and row["baseline"] == task.baseline
        for k, v in ref.items():
            assert np.allclose(np.asarray(row[f"{k}_pre"], float), np.asarray(v, float), rtol=1e-5, atol=0), k
    sampled = []
    real = evaluation.essence_texts_many
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "essence_texts_many", lambda *a, **k: sampled.append(a[2]) or real(*a, **k))
        ei = sweep.pre_edit(model, tok, facts.head(4), "ei", SIGMA, tmp_path, essence_samples=2)
    assert [list(x) for x in sampled] == [[facts.iloc[3]["subject"]]]  # only the new fact was sampled
    assert all(list(ei.loc[c]["essence_texts"]) == list(pre.loc[c]["essence_texts"]) for c in pre.index)


def _cell(method="ft1", problem="ei", batch_size=2, layers=(0, 2)):
    return sweep.CellConfig(method, problem, list(layers), editing.load_hparams("world", method, problem), sigma=SIGMA,
                            essence_samples=2, batch_size=batch_size)


def _without_time(t: pd.DataFrame) -> pd.DataFrame:
    return t.drop(columns=["seconds"]).reset_index(drop=True)


def test_interrupted_sweep_resumes_to_the_same_table(lm, facts, tmp_path):
    model, tok = lm
    fs = facts.head(3)
    full = sweep.run_cell(model, tok, fs, _cell(), tmp_path / "a" / "t.parquet", tmp_path / "a")
    part = sweep.run_cell(model, tok, fs, _cell(), tmp_path / "b" / "t.parquet", tmp_path / "b", stop_after=1)
    cfg = _cell()
    pre = sweep.pre_edit(model, tok, fs, "ei", cfg.sigma, tmp_path / "b", cfg.options, cfg.essence_samples)
    first = sweep.in_batch_order(tok, [f for _, f in fs.iterrows()], pre, cfg)[0]
    assert len(part) == 2 and set(part["case_id"]) == {int(first["case_id"])}  # the first fact, at two layers
    resumed = sweep.run_cell(model, tok, fs, _cell(), tmp_path / "b" / "t.parquet", tmp_path / "b")
    assert len(full) == 6 and (full["status"] == "ok").all()
    pd.testing.assert_frame_equal(_without_time(full), _without_time(resumed))
    on_disk = pd.read_parquet(tmp_path / "b" / "t.parquet")
    pd.testing.assert_frame_equal(_without_time(on_disk), _without_time(resumed))
    # A re-run of a finished cell does nothing and returns the same table.
    again = sweep.run_cell(model, tok, fs, _cell(), tmp_path / "b" / "t.parquet", tmp_path / "b")
    pd.testing.assert_frame_equal(again, resumed)


def test_rows_from_other_settings_are_not_resumed(lm, facts, tmp_path, caplog):
    """A table left by a run with other hyperparameters is discarded, not resumed: the re-run equals a fresh
    run with the new settings. Pre-edit rows and σ are fingerprinted the same way."""
    model, tok = lm
    fs = facts.head(2)
    old = _cell()
    old.hparams = {**old.hparams, "norm_constraint": 1e-6}
    sweep.run_cell(model, tok, fs, old, tmp_path / "b" / "t.parquet", tmp_path / "b", stop_after=1)
    fresh = sweep.run_cell(model, tok, fs, _cell(), tmp_path / "a" / "t.parquet", tmp_path / "a")
    with caplog.at_level("WARNING"):
        rerun = sweep.run_cell(model, tok, fs, _cell(), tmp_path / "b" / "t.parquet", tmp_path / "b")
    assert "other settings" in caplog.text
    pd.testing.assert_frame_equal(_without_time(fresh), _without_time(rerun))
    # pre-edit rows of another σ (Fact Forcing's evaluation noise) are recomputed too
    p1 = sweep.pre_edit(model, tok, fs, "ff", 0.5, tmp_path / "c")
    p2 = sweep.pre_edit(model, tok, fs, "ff", 2.0, tmp_path / "c")
    assert (p1["rewrite_pre"].values != p2["rewrite_pre"].values).any()
    # σ is recomputed when the subjects change
    s1 = sweep.noise_sigma_for(tmp_path / "d", model, tok, list(fs["subject"]))
    assert sweep.noise_sigma_for(tmp_path / "d", model, tok, list(fs["subject"])) == s1
    s2 = sweep.noise_sigma_for(tmp_path / "d", model, tok, list(facts["subject"]))
    assert s2 != s1


def test_failed_edit_is_recorded_and_sweep_goes_on(lm, facts, tmp_path, monkeypatch):
    from helpers.editing import batched

    model, tok = lm
    real = batched.edit_many

    def flaky(model, tok, requests, method, layer, *a, **k):  # the sweep's one production path
        if any(r.case_id == 1 for r in requests) and layer == 2:
            raise FloatingPointError("NaN in v*")
        return real(model, tok, requests, method, layer, *a, **k)

    monkeypatch.setattr(batched, "edit_many", flaky)
    t = sweep.run_cell(model, tok, facts.head(3), _cell(batch_size=1), tmp_path / "t.parquet", tmp_path)
    bad = t[t["status"] == "error"]
    assert list(zip(bad["case_id"], bad["central_layer"])) == [(1, 2)]
    assert "NaN in v*" in bad["message"].iloc[0]
    assert (t["status"] == "ok").sum() == 5
    scored = sweep.scored(t)
    assert len(scored) == 5 and scored["rewrite"].notna().all()
    assert {"rewrite", "paraphrase", "neighborhood", "essence", "overall"} <= set(scored.columns)


def test_pre_edit_quantities_are_cached_per_problem(lm, facts, tmp_path, monkeypatch):
    model, tok = lm
    sweep.run_cell(model, tok, facts.head(2), _cell("ft1", "fa"), tmp_path / "x.parquet", tmp_path)
    calls = []
    monkeypatch.setattr(evaluation, "essence_texts_many", lambda *a, **k: calls.append(1) or [["x is a y"]])
    sweep.run_cell(model, tok, facts.head(2), _cell("ft5", "fa"), tmp_path / "y.parquet", tmp_path)
    assert calls == []  # the second method reused the cached pre-edit measurements
    pre = pd.read_parquet(tmp_path / "pre" / "fa.parquet")
    assert list(pre["case_id"]) == [0, 1] and (pre["target"] == facts.head(2)["target_true"].values).all()


def test_no_essence_samples_skips_essence_and_keeps_the_scores(lm, facts, tmp_path, monkeypatch):
    """essence_samples=0 (tuning): no essence text is sampled, the essence columns are NaN, and the edit's
    rewrite, paraphrase and neighborhood probabilities are those of a run with essence texts."""
    model, tok = lm
    with_essence = sweep.run_cell(model, tok, facts.head(2), _cell("ft1", "fa"), tmp_path / "a.parquet",
                                  tmp_path / "a")
    calls = []
    monkeypatch.setattr(evaluation, "essence_texts_many", lambda *a, **k: calls.append(1) or [["x is a y"]])
    cfg = _cell("ft1", "fa")
    cfg.essence_samples = 0
    without = sweep.run_cell(model, tok, facts.head(2), cfg, tmp_path / "b.parquet", tmp_path / "b")
    assert calls == [] and (without["status"] == "ok").all()
    assert without["essence_ppl_pre"].isna().all() and without["essence_ppl_post"].isna().all()
    assert with_essence["essence_ppl_post"].notna().all()
    for col in ("rewrite_pre", "rewrite_post"):
        assert torch.allclose(torch.tensor(without[col].values), torch.tensor(with_essence[col].values))
    scored = sweep.scored(without)
    assert scored["essence"].isna().all() and scored["rewrite"].notna().all()


def _stats_and_templates(model, tok, facts: pd.DataFrame, tmp_path):
    """Second moments over the facts' own sentences and context templates, cached under tmp_path."""
    corpus = [p.format(s) + " " + t for p, s, t in zip(facts["prompt"], facts["subject"], facts["target_true"])] * 10
    stats = editing.SecondMoments(model, tok, corpus, n_tokens=300, cache_dir=tmp_path / "cache")
    return stats, editing.context_templates(model, tok, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("method, problem", [("rome", "ei"), ("ft5", "fe"), ("memit", "ff")])
def test_batched_sweep_equals_one_edit_at_a_time(lm, facts, tmp_path, monkeypatch, method, problem):
    model, tok = lm
    fs = facts.head(3)
    if problem == "fe":  # a random model's p(o_true) is far below FT's 1e-2 loss floor, so FT would never step:
        from helpers.editing import batched, finetune  # a one-token o_true (p ~ 1/vocab) and no floor

        fs = fs.assign(target_true="a")
        monkeypatch.setattr(finetune, "LOSS_FLOOR", 0.0)
        monkeypatch.setattr(batched, "LOSS_FLOOR", 0.0)
    stats, templates = _stats_and_templates(model, tok, facts, tmp_path)
    # central layers below the top block: at the top (layer 2 of 3) the last subject token's MLP output reaches no
    # later position, so with ROME's KL term off (the world's Error Injection setting) the edit is exactly zero
    one = sweep.run_cell(model, tok, fs, _cell(method, problem, batch_size=1, layers=(0, 1)), tmp_path / "a.parquet",
                         tmp_path, stats, templates)
    many = sweep.run_cell(model, tok, fs, _cell(method, problem, batch_size=3, layers=(0, 1)), tmp_path / "b.parquet",
                          tmp_path, stats, templates)
    assert (one["status"] == "ok").all()
    moved = (one["rewrite_post"] - one["rewrite_pre"]) / one["rewrite_pre"]
    assert (moved.abs() > 1e-3).all(), "every edit changes p(target) (else the parity is vacuous)"
    if problem == "fe":
        assert (moved < 0).all()
    # Float rounding of batched vs one-fact matrix products (the default, non-exact path) moves p by ~1e-6
    # relative; the essence perplexity, exp of a mean over ~100 tokens, amplifies that to ~2e-5 on some CPUs (an
    # AVX2 EPYC here, CI): its tolerance is 1e-4 (a change of 1e-4 nats in the mean NLL), the others' 1e-5.
    ess = [c for c in one.columns if c.startswith("essence")]
    pd.testing.assert_frame_equal(_without_time(one).drop(columns=ess), _without_time(many).drop(columns=ess),
                                  rtol=1e-5)
    pd.testing.assert_frame_equal(one[ess], many[ess], rtol=1e-4)


def _hand_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) float64 log-softmax of one unpadded forward pass (no helpers.scoring)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return logits - torch.logsumexp(logits, -1, keepdim=True)


def _hand_prob(model, tok, prompt: str, target: str) -> float:
    """p(" " + target | prompt), product over the target's tokens."""
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    t_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    lp = _hand_logprobs(model, p_ids + t_ids)
    return float(sum(lp[len(p_ids) - 1 + i, t] for i, t in enumerate(t_ids)).exp())


def test_measure_equals_a_hand_computation(lm, facts):
    """Every probability measure() reports is p(the right target | the right prompt), checked against an
    independent one-prompt-at-a-time computation; the essence perplexity against a hand perplexity."""
    model, tok = lm
    f = facts.iloc[0]
    task = make_task(model, tok, f, "ei", SIGMA)
    texts = [f"{f['subject']} is a person from the city", f"{f['subject']} is a"]
    m = evaluation.measure(model, tok, task, f, texts)
    prompt = f["prompt"].format(f["subject"])
    assert m["rewrite"] == pytest.approx(_hand_prob(model, tok, prompt, f["target_new"]), rel=1e-5)
    assert m["rewrite_base"] == pytest.approx(_hand_prob(model, tok, prompt, f["target_true"]), rel=1e-5)
    for got, base, p in zip(m["paraphrase"], m["paraphrase_base"], f["paraphrase_prompts"], strict=True):
        assert got == pytest.approx(_hand_prob(model, tok, p, f["target_new"]), rel=1e-5)
        assert base == pytest.approx(_hand_prob(model, tok, p, f["target_true"]), rel=1e-5)
    # neighbours: target_new = o_false (the paper's neighborhood target) and o_true for the base
    for got, base, p in zip(m["neighborhood"], m["neighborhood_base"], f["neighborhood_prompts"], strict=True):
        assert got == pytest.approx(_hand_prob(model, tok, p, f["target_new"]), rel=1e-5)
        assert base == pytest.approx(_hand_prob(model, tok, p, f["target_true"]), rel=1e-5)
    ppls = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        lp = _hand_logprobs(model, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
        ppls.append(float(torch.exp(-lp.sum() / len(ids))))  # the official code divides by N, not N - 1
    assert m["essence_ppl"] == pytest.approx(sum(ppls) / len(ppls), rel=1e-5)


@pytest.mark.parametrize("method, problem, batched_expected", [("ft1", "ff", False), ("ft5", "ff", False),
                                                              ("ft1", "ei", True), ("rome", "ff", True)])
def test_fine_tuning_under_input_noise_is_edited_one_fact_at_a_time(lm, facts, tmp_path, monkeypatch, method,
                                                                    problem, batched_expected):
    """FT x Fact Forcing chunks go through the batched path one fact at a time (K facts together are slower
    there); every other cell edits its chunk of 2 facts together."""
    from helpers.editing import batched

    model, tok = lm
    calls = []
    real = batched.edit_many
    monkeypatch.setattr(batched, "edit_many", lambda m, t, reqs, *a, **k: calls.append(len(reqs)) or real(m, t, reqs, *a, **k))
    stats, templates = _stats_and_templates(model, tok, facts, tmp_path)
    cfg = _cell(method, problem, batch_size=2)
    cfg.layers = cfg.layers[:1]
    t = sweep.run_cell(model, tok, facts.head(2), cfg, tmp_path / "t.parquet", tmp_path, stats, templates)
    assert (t["status"] == "ok").all() and len(t) == 2
    assert calls == ([2] if batched_expected else [1, 1])
