"""Causal tracing and representation zeroing (helpers.tracing): known answers, fast == reference parity, effects.

Fixtures: a byte-level BPE tokenizer trained on five fact sentences and a 4-layer GPT-2 trained on them for a few
seconds (float32 training, float64 copy for exact parity checks).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import tables
from helpers import tracing as tr
from helpers.hooks import trace
from helpers.models import module_name
from conftest import ARCHS, tiny_model
from helpers import models, scoring

torch.set_num_threads(1)

FACTS = pd.DataFrame(
    [
        (0, "The mother tongue of {} is", "Danielle Darrieux", "French"),
        (1, "{} is located in the city of", "Cafe Nero", "London"),
        (2, "Where does {} work? In", "Toko Yasuda", "Tokyo"),
        (3, "{}, produced by", "Apple A5", "Apple Inc"),
        (4, "In the year 1200, {} was born in", "Edwin of Northumbria", "Rome"),
    ],
    columns=["case_id", "prompt", "subject", "target_true"],
)
L = 4


@pytest.fixture(scope="module")
def tok():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = [r.prompt.replace("{}", r.subject) + " " + r.target_true for r in FACTS.itertuples()]
    texts += ["Café Nero's office is in London !", "Hello , world and Danielle"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 10, vocab_size=600, min_frequency=1, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model32(tok):
    """A 4-layer GPT-2 trained for a few seconds on the five fact sentences (it then predicts them well)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=L, n_head=4, n_inner=64,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    texts = [r.prompt.replace("{}", r.subject) + " " + r.target_true for r in FACTS.itertuples()]
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model64(model32):
    import copy

    return copy.deepcopy(model32).double()


def fact(tok, i: int) -> tr.Fact:
    r = FACTS.iloc[i]
    return tr.prepare_fact(tok, r.prompt, r.subject, r.target_true, r.case_id)


# ---------------------------------------------------------------------------------------------------------------
# Subject range, windows, noise
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(len(FACTS)))
def test_subject_range_covers_exactly_the_subject(tok, i):
    f = fact(tok, i)
    assert "".join(f.tokens[f.b : f.e]).strip() == FACTS.subject[i]
    assert f.subject not in "".join(f.tokens[f.b + 1 : f.e]) and f.subject not in "".join(f.tokens[f.b : f.e - 1])
    assert (f.b == 0) == FACTS.prompt[i].startswith("{}")


def test_subject_range_first_occurrence_and_fallback(tok):
    # first occurrence wins
    b, e = tr.subject_range(tok, "Toko Yasuda met Toko Yasuda", "Toko Yasuda")
    assert b == 0 and e == len(tok("Toko Yasuda")["input_ids"])
    # unidecode fallback: the ASCII subject is found in the accented prompt, mapped back to the original tokens
    prompt = "Café Nero's office is in"
    b, e = tr.subject_range(tok, prompt, "Cafe Nero")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[b:e]).strip() == "Café Nero"
    # spaces before . , ! are removed by the fallback
    b, e = tr.subject_range(tok, "Hello , world and Danielle", "Hello, world")
    ids = tok("Hello , world and Danielle", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[b:e]).strip() == "Hello , world"


def test_missing_subject_is_a_clear_error(tok, model32):
    with pytest.raises(tr.SubjectNotFoundError, match=r"case_id=42.*'Nobody'.*'The mother tongue of X is'"):
        tr.subject_range(tok, "The mother tongue of X is", "Nobody", case_id=42)
    bad = pd.concat([FACTS.head(1), pd.DataFrame([(42, "The mother tongue of X is", "Nobody", "French")],
                                                 columns=FACTS.columns)], ignore_index=True)
    with pytest.raises(tr.SubjectNotFoundError) as err:
        tr.trace_facts(model32, tok, bad, windows=[1], sigma=0.1, on_missing="raise", progress=False)
    assert err.value.case_id == 42 and err.value.subject == "Nobody"
    table = tr.trace_facts(model32, tok, bad, windows=[1], sigma=0.1, progress=False)
    assert table.attrs["skipped"] == [42] and set(table.case_id) == {0}


