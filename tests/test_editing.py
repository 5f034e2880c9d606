"""Tests of helpers.editing (issue 5): ROME, MEMIT, FT-1/FT-5, second moments, edits as data.

Runs on a tiny GPT-2 trained here for a few seconds on synthetic fact sentences (fixture ``tiny``), so the
file does not depend on the world model; one test also runs on the "smoke" world when it is cached.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from helpers import editing as E
from helpers import hooks, models, scoring
from helpers.editing import base as B

torch.set_num_threads(1)

SUBJECTS = ["Zor Makken", "Lila Durnov", "Ottar Venn", "Mira Quell", "Basso Trent", "Ilse Morrow",
            "Kato Brenn", "Runa Fael", "Edda Sorn", "Tomas Welk", "Nia Carrow", "Pell Aston"]
RELATIONS = {
    "lang": (["The mother tongue of {} is", "{} is a native speaker of"], ["French", "German", "Spanish", "Italian"]),
    "city": (["{} lives in", "The home city of {} is"], ["Paris", "Berlin", "Madrid", "Rome"]),
    "instr": (["{} plays the", "The instrument of {} is the"], ["guitar", "piano", "violin", "drums"]),
}


def _corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    facts = [(s, r, rng.choice(objs)) for s in SUBJECTS for r, (_, objs) in RELATIONS.items()]
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(rng.randint(1, 2)):
            s, r, o = rng.choice(facts)
            sents.append(rng.choice(RELATIONS[r][0]).format(s) + " " + o + ".")
        docs.append(" ".join(sents))
    return docs


def _train_tiny(steps: int = 250, seed: int = 0):
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tmodels
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    docs = _corpus()
    t = Tokenizer(tmodels.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos_s = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token=eos_s, bos_token=eos_s, unk_token=eos_s, pad_token=eos_s)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=48, n_layer=4, n_head=4, n_inner=192,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    eos = tok.eos_token_id
    seqs = [[eos] + tok(d)["input_ids"] for d in docs]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        b = rng.sample(seqs, 16)
        T = max(map(len, b))
        ids = torch.full((len(b), T), eos)
        lab = torch.full((len(b), T), -100)
        for i, x in enumerate(b):
            ids[i, : len(x)] = torch.tensor(x)
            lab[i, : len(x)] = torch.tensor(x)
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model, tok, docs


class Tiny:
    def __init__(self, cache_dir):
        self.model, self.tok, self.docs = _train_tiny()
        self.cache_dir = cache_dir
        self.stats = E.SecondMoments(self.model, self.tok, self.docs[:400], n_tokens=3000, cache_dir=cache_dir,
                                     progress=False)
        self.stats.precompute(range(models.n_layers(self.model)))
        self.templates = E.context_templates(self.model, self.tok, cache_dir=cache_dir)
        self.request = E.EditRequest("The mother tongue of {} is", "Zor Makken", "German", case_id="t1")

    def p(self, prompts, targets):
        return scoring.target_probs(self.model, self.tok, prompts, targets)

    def logits(self, texts):
        b = scoring.make_batch(self.tok, texts)
        with torch.no_grad():
            return self.model(**b.model_inputs()).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("edit_cache"))


HP = {"rome": {}, "memit": {"mom2_update_weight": 5}, "ft1": {"norm_constraint": 1e-2},
      "ft5": {"norm_constraint": 5e-3}}
PROBE = ["The mother tongue of Zor Makken is", "Lila Durnov lives in", "Kato Brenn plays the drums. Edda Sorn is"]


# ------------------------------------------------------------------------------------------- pure logic


def test_window_clipped_at_edges():
    assert E.window(5, 1, 28) == [5]
    assert E.window(5, 5, 28) == [3, 4, 5, 6, 7]
    assert E.window(0, 5, 28) == [0, 1, 2]
    assert E.window(27, 5, 28) == [25, 26, 27]
    assert E.window(10, 10, 28) == list(range(5, 15))
    with pytest.raises(IndexError):
        E.window(28, 5, 28)


def test_request_without_subject_in_prompt_names_the_case():
    with pytest.raises(E.EditError, match="case 1234.*Zor Makken"):
        E.EditRequest("The mother tongue of Lila Durnov is", "Zor Makken", "German", case_id=1234)
    # a filled prompt that contains the subject is accepted and turned into a template
    r = E.EditRequest("The mother tongue of Zor Makken is", "Zor Makken", "German")
    assert r.template == "The mother tongue of {} is"
    with pytest.raises(E.EditError, match="direction"):
        E.EditRequest("{} is", "x", "y", direction="up")


def test_load_hparams_paper_values():
    assert E.load_hparams("gpt-j", "rome", "error_injection")["kl_factor"] == 1.0
    assert E.load_hparams("gpt-j", "rome", "fa")["kl_factor"] == 0.0625
    assert E.load_hparams("gpt-j", "memit", "ei")["kl_factor"] == 0.9
    ff = E.load_hparams("gpt-j", "ft5", "fact_forcing")
    assert ff["norm_constraint"] == 1e-4 and ff["num_steps"] == 50
    assert E.load_hparams("gpt-j", "ft1", "tracing_reversal")["norm_constraint"] == 1e-5
    assert E.load_hparams("gpt2-xl", "ft1", "ei")["norm_constraint"] == 1e-3
    assert E.load_hparams("gpt2-xl", "memit", "ei")["mom2_update_weight"] == 20000
    for method in E.METHODS:
        for problem in E.PROBLEMS:
            E.hparams_for(method, E.load_hparams("world", method, problem))
    assert E.hparams_for("ft5", {"norm_constraint": 1e-3}).window == 5
    assert E.hparams_for("ft1", {}).window == 1


# -------------------------------------------------------------------------------------- the tiny model


def test_context_templates(tiny):
    ct = tiny.templates
    assert len(ct.rome) == 21 and ct.rome[0] == "{}"
    assert [len(g) for g in ct.memit] == [1, 5] and ct.memit[0] == ["{}"]
    assert all(t.count("{}") == 1 and t.endswith("{}") for t in ct.rome + ct.memit[1])
    assert all(t.endswith(". {}") for t in ct.rome[1:])
    assert ct.flat("rome") == ct.rome and ct.flat("ft1") is None
    assert ct.flat("memit") == ["{}", *ct.memit[1]]  # MEMIT's groups in order, "{}" first
    E.templates._MEMORY.clear()
    again = E.context_templates(tiny.model, tiny.tok, cache_dir=tiny.cache_dir)  # from the disk cache
    assert again == ct
    assert E.templates.sample_context_templates(tiny.model, tiny.tok) == ct  # deterministic sampling


@pytest.mark.parametrize("method", E.METHODS)
def test_each_method_raises_target_probability(tiny, method):
    req = tiny.request
    p0 = float(tiny.p([req.text], [req.target])[0])
    e = E.edit(tiny.model, tiny.tok, req, method, 0, HP[method], stats=tiny.stats, templates=tiny.templates)
    with E.applied(tiny.model, e):
        p1 = float(tiny.p([req.text], [req.target])[0])
    if method == "memit":  # the tiny model barely routes this fact through layers 0-2: a weaker bar
        assert p1 > p0 and e.info["p_target"][-1] > 2 * p0, (method, p0, p1, e.info["p_target"][-1])
    else:
        assert p1 > 5 * p0, (method, p0, p1)
    assert float(tiny.p([req.text], [req.target])[0]) == p0  # restored


@pytest.mark.parametrize("method", ["rome", "ft1"])
def test_erasure_lowers_true_target(tiny, method):
    text = "Mira Quell lives in"
    true = max(RELATIONS["city"][1], key=lambda o: float(tiny.p([text], [o])[0]))
    req = E.EditRequest("{} lives in", "Mira Quell", true, direction="lower", case_id="fe")
    p0 = float(tiny.p([req.text], [req.target])[0])
    e = E.edit(tiny.model, tiny.tok, req, method, 0, HP[method], stats=tiny.stats, templates=tiny.templates)
    with E.applied(tiny.model, e):
        p1 = float(tiny.p([req.text], [req.target])[0])
    assert p1 < 0.5 * p0, (p0, p1)
    if method == "rome":
        assert e.info["updates"] == 20  # erasure: all iterations update


@pytest.mark.parametrize(
    "method,center,expected",
    [("rome", 0, [0]), ("rome", 3, [3]), ("ft1", 2, [2]), ("ft5", 0, [0, 1, 2]), ("ft5", 3, [1, 2, 3]),
     ("ft5", 1, [0, 1, 2, 3]), ("memit", 0, [0, 1, 2]), ("memit", 3, [1, 2, 3])],
)
def test_edit_touches_exactly_the_window(tiny, method, center, expected):
    e = E.edit(tiny.model, tiny.tok, tiny.request, method, center, HP[method], stats=tiny.stats,
               templates=tiny.templates)
    assert e.layers == expected and sorted(e.deltas) == expected
    assert all(float(d.abs().max()) > 0 for d in e.deltas.values())
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with E.applied(tiny.model, e):
        changed = {k for k, v in tiny.model.state_dict().items() if not torch.equal(v, before[k])}
    names = {models.module_name(tiny.model, "down_proj", l) for l in expected}
    assert {k.rsplit(".", 1)[0] for k in changed} == names
    if method.startswith("ft"):
        assert {k.rsplit(".", 1)[1] for k in changed} == {"weight", "bias"}
    else:
        assert {k.rsplit(".", 1)[1] for k in changed} == {"weight"}


@pytest.mark.parametrize("method,eps", [("ft1", 2e-3), ("ft5", 5e-4)])
def test_linf_clamp_holds_after_every_step(tiny, method, eps):
    e = E.edit(tiny.model, tiny.tok, tiny.request, method, 1, {"norm_constraint": eps}, stats=tiny.stats)
    dev = e.info["max_abs_delta"]
    assert len(dev) == len(e.info["loss"]) and e.info["updates"] > 0
    assert max(dev) <= eps * (1 + 1e-6)
    assert max(dev) == pytest.approx(eps)  # the constraint is active, so the test can fail
    W0 = {l: models.down_proj_out_in(tiny.model, l).clone() for l in e.layers}
    with E.applied(tiny.model, e):
        for l in e.layers:
            assert float((models.down_proj_out_in(tiny.model, l) - W0[l]).abs().max()) <= eps * 1.001


def test_ft_early_stop_and_step_rule(tiny):
    req = E.EditRequest("{} plays the", "Lila Durnov", "drums")  # already likely: the loss drops below 1e-2
    e = E.edit(tiny.model, tiny.tok, req, "ft5", 1, {"norm_constraint": 1.0, "num_steps": 100, "lr": 1e-2})
    losses = e.info["loss"]
    assert len(losses) < 100 and all(l < 1e-2 for l in losses[-5:])  # stopped after 5 steps below 1e-2
    assert losses[-6] >= 1e-2
    assert e.info["updates"] == sum(l >= 1e-2 for l in losses)  # a step only when loss >= 1e-2
    # erasure: loss = p(target); already below 1e-2 -> no step, and no early stop
    fe = E.EditRequest(tiny.request.prompt, tiny.request.subject, tiny.request.target, direction="lower")
    e = E.edit(tiny.model, tiny.tok, fe, "ft1", 1, {"norm_constraint": 1.0, "num_steps": 12})
    assert e.info["updates"] == 0 and len(e.info["loss"]) == 12
    assert float(e.deltas[1].abs().max()) == 0.0


def test_rome_rank_one_identity(tiny):
    e = E.edit(tiny.model, tiny.tok, tiny.request, "rome", 1, {}, stats=tiny.stats, templates=tiny.templates)
    i = e.info
    dw = e.deltas[1]
    assert dw.shape == models.dims(tiny.model)
    target = i["v_star"] - i["m"]
    assert torch.allclose(dw @ i["k_star"], target, atol=1e-5 * float(target.abs().max()) + 1e-6)
    r, u = e.factors[1]
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(torch.outer(r, u), dw)
    assert e.info["updates"] == 19  # 20 iterations, the last exits before its step
    # after the edit, the down-projection outputs v* at the last subject token of the bare prompt
    with E.applied(tiny.model, e):
        _, m_post = E.rome.keys_at(tiny.model, tiny.tok, [tiny.request.template], tiny.request.subject, 1)
    assert torch.allclose(m_post[0], i["v_star"], atol=1e-4)
    # u is the normalised C^-1 k̄
    u_ref = tiny.stats.inverse(1) @ i["k_bar"]
    assert torch.allclose(u, u_ref / u_ref.norm(), atol=1e-4)


def test_memit_structure(tiny):
    e = E.edit(tiny.model, tiny.tok, tiny.request, "memit", 2, HP["memit"], stats=tiny.stats, templates=tiny.templates)
    assert e.info["z_layer"] == 3 and e.layers == [0, 1, 2, 3]
    assert e.info["updates"] == 24
    for l in e.layers:
        r, a = e.factors[l]
        assert torch.allclose(torch.outer(r, a), e.deltas[l], atol=1e-7)
    # the first layer's residual is (z - h)/n with h the unedited block output
    first_r, _ = e.factors[0]
    assert torch.allclose(first_r * 4, e.info["z"] - e.info["h_init"], atol=1e-4)


def test_apply_restore_is_bitwise_exact(tiny):
    before_state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    before = tiny.logits(PROBE)
    for method in ["ft5", "rome", "memit"]:
        e = E.edit(tiny.model, tiny.tok, tiny.request, method, 1, HP[method], stats=tiny.stats,
                   templates=tiny.templates)
        with E.applied(tiny.model, e):
            assert not torch.equal(tiny.logits(PROBE), before)
        assert torch.equal(tiny.logits(PROBE), before)
        saved = E.apply_edit(tiny.model, e)
        E.restore(tiny.model, saved)
        for k, v in tiny.model.state_dict().items():
            assert torch.equal(v, before_state[k]), k
    with pytest.raises(RuntimeError):  # restored on exceptions too
        with E.applied(tiny.model, e):
            raise RuntimeError
    assert torch.equal(tiny.logits(PROBE), before)


@pytest.mark.parametrize("method", ["rome", "ft5"])
def test_hooked_edit_matches_written_weights(tiny, method):
    e = E.edit(tiny.model, tiny.tok, tiny.request, method, 1, HP[method], stats=tiny.stats, templates=tiny.templates)
    with E.applied(tiny.model, e):
        written = tiny.logits(PROBE)
    with E.edit_hooks(tiny.model, e):
        via_hooks = tiny.logits(PROBE)
    assert torch.allclose(written, via_hooks, atol=1e-4)


@pytest.mark.parametrize("method", E.METHODS)
def test_determinism(tiny, method):
    req = E.EditRequest("{} plays the", "Ottar Venn", "violin", noise=E.NoiseSpec(0.3, n_samples=3, seed=1),
                        case_id="ff")
    e1 = E.edit(tiny.model, tiny.tok, req, method, 1, HP[method], stats=tiny.stats, templates=tiny.templates)
    e2 = E.edit(tiny.model, tiny.tok, req, method, 1, HP[method], stats=tiny.stats, templates=tiny.templates)
    for l in e1.layers:
        assert torch.equal(e1.deltas[l], e2.deltas[l])
    # a different noise seed gives a different edit (the noise is really there)
    req3 = E.EditRequest(req.prompt, req.subject, req.target, noise=E.NoiseSpec(0.3, n_samples=3, seed=2))
    e3 = E.edit(tiny.model, tiny.tok, req3, method, 1, HP[method], stats=tiny.stats, templates=tiny.templates)
    assert not torch.equal(e1.deltas[1], e3.deltas[1])


@pytest.mark.parametrize("mode", ["subject", "code"])
def test_noise_positions(tiny, mode):
    spec = E.NoiseSpec(1.0, seed=0, positions=mode)
    bare = "The mother tongue of {} is"
    templated = "Kato Brenn is a. " + bare
    subject = "Zor Makken"
    ranges = B.subject_ranges(tiny.tok, [bare, templated], subject)
    npos = B.NoisePositions(spec, ranges[0])
    batch = scoring.make_batch(tiny.tok, [B.fill(t, subject) for t in (bare, templated)])
    embed = models.module_name(tiny.model, "embed")
    with torch.no_grad():
        with hooks.trace(tiny.model, embed, stop=True) as clean:
            tiny.model(**batch.model_inputs())
        with B.input_noise(tiny.model, spec, npos):
            npos.set_rows(ranges)
            with hooks.trace(tiny.model, embed, stop=True) as noisy:
                tiny.model(**batch.model_inputs())
    diff = (noisy.outputs[embed] - clean.outputs[embed]).abs().sum(-1) > 0
    for row, (b, e) in enumerate(ranges):
        expect = torch.zeros(diff.shape[1], dtype=torch.bool)
        lo, hi = (b, e) if mode == "subject" else ranges[0]
        expect[lo:hi] = True
        assert torch.equal(diff[row], expect), (mode, row, diff[row])


# ------------------------------------------------------------------------------------------- statistics


def _keys_direct(model, tok, docs, layer, max_len=64):
    """All down-projection inputs over docs, one doc at a time, via a plain forward hook (not hooks.trace)."""
    out = []
    mod = models.module(model, "down_proj", layer)
    h = mod.register_forward_hook(lambda m, a, o: out.append(a[0][0].numpy().astype(np.float64)))
    try:
        with torch.no_grad():
            for d in docs:
                ids = scoring.encode(tok, d)[:max_len]
                model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    return np.concatenate(out)


def test_second_moments_match_numpy_and_cache_roundtrips(tiny, tmp_path):
    docs = tiny.docs[:30]
    st = E.SecondMoments(tiny.model, tiny.tok, docs, n_tokens=10**6, cache_dir=tmp_path, batch_size=7, progress=False)
    st.precompute([0, 2])
    K = _keys_direct(tiny.model, tiny.tok, docs, 2)
    C_ref = K.T @ K / len(K)
    C = st.moment(2)
    assert C.dtype == torch.float32 and st.counts[2] == len(K)
    np.testing.assert_allclose(C.numpy(), C_ref, rtol=1e-5, atol=1e-7)
    files = sorted(p.name for p in (st.dir).glob("*.safetensors"))
    assert files == ["layer0_n1000000.safetensors", "layer2_n1000000.safetensors"]
    st2 = E.SecondMoments(tiny.model, tiny.tok, docs, n_tokens=10**6, cache_dir=tmp_path, progress=False)
    assert st2._load(2) and torch.equal(st2.moment(2), C) and st2.counts[2] == len(K)
    inv = st2.inverse(2)
    assert torch.equal(inv, torch.linalg.inv(C.double()).float())  # inverted in float64, stored as float32
    # an inverse up to float32 rounding: the residual scales with the condition number of C (few keys here)
    resid = float((inv.double() @ C.double() - torch.eye(C.shape[0], dtype=torch.float64)).abs().max())
    cond = float(torch.linalg.cond(C.double()))
    assert resid <= 1e-7 * cond and resid < 0.05, (resid, cond)
    # a token budget stops exactly at n_tokens
    st3 = E.SecondMoments(tiny.model, tiny.tok, docs, n_tokens=50, progress=False)
    st3.precompute([1])
    assert st3.counts[1] == 50


def test_second_moments_budget_takes_the_seeded_documents_first_tokens(tiny):
    """A token budget keeps the keys of the first n tokens of the documents in the seeded order (the last one cut),
    whatever the batches: C equals the plain sum over exactly those keys."""
    import random

    docs = tiny.docs[:30]
    n = 137
    order = list(range(len(docs)))
    random.Random(3).shuffle(order)
    K = _keys_direct(tiny.model, tiny.tok, [docs[i] for i in order], 1)[:n]  # max_len 64 = tiny's n_positions
    for batch_tokens, batch_size in [(64, 1), (4096, 64), (200, 5)]:
        moms, count = E.compute_second_moments(tiny.model, tiny.tok, docs, [1], n, seed=3, progress=False,
                                               batch_tokens=batch_tokens, batch_size=batch_size)
        assert count == n
        np.testing.assert_allclose(moms[1].numpy(), K.T @ K / n, rtol=1e-5, atol=1e-7)


def test_length_batches_bound_rows_and_padded_tokens():
    from helpers.editing.stats import length_batches

    lengths = [5, 100, 7, 30, 30, 2, 300, 1]
    batches = length_batches(lengths, batch_tokens=64, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every document once
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 64  # a long one alone, else within budget
    assert batches[0] == [6] and batches[1] == [1]  # longest first, each alone
    assert [lengths[i] for i in batches[2]] == [30, 30]


def test_second_moments_refuse_inside_noise_hook(tiny):
    st = E.SecondMoments(tiny.model, tiny.tok, tiny.docs[:10], n_tokens=100, progress=False)
    npos = B.NoisePositions(E.NoiseSpec(0.1), (0, 1))
    with B.input_noise(tiny.model, E.NoiseSpec(0.1), npos):
        with pytest.raises(RuntimeError, match="precompute"):
            st.precompute([0])


# ------------------------------------------------------------------------------------- smoke world model


def test_methods_on_smoke_world():
    """On the smoke world (trained into the project cache if missing, ~20 s): every method raises p(target_new)."""
    from helpers.world import ensure_world_model

    cache = os.environ.get("HELPERS_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))
    _check_methods_raise(ensure_world_model("smoke", cache))


def _check_methods_raise(folder, n_cases: int = 4) -> None:
    """Every method raises p(target_new) on the rewrite prompt for most of the first facts, and on average by
    a clear margin (a fact the tiny model cannot be pushed on, p ~ 1e-6 before and after, may stay put)."""
    import json

    model, tok = models.load_model(folder)
    records = json.loads((folder / "counterfact.json").read_text())[:n_cases]
    stats = E.SecondMoments(model, tok, folder / "corpus.txt", n_tokens=4000, progress=False)
    templates = E.context_templates(model, tok)
    L = models.n_layers(model)
    reqs = [E.EditRequest(r["requested_rewrite"]["prompt"], r["requested_rewrite"]["subject"],
                          r["requested_rewrite"]["target_new"]["str"], case_id=r["case_id"]) for r in records]
    p0 = [float(scoring.target_probs(model, tok, [q.text], [q.target])[0]) for q in reqs]
    for method in E.METHODS:
        hp = E.load_hparams("world", method, "error_injection")
        p1 = []
        for q in reqs:
            e = E.edit(model, tok, q, method, max(0, L // 2 - 2), hp, stats=stats, templates=templates)
            with E.applied(model, e):
                p1.append(float(scoring.target_probs(model, tok, [q.text], [q.target])[0]))
        raised = sum(b > a for a, b in zip(p0, p1))
        assert raised >= n_cases - 1, (method, p0, p1)
        assert sum(p1) / n_cases > sum(p0) / n_cases + 0.05, (method, p0, p1)