@pytest.mark.parametrize(
    "layer, window, n, expected",
    [
        (0, 1, 28, (0, 1)), (27, 1, 28, (27, 28)),
        (5, 3, 28, (4, 7)), (0, 3, 28, (0, 2)), (27, 3, 28, (26, 28)),
        (5, 5, 28, (3, 8)), (0, 5, 28, (0, 3)), (1, 5, 28, (0, 4)), (27, 5, 28, (25, 28)), (26, 5, 28, (24, 28)),
        (10, 10, 28, (5, 15)), (0, 10, 28, (0, 5)), (27, 10, 28, (22, 28)), (2, 10, 4, (0, 4)),
    ],
)
def test_window_clipping(layer, window, n, expected):
    r = tr.window_layers(layer, window, n)
    assert (r.start, r.stop) == expected


def test_noise_draws_are_the_published_ones_and_shared_by_every_site(tok, model64):
    f = fact(tok, 0)
    draws = tr.noise_draws(10, f.e - f.b, 32)
    assert np.array_equal(draws, np.random.RandomState(seed=1).randn(10, f.e - f.b, 32))
    sigma = 0.3
    noise = tr._noise_tensor(model64, f, sigma, 10, 1)
    seen = []
    for t, layer in [(f.b, 0), (f.prompt_len - 1, L - 1)]:  # two different restoration sites
        with trace(model64, module_name(model64, "block", 0), retain_input=True, retain_output=False) as rec:
            tr.reference_run(model64, f, noise, {module_name(model64, "mlp", layer): [t]})
        seen.append(rec.inputs[module_name(model64, "block", 0)])
    assert torch.equal(seen[0], seen[1])
    diff = (seen[0][1:] - seen[0][0]).numpy()  # noised rows minus the clean row
    np.testing.assert_allclose(diff[:, f.b : f.e], sigma * draws, atol=1e-12)
    assert not diff[:, : f.b].any() and not diff[:, f.e :].any()


def test_noise_sigma(tok, model32):
    subjects = FACTS.subject.tolist()
    emb = model32.transformer.wte.weight
    rows = torch.cat([emb[tok(s, add_special_tokens=False)["input_ids"]] for s in subjects]).double()
    assert tr.noise_sigma(model32, tok, subjects) == pytest.approx(3 * float(rows.std()), rel=1e-12)
    old = model32.name_or_path
    try:
        model32.name_or_path = "/models/gpt2-xl"
        assert tr.noise_sigma(model32) == 0.1
        model32.name_or_path = "EleutherAI/gpt-j-6B"
        assert tr.noise_sigma(model32) == 0.094
    finally:
        model32.name_or_path = old


# ---------------------------------------------------------------------------------------------------------------
# Known answers and fast == reference
# ---------------------------------------------------------------------------------------------------------------


def test_restoring_everything_gives_clean_and_nothing_gives_corrupt(tok, model64):
    f = fact(tok, 3)  # multi-token target
    noise = tr._noise_tensor(model64, f, 1.0, 10, 1)
    p_clean = tr.clean_prob(model64, f)
    S = f.ids.shape[0]
    all_sites = {module_name(model64, "block", j): range(S) for j in range(L)}
    p0, p_all = tr.reference_run(model64, f, noise, all_sites)
    assert p0 == pytest.approx(p_clean, abs=1e-14) and p_all == pytest.approx(p_clean, abs=1e-14)
    _, p_none = tr.reference_run(model64, f, noise, {})
    assert abs(p_none - p_clean) > 1e-3  # the corruption does something
    res = tr.fast_trace(model64, f, "mlp", [1], noise)
    assert res.p_corrupt == pytest.approx(p_none, abs=1e-14) and res.p_clean == pytest.approx(p_clean, abs=1e-14)
    # tokens before the subject are untouched by any restoration: p_restored = p_corrupt
    f4 = fact(tok, 4)
    table = tr.trace_fact(model64, tok, *FACTS.iloc[4][["prompt", "subject", "target_true"]], windows=[3],
                          sigma=1.0, case_id=4)
    pre = table[table.token_idx < f4.b]
    assert len(pre) == f4.b * L and (pre.p_restored == pre.p_corrupt).all()


def test_restoring_last_layer_hidden_at_last_token_gives_clean(tok, model64):
    f = fact(tok, 0)  # single-token target: only the last prompt position scores it
    assert f.target_len == 1
    noise = tr._noise_tensor(model64, f, 1.0, 10, 1)
    for method in (tr.fast_trace, tr.reference_trace):
        res = method(model64, f, "hidden", [1], noise)
        assert res.p_restored[1][f.prompt_len - 1, L - 1] == pytest.approx(res.p_clean, abs=1e-14)
        assert abs(res.p_corrupt - res.p_clean) > 1e-3


@pytest.mark.parametrize("kind", tr.KINDS)
def test_fast_path_equals_reference_float64(tok, model64, kind):
    windows = [1, 3, 5, 10]
    worst, effect = 0.0, 0.0
    for i in (0, 1, 3):
        f = fact(tok, i)
        noise = tr._noise_tensor(model64, f, 1.0, 10, 1)
        fast = tr.fast_trace(model64, f, kind, windows, noise, max_rows=200)  # small chunks: exercises chunking
        ref = tr.reference_trace(model64, f, kind, windows, noise)
        assert fast.p_clean == pytest.approx(ref.p_clean, abs=1e-12)
        assert fast.p_corrupt == pytest.approx(ref.p_corrupt, abs=1e-12)
        for w in windows:
            worst = max(worst, float(np.abs(fast.p_restored[w] - ref.p_restored[w]).max()))
            effect = max(effect, float(np.abs(ref.p_restored[w] - ref.p_corrupt).max()))
    assert effect > 1e-2, "restorations must change p for the parity check to mean anything"
    assert worst < 1e-12


def test_fast_path_equals_reference_float32(tok, model32):
    sigma = tr.noise_sigma(model32, tok, FACTS.subject.tolist())
    fast = tr.trace_facts(model32, tok, FACTS, kinds=["mlp"], windows=[5], sigma=sigma, method="fast", progress=False)
    ref = tr.trace_facts(model32, tok, FACTS, kinds=["mlp"], windows=[5], sigma=sigma, method="reference",
                         progress=False)
    assert (fast.p_restored - fast.p_corrupt).abs().max() > 1e-3
    assert (fast.p_restored - ref.p_restored).abs().max() < 1e-6
    pd.testing.assert_frame_equal(fast.drop(columns=["p_restored", "high_score", "p_clean", "p_corrupt"]),
                                  ref.drop(columns=["p_restored", "high_score", "p_clean", "p_corrupt"]))


def test_table_format_and_determinism(tok, model32):
    kw = dict(kinds=["mlp", "attn", "zero"], windows=[1, 5], progress=False)
    table = tr.trace_facts(model32, tok, FACTS.head(2), **kw)
    again = tr.trace_facts(model32, tok, FACTS.head(2), **kw)
    pd.testing.assert_frame_equal(table, again)
    assert list(table.columns) == tr.TABLE_COLUMNS
    assert not table.isna().any().any()
    for cid in (0, 1):
        f = fact(tok, cid)
        for kind in ("mlp", "attn"):
            sub = table[(table.case_id == cid) & (table.kind == kind) & (table.window == 5)]
            assert len(sub) == f.prompt_len * L
            assert sorted(set(sub.token_idx)) == list(range(f.prompt_len))
            assert set(sub[sub.is_subject].token_idx) == set(range(f.b, f.e))
            assert set(sub[sub.is_last_subject].token_idx) == {f.e - 1}
            assert (sub.seq_len == f.prompt_len).all() and (sub.subj_begin == f.b).all()
            assert sub.token.tolist()[:: L] == f.tokens
            assert (sub.high_score == max(sub.p_clean.iloc[0], sub.p_restored.max())).all()
        z = table[(table.case_id == cid) & (table.kind == "zero")]
        assert len(z) == 2 * L and set(z.token_idx) == {f.e - 1}


# ---------------------------------------------------------------------------------------------------------------
# Representation zeroing
# ---------------------------------------------------------------------------------------------------------------


def test_zeroing_matches_one_pass_per_layer(tok, model64):
    f = fact(tok, 2)
    p_clean, p_zero = tr.zero_fact(model64, f, window=5)
    for layer in range(L):
        names = [module_name(model64, "mlp", j) for j in tr.window_layers(layer, 5, L)]

        def zero(out, _name):
            new = out.clone()
            new[:, f.b : f.e] = 0
            return new

        with trace(model64, names, edit=zero, retain_output=False):
            logits = model64(**f.batch.model_inputs()).logits
        from helpers.scoring import target_logprob_from_logits

        assert p_zero[layer] == pytest.approx(float(target_logprob_from_logits(logits, f.batch).exp()), abs=1e-14)
    assert p_clean == pytest.approx(tr.clean_prob(model64, f))
    table = tr.trace_fact(model64, tok, *FACTS.iloc[2][["prompt", "subject", "target_true"]], kinds=["zero"],
                          windows=[5], case_id=2)
    eff = tr.effects(table)
    np.testing.assert_allclose(eff.te.to_numpy(), (p_clean - p_zero) / p_clean, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# Effects on hand-made tables
# ---------------------------------------------------------------------------------------------------------------


def hand_table(p_clean: float, p_corrupt: float, p: list[list[float]], b: int, e: int, case_id=7) -> pd.DataFrame:
    """Rows for one case: p[token][layer] restored probabilities (tokens before b must equal p_corrupt)."""
    rows = []
    for t, row in enumerate(p):
        for layer, pr in enumerate(row):
            rows.append(dict(case_id=case_id, kind="mlp", window=5, token_idx=t, layer=layer, p_clean=p_clean,
                             p_corrupt=p_corrupt, p_restored=pr, is_subject=b <= t < e, is_last_subject=t == e - 1))
    return pd.DataFrame(rows)


def test_effects_known_answers():
    # 3 tokens (token 0 before the subject, subject = token 1, token 2 = last prompt token), 3 layers
    t = hand_table(0.5, 0.1, [[0.1, 0.1, 0.1], [0.3, 0.6, 0.05], [0.2, 0.4, 0.1]], b=1, e=2)
    code = tr.effects(t).set_index("layer")
    # high_score = max(0.5, 0.6) = 0.6, denominator = |0.1 - 0.6| = 0.5
    assert code.high_score.tolist() == pytest.approx([0.6] * 3)
    assert code.denominator.tolist() == pytest.approx([0.5] * 3)
    assert code.te.tolist() == pytest.approx([0.4, 1.0, 0.0])  # max over tokens of max(0, r / 0.5)
    assert code.subj_effect.tolist() == pytest.approx([0.2, 0.5, -0.05])  # last subject token, absolute
    assert code.subj_effect_fraction.tolist() == pytest.approx([0.4, 1.0, -0.1])  # not clipped
    assert code.restore_effect_max.tolist() == pytest.approx([0.2, 0.5, 0.0])
    assert not code.zero_denominator.any()
    paper = tr.effects(t, denominator="paper").set_index("layer")  # denominator p_clean - p_corrupt = 0.4
    assert paper.te.tolist() == pytest.approx([0.5, 1.25, 0.0])
    assert paper.subj_effect_fraction.tolist() == pytest.approx([0.5, 1.25, -0.125])


def test_last_subject_by_layer_is_a_ratio_of_means():
    # fact 1: gap .4, last subject (token 1) restores .2 / .5 at layers 0 / 1; fact 2: gap 1e-4 and an effect of
    # 1e-3 at layer 0 (a per-fact ratio of 10 that a mean of ratios would report as the layer's share)
    t = pd.concat([
        hand_table(0.5, 0.1, [[0.1, 0.1], [0.3, 0.6], [0.1, 0.1]], b=1, e=2, case_id=1),
        hand_table(0.1001, 0.1, [[0.1, 0.1], [0.101, 0.1], [0.1, 0.1]], b=1, e=2, case_id=2),
    ])
    share = tr.last_subject_by_layer(t, window=5)
    gap = (0.4 + 1e-4) / 2
    assert share.tolist() == pytest.approx([(0.2 + 1e-3) / 2 / gap, 0.5 / 2 / gap])
    assert share.max() < 1.26  # not ~5 as the mean of per-fact ratios (10 and .5) would give
    flat = hand_table(0.3, 0.3, [[0.3, 0.3], [0.3, 0.3]], b=1, e=2)  # no gap anywhere: 0, not inf or NaN
    assert tr.last_subject_by_layer(flat, window=5).tolist() == [0.0, 0.0]


def test_effects_zero_denominator_is_flagged_not_nan(caplog):
    t = pd.concat([
        hand_table(0.3, 0.3, [[0.3, 0.3], [0.2, 0.3]], b=1, e=2, case_id=1),  # corruption changed nothing
        hand_table(0.5, 0.1, [[0.1, 0.1], [0.3, 0.1]], b=1, e=2, case_id=2),
    ])
    with caplog.at_level(logging.WARNING, logger="helpers.tracing"):
        eff = tr.effects(t)
    assert not eff.isna().any().any()
    flagged = eff[eff.case_id == 1]
    assert flagged.zero_denominator.all() and (flagged.te == 0).all() and (flagged.subj_effect_fraction == 0).all()
    assert not eff[eff.case_id == 2].zero_denominator.any()
    assert tr.zero_denominator_cases(eff).case_id.tolist() == [1]
    assert "zero denominator" in caplog.text


def test_fractional_effect_in_unit_interval(tok, model32):
    table = tr.trace_facts(model32, tok, FACTS, kinds=["mlp", "hidden"], windows=[1, 10], progress=False)
    eff = tr.effects(table)
    assert len(eff) == len(FACTS) * 2 * 2 * L
    assert eff.te.between(0, 1).all() and eff.te.max() > 0
    assert not eff.isna().any().any()


def test_peak_layers_keep_ties_and_skip_nonpositive():
    t = pd.concat([
        hand_table(0.5, 0.1, [[0.1, 0.1, 0.1], [0.3, 0.6, 0.05], [0.6, 0.4, 0.1]], b=1, e=2, case_id=1),
        hand_table(0.5, 0.1, [[0.1, 0.1], [0.05, 0.1]], b=1, e=2, case_id=2),  # nothing restores
    ])
    peaks = tr.peak_layers(t)
    assert sorted(zip(peaks.case_id, peaks.token_idx, peaks.layer)) == [(1, 1, 1), (1, 2, 0)]
    assert peaks.restore_effect.tolist() == pytest.approx([0.5, 0.5])


def test_concentrated_known_answers():
    def curve(case_id, te):
        return pd.DataFrame(dict(case_id=case_id, kind="mlp", window=5, layer=range(len(te)), te=te))

    eff = pd.concat([
        curve(1, [0.0, 0.1, 1.0, 0.6, 0.5, 0.5, 0.1, 0.0]),  # 3 others >= 0.5 -> concentrated
        curve(2, [0.0, 0.5, 1.0, 0.6, 0.5, 0.5, 0.1, 0.0]),  # 4 others -> not
        curve(3, [0.0] * 8),  # flat zero curve -> not
    ])
    c = tr.concentrated(eff).set_index("case_id")
    assert c.concentrated.tolist() == [True, False, False]
    assert c.n_above.tolist() == [3, 4, 7] and c.peak_layer.tolist() == [2, 2, 0]


# ---------------------------------------------------------------------------------------------------------------
# Every architecture: the fast path (the model's own decoder layers) equals the reference path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [*ARCHS, "llama-bos"])
def test_fast_path_equals_reference_on_every_architecture(arch):
    """float32, 6 layers, windows 1/3/5/10, all three kinds: |p_fast - p_ref| < 1e-5 relative to p (a random
    model's p(target) is tiny). Gemma 3 runs with a BOS tokenizer and a sliding window (4) shorter than the
    prompt, so the cached prefix must respect it; "llama-bos" with a first token our code prepends (SmolLM2's
    <|endoftext|>, :func:`helpers.scoring.set_bos`)."""
    from conftest import BOS_ARCHS, tiny_model, tiny_tokenizer

    tk = tiny_tokenizer(bos=arch in BOS_ARCHS)
    if arch == "llama-bos":
        scoring.set_bos(tk, "<|endoftext|>")
    model = tiny_model(arch.removesuffix("-bos"), len(tk), n_layer=6, seed=2).eval().requires_grad_(False)
    assert tr.fast_path_supported(model)
    worst, effect = 0.0, 0.0
    for i in (2,):
        row = FACTS.iloc[i]
        f = tr.prepare_fact(tk, row.prompt, row.subject, row.target_true, row.case_id)
        if arch in BOS_ARCHS or arch == "llama-bos":
            assert f.ids[0] == tk.bos_token_id and f.b >= 1
            assert "".join(f.tokens[f.b:f.e]).strip() == row.subject
        noise = tr._noise_tensor(model, f, 0.5, 10, 1)
        for kind in tr.KINDS:
            fast = tr.fast_trace(model, f, kind, [1, 3, 5, 10], noise, max_rows=300)
            ref = tr.reference_trace(model, f, kind, [1, 3, 5, 10], noise)
            assert fast.p_clean == pytest.approx(ref.p_clean, rel=1e-5)
            assert fast.p_corrupt == pytest.approx(ref.p_corrupt, rel=1e-5)
            for w in (1, 3, 5, 10):
                worst = max(worst, float((np.abs(fast.p_restored[w] - ref.p_restored[w]) / ref.p_restored[w]).max()))
                effect = max(effect, float(np.abs(ref.p_restored[w] - ref.p_corrupt).max() / ref.p_corrupt))
            if kind == "hidden":  # the last block's output at the last token is all the logits read
                assert fast.p_restored[1][f.prompt_len - 1, 5] == pytest.approx(fast.p_clean, rel=1e-5)
            if kind == "mlp":  # before the subject nothing is noised: restoring there changes nothing
                assert np.allclose(fast.p_restored[10][: f.b], fast.p_corrupt, rtol=1e-6)
    assert effect > 1e-2, "restorations must move p for the parity to mean anything"
    assert worst < 1e-5, (arch, worst)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_restoring_every_site_gives_p_clean(arch):
    """Restoring every block output at every prompt position (any architecture, BOS or not) gives p_clean."""
    from conftest import BOS_ARCHS, tiny_model, tiny_tokenizer

    tk = tiny_tokenizer(bos=arch in BOS_ARCHS)
    model = tiny_model(arch, len(tk), n_layer=6, seed=4).double().eval().requires_grad_(False)  # Gemma: 1 global
    row = FACTS.iloc[1]
    f = tr.prepare_fact(tk, row.prompt, row.subject, row.target_true)
    noise = tr._noise_tensor(model, f, 1.0, 10, 1)
    p_clean, p_corrupt = tr.reference_run(model, f, noise)
    everything = {models.module_name(model, "block", j): range(f.prompt_len + f.target_len) for j in range(6)}
    assert abs(p_clean - p_corrupt) > 1e-3 * p_clean
    assert tr.reference_run(model, f, noise, everything)[1] == pytest.approx(p_clean, rel=1e-12)


def test_tracing_figures(tok, model32):
    from matplotlib.figure import Figure

    from helpers import plots

    table = tr.trace_facts(model32, tok, FACTS.head(3), kinds=["mlp"], windows=[1, 5], progress=False)
    eff, peaks = tr.effects(table), tr.peak_layers(table)
    figs = [
        plots.trace_heatmap(table, 0, "mlp", 5),
        plots.effect_by_layer(eff, "mlp"),
        plots.peak_layer_hist(peaks, L, "mlp", 5),
        plots.peak_layer_hist_by_window(peaks, L, "mlp"),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel()
    assert len(figs[3].axes) == 2
    with pytest.raises(ValueError, match="case_id=99"):
        plots.trace_heatmap(table, 99)


def test_last_subject_only_equals_the_full_table_rows():
    """tokens="last_subject" gives exactly the last-subject rows of the full table (both paths), and only them."""
    from conftest import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("gpt2", len(tok), n_layer=3).eval()
    for method in ("fast", "reference"):
        full = tr.trace_fact(model, tok, "The mother tongue of {} is", "Danielle Darrieux", "French",
                                  kinds=("mlp", "hidden"), windows=(1, 3), sigma=0.5, case_id=7, method=method)
        last = tr.trace_fact(model, tok, "The mother tongue of {} is", "Danielle Darrieux", "French",
                                  kinds=("mlp", "hidden"), windows=(1, 3), sigma=0.5, case_id=7, method=method,
                                  tokens="last_subject")
        assert last["is_last_subject"].all() and len(last) == 2 * 2 * 3
        want = full[full["is_last_subject"]].reset_index(drop=True)
        pd.testing.assert_frame_equal(last.reset_index(drop=True), want)
    with pytest.raises(ValueError):
        tr.trace_fact(model, tok, "The mother tongue of {} is", "Danielle Darrieux", "French", tokens="first")


def test_checkpoint_resumes_an_interrupted_trace_with_the_same_table(tok, model32, tmp_path, monkeypatch):
    kw = dict(kinds=["mlp"], windows=[3], sigma=0.1, progress=False)
    whole = tr.trace_facts(model32, tok, FACTS.head(4), **kw)
    ck = tmp_path / "parts" / "mlp.parquet"
    # "Interrupted" after two facts: the checkpoint holds them.
    first = tr.trace_facts(model32, tok, FACTS.head(2), checkpoint=ck, checkpoint_every_s=0, **kw)
    assert sorted(tables.read_table(ck)["case_id"].unique()) == sorted(FACTS.head(2)["case_id"])
    calls = []
    real = tr.trace_fact
    monkeypatch.setattr(tr, "trace_fact", lambda *a, **k: calls.append(a[8]) or real(*a, **k))
    resumed = tr.trace_facts(model32, tok, FACTS.head(4), checkpoint=ck, **kw)
    assert calls == list(FACTS.head(4)["case_id"].iloc[2:])  # only the two facts not yet traced
    pd.testing.assert_frame_equal(resumed, whole)
    pd.testing.assert_frame_equal(first, whole[whole["case_id"].isin(FACTS.head(2)["case_id"])])
    # Other settings: the checkpoint is not used.
    calls.clear()
    tr.trace_facts(model32, tok, FACTS.head(2), checkpoint=ck, **{**kw, "windows": [1]})
    assert calls == list(FACTS.head(2)["case_id"])


def test_checkpoint_rows_of_a_changed_fact_are_traced_again(tok, model32, tmp_path, monkeypatch):
    kw = dict(kinds=["mlp"], windows=[1], sigma=0.1, progress=False)
    ck = tmp_path / "ck.parquet"
    facts = FACTS.head(2).copy()
    tr.trace_facts(model32, tok, facts, checkpoint=ck, **kw)
    changed = facts.copy()
    changed.loc[changed.index[1], "target_true"] = changed["target_true"].iloc[0]  # same case_id, other target
    calls = []
    real = tr.trace_fact
    monkeypatch.setattr(tr, "trace_fact", lambda *a, **k: calls.append(a[8]) or real(*a, **k))
    again = tr.trace_facts(model32, tok, changed, checkpoint=ck, **kw)
    assert calls == [changed["case_id"].iloc[1]]
    pd.testing.assert_frame_equal(again, tr.trace_facts(model32, tok, changed, **kw))
