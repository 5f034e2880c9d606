"""Tests of helpers.editing.batched (issue 8): batched edits equal the one-fact path, per-example application
equals writing the weights, per-fact clamps and step rules.

Uses the tiny GPT-2 of tests/test_editing.py (trained here for a few seconds).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_editing import HP, Tiny  # noqa: E402  (the tiny-model fixture helper)

from helpers import editing as E  # noqa: E402
from helpers import evaluation, models, scoring  # noqa: E402
from helpers.editing import batched as BT  # noqa: E402
from helpers.editing import batched_deltas  # noqa: E402  (where the batched path makes its SuffixPass)
from helpers.problems import Task  # noqa: E402

torch.set_num_threads(1)

FF = E.NoiseSpec(0.3, n_samples=3, seed=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("batched_cache"))


def _requests() -> list[E.EditRequest]:
    """A mixed batch: raise (EI-like), lower (FE), Fact Forcing noise (subject positions and code positions)."""
    return [
        E.EditRequest("The mother tongue of {} is", "Zor Makken", "German", case_id=1),
        E.EditRequest("{} lives in", "Lila Durnov", "Madrid", direction="lower", case_id=2),
        E.EditRequest("{} plays the", "Ottar Venn", "violin", noise=FF, case_id=3),
        E.EditRequest("The home city of {} is", "Mira Quell", "Rome", case_id=4),
        E.EditRequest("{} is a native speaker of", "Kato Brenn", "Spanish", case_id=5,
                      noise=E.NoiseSpec(0.3, n_samples=2, seed=4, positions="code")),
    ]


def _p(tiny, req: E.EditRequest, edit: E.Edit | None = None) -> float:
    if edit is None:
        return float(tiny.p([req.text], [req.target])[0])
    with E.applied(tiny.model, edit):
        return float(tiny.p([req.text], [req.target])[0])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------ parity (exact)


@pytest.mark.parametrize("method", E.METHODS)
def test_edit_many_is_bitwise_the_one_fact_path(tiny, method):
    reqs = _requests()
    one = [E.edit(tiny.model, tiny.tok, r, method, 1, HP[method], stats=tiny.stats, templates=tiny.templates)
           for r in reqs]
    many = BT.edit_many(tiny.model, tiny.tok, reqs, method, 1, HP[method], stats=tiny.stats,
                        templates=tiny.templates)
    assert len(many) == len(reqs)
    for r, a, b in zip(reqs, many, one):
        assert a.method == b.method and a.layers == b.layers
        assert sorted(a.deltas) == sorted(b.deltas) and sorted(a.bias_deltas) == sorted(b.bias_deltas)
        for l in b.deltas:
            assert torch.equal(a.deltas[l], b.deltas[l]), (method, r.case_id, l, _rel(a.deltas[l], b.deltas[l]))
        for l in b.bias_deltas:
            assert torch.equal(a.bias_deltas[l], b.bias_deltas[l]), (method, r.case_id, l)
        for l in b.factors:
            assert all(torch.equal(x, y) for x, y in zip(a.factors[l], b.factors[l]))
        assert a.info["updates"] == b.info["updates"] and a.info["loss"] == b.info["loss"]
        assert a.info["batch_size"] == len(reqs)
    # the edits do something (so equality is not trivially between no-ops)
    assert any(float(d.abs().max()) > 0 for e in many for d in e.deltas.values())
    if method == "rome":
        assert [e.info["updates"] for e in many] == [19, 20, 19, 19, 19]  # erasure does every step


def test_edit_many_chunks_and_empty(tiny):
    reqs = _requests()[:3]
    whole = BT.edit_many(tiny.model, tiny.tok, reqs, "ft1", 2, HP["ft1"])
    chunked = BT.edit_many(tiny.model, tiny.tok, reqs, "ft1", 2, HP["ft1"], chunk_size=2)
    for a, b in zip(whole, chunked):
        assert torch.equal(a.deltas[2], b.deltas[2])
    assert [e.info["batch_size"] for e in chunked] == [2, 2, 1]
    assert BT.edit_many(tiny.model, tiny.tok, [], "rome", 1) == []


# ---------------------------------------------------------------------------------- parity (fast, padded)


@pytest.mark.parametrize("method", E.METHODS)
def test_edit_many_fast_mode_within_tolerance(tiny, method):
    """One padded pass per step (exact=False): float-rounding differences only. Post-edit probabilities agree
    to 1e-5 relative; ROME/MEMIT deltas to 1e-4 of their max (FT's Adam turns rounding in near-zero gradients
    into up to ±lr per step on single elements, so FT is compared on probabilities)."""
    reqs = _requests()[:4]
    # MEMIT at central layer 1 has z = the last block, where δ reaches the loss only through float noise (see
    # test_fast_mode_recomputes_only_suffixes_within_tolerance): its trajectory then depends on how the rows are padded
    layer = 0 if method == "memit" else 1
    one = [E.edit(tiny.model, tiny.tok, r, method, layer, HP[method], stats=tiny.stats, templates=tiny.templates)
           for r in reqs]
    many = BT.edit_many(tiny.model, tiny.tok, reqs, method, layer, HP[method], stats=tiny.stats,
                        templates=tiny.templates, exact=False)
    for r, a, b in zip(reqs, many, one):
        assert a.info["updates"] == b.info["updates"]
        if method in ("rome", "memit"):
            for l in b.deltas:
                assert _rel(a.deltas[l], b.deltas[l]) < 1e-4, (method, r.case_id, l)
        pa, pb = _p(tiny, r, a), _p(tiny, r, b)
        assert abs(pa - pb) <= 1e-5 * pb, (method, r.case_id, pa, pb)


def _spy_suffix_passes(monkeypatch) -> tuple[list, list]:
    """Swap in a SuffixPass that records every instance made and every suffix-only pass run."""
    made, used = [], []

    class Spy(batched_deltas.SuffixPass):
        def __post_init__(self, cache):
            super().__post_init__(cache)
            made.append(self)

        def model_inputs(self, model):
            used.append(1)
            return super().model_inputs(model)

    monkeypatch.setattr(batched_deltas, "SuffixPass", Spy)
    return made, used


def _one_and_many(tiny, reqs, method, layer: int = 1):
    """The same requests edited one fact at a time and batched (fast mode) at ``layer``."""
    one = [E.edit(tiny.model, tiny.tok, r, method, layer, HP[method], stats=tiny.stats, templates=tiny.templates)
           for r in reqs]
    many = BT.edit_many(tiny.model, tiny.tok, reqs, method, layer, HP[method], stats=tiny.stats,
                        templates=tiny.templates, exact=False)
    return one, many


def _steps(tiny, method) -> int:
    return E.prepare(tiny.model, tiny.tok, method, 1, HP[method], tiny.stats, tiny.templates)[0].v_num_grad_steps


def _assert_same_edits(tiny, reqs, many, one, method) -> None:
    """Fast-mode tolerance: deltas to 1e-4 of their max, post-edit probabilities to 1e-5 relative."""
    for r, a, b in zip(reqs, many, one):
        assert a.info["updates"] == b.info["updates"]
        for l in b.deltas:
            assert _rel(a.deltas[l], b.deltas[l]) < 1e-4, (method, r.case_id, l)
        pa, pb = _p(tiny, r, a), _p(tiny, r, b)
        assert abs(pa - pb) <= 1e-5 * pb, (method, r.case_id, pa, pb)


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_fast_mode_recomputes_only_suffixes_within_tolerance(tiny, method, monkeypatch):
    """Clean requests in fast mode: one full pass without autograd fills the prefix cache and the stream below
    the block, then every step (the first included) runs only the positions from each row's subject on
    (helpers.suffix) and still agrees with the one-fact path: deltas to 1e-4 of their max, post-edit
    probabilities to 1e-5 relative. Switching reuse off (hooks.REUSE_BELOW) gives full passes."""
    from helpers import hooks

    reqs = [r for r in _requests() if r.noise is None]
    made, used = _spy_suffix_passes(monkeypatch)
    # MEMIT at central layer 1 of the 4-layer model has z = the last block: there δ reaches the loss only through
    # the KL term, whose gradient at δ = 0 is float noise that Adam's first step blows up to lr; at layer 0, z = 2
    one, many = _one_and_many(tiny, reqs, method, layer=0 if method == "memit" else 1)
    # one padded pass; its suffixes are well under its full length
    assert len(made) == 1 and made[0].input_ids.shape[1] / made[0].full.input_ids.shape[1] < 0.7
    assert len(used) == _steps(tiny, method)  # every step runs the suffixes only (a graph-free full pass primes them)
    _assert_same_edits(tiny, reqs, many, one, method)
    monkeypatch.setattr(hooks, "REUSE_BELOW", False)
    BT.edit_many(tiny.model, tiny.tok, reqs[:1], method, 1, HP[method], stats=tiny.stats,
                 templates=tiny.templates, exact=False)
    assert len(made) == 1


def test_fast_rome_reads_its_keys_from_the_first_pass(tiny, monkeypatch):
    """Clean rows in fast mode: ROME's keys (k̄ over the templated prompts, k* and W k* of the bare one) come from
    the optimisation's graph-free first pass, which runs those tokens anyway: no key pass of their own, and the
    same keys as key passes give (to float rounding: other shapes). Under input noise the key passes stay, where
    the one-fact path runs them (templated keys before the optimisation, k* after), for the same noise draws."""
    from helpers.editing import batched_rome_memit as BRM

    reqs = [r for r in _requests() if r.noise is None]
    calls, real = [], BRM._keys_many

    def spy(*args, **kwargs):
        calls.append(len(args[2][0]))  # templates per fact: 21 (k̄) or 1 (k*)
        return real(*args, **kwargs)

    monkeypatch.setattr(BRM, "_keys_many", spy)
    many = BT.edit_many(tiny.model, tiny.tok, reqs, "rome", 1, HP["rome"], stats=tiny.stats,
                        templates=tiny.templates, exact=False)
    assert calls == []
    templated = real(tiny.model, tiny.tok, [[E.fill(c, r.template) for c in tiny.templates.rome] for r in reqs],
                     reqs, 1, None)
    bare = real(tiny.model, tiny.tok, [[r.template] for r in reqs], reqs, 1, None)
    for e, (k_in, _, _), (k_star, m, _) in zip(many, templated, bare):
        assert _rel(e.info["k_bar"], k_in.double().mean(0).float()) < 1e-5
        assert _rel(e.info["k_star"], k_star[0]) < 1e-5 and _rel(e.info["m"], m[0]) < 1e-5
    BT.edit_many(tiny.model, tiny.tok, [_requests()[2]], "rome", 1, HP["rome"], stats=tiny.stats,
                 templates=tiny.templates, exact=False)
    assert calls == [len(tiny.templates.rome), 1]


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_fast_mode_under_subject_noise_recomputes_from_the_subject(tiny, method, monkeypatch):
    """Fact Forcing in fast mode: fresh noise on each row's own subject tokens at every step, so nothing below
    the block is reused, but the prefix before the subject is: from step 1 on, passes run only the positions
    from each row's subject start, with the same noise draws, and agree with the one-fact path (deltas to 1e-4
    of their max, post-edit probabilities to 1e-5 relative). Noise at the code's positions (inside the
    prefix) keeps full passes."""
    reqs = [_requests()[2], _requests()[0]]  # subject-position noise, and a clean request in the same batch
    monkeypatch.setattr(batched_deltas, "PASS_OVERHEAD_POSITIONS", 10**9)  # in the same pass, too
    made, used = _spy_suffix_passes(monkeypatch)
    one, many = _one_and_many(tiny, reqs, method)
    assert len(made) == 1 and len(used) == _steps(tiny, method) - 1
    cut = made[0].cut
    n_rows = len(cut) // len(reqs)
    templates = tiny.templates.flat(method)
    full = [E.fill(c, reqs[0].template) for c in templates] + ["{} is a"]
    starts = [b for b, _ in BT.subject_ranges(tiny.tok, full, reqs[0].subject)]
    assert cut[:n_rows].tolist() == starts and max(starts) > 0  # cut at each row's subject start
    _assert_same_edits(tiny, reqs, many, one, method)
    assert many[0].deltas and any(float(d.abs().max()) > 0 for d in many[0].deltas.values())
    BT.edit_many(tiny.model, tiny.tok, [_requests()[4]], method, 1, HP[method], stats=tiny.stats,
                 templates=tiny.templates, exact=False)
    assert len(made) == 1  # code-position noise lands in the prefix: full passes only


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_clean_suffix_steps_start_above_the_edited_block(tiny, method, monkeypatch):
    """Clean fast-mode steps do not run the edited block: δ lands on its output unchanged (MEMIT's block output;
    ROME's MLP output, which GPT-2 adds straight into the stream), so every step replays that output, recorded
    once with δ = 0, plus δ into the block above (batched_deltas.resume_layer), and the edits still agree with
    the one-fact path (deltas to 1e-4 of their max, post-edit probabilities to 1e-5 relative)."""
    from helpers import hooks

    reqs = [r for r in _requests() if r.noise is None]
    layer = 0 if method == "memit" else 1  # MEMIT's z at central layer 0 is block 2 (see the test above)
    top = 2 if method == "memit" else 1
    kind = "block" if method == "memit" else "mlp"
    assert batched_deltas.resume_layer(tiny.model, kind, top) == top + 1
    assert batched_deltas.resume_layer(tiny.model, kind, 3) == 3  # the top block: nothing above to resume at
    calls, real = [], hooks.resume_at

    def spy(model, at, hidden, force=False):
        calls.append(at)
        return real(model, at, hidden, force)

    one = [E.edit(tiny.model, tiny.tok, r, method, layer, HP[method], stats=tiny.stats, templates=tiny.templates)
           for r in reqs]
    monkeypatch.setattr(hooks, "resume_at", spy)
    many = BT.edit_many(tiny.model, tiny.tok, reqs, method, layer, HP[method], stats=tiny.stats,
                        templates=tiny.templates, exact=False)
    assert calls.count(top + 1) == _steps(tiny, method) and top not in calls
    _assert_same_edits(tiny, reqs, many, one, method)


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_clean_steps_without_a_suffix_pass_run_full_passes(tiny, method, monkeypatch):
    """When no suffix pass can be built for a batch (a cut outside its prompt: SuffixPass raises), the priming
    pass records nothing and every step runs full passes through the edited block, replaying the stream that
    enters it (not the one above it, which only a primed step reads), and the edits still agree with the
    one-fact path."""
    reqs = [r for r in _requests() if r.noise is None]

    class NoSuffix(batched_deltas.SuffixPass):
        def __post_init__(self, cache):
            raise ValueError("cut outside its prompt (forced)")

    layer = 0 if method == "memit" else 1
    one = [E.edit(tiny.model, tiny.tok, r, method, layer, HP[method], stats=tiny.stats, templates=tiny.templates)
           for r in reqs]
    monkeypatch.setattr(batched_deltas, "SuffixPass", NoSuffix)
    many = BT.edit_many(tiny.model, tiny.tok, reqs, method, layer, HP[method], stats=tiny.stats,
                        templates=tiny.templates, exact=False)
    _assert_same_edits(tiny, reqs, many, one, method)


def test_memit_window_passes_replay_the_stream_below_the_window(tiny, monkeypatch):
    """Clean MEMIT requests with a window above layer 0 (layers 1-2 of the 4-layer model): the key passes of
    the window's second layer replay the stream entering layer 1 recorded by the first layer's passes (the
    templates' keys and the bare prompts' z-layer outputs: two replays), and the edits still agree with the
    one-fact path, which runs every pass from the embeddings."""
    from helpers import hooks

    reqs = [r for r in _requests() if r.noise is None]
    hp = {**HP["memit"], "window": 2}
    assert list(E.edit_layers(tiny.model, "memit", 2, hp)) == [1, 2]
    calls, real = [], hooks.resume_at

    def spy(model, layer, hidden, force=False):
        calls.append(layer)
        return real(model, layer, hidden, force)

    one = [E.edit(tiny.model, tiny.tok, r, "memit", 2, hp, stats=tiny.stats, templates=tiny.templates) for r in reqs]
    monkeypatch.setattr(hooks, "resume_at", spy)
    many = BT.edit_many(tiny.model, tiny.tok, reqs, "memit", 2, hp, stats=tiny.stats, templates=tiny.templates,
                        exact=False)
    assert calls.count(1) == 2
    _assert_same_edits(tiny, reqs, many, one, "memit")


def test_pass_groups_known_answers():
    """Facts of 22 rows with these suffix lengths: one pass pads 8 facts to 8 positions (1,408 row-positions +
    32); [5, 5] | [7 x 5] | [8] costs 220 + 770 + 176 + 3 x 32 = 1,262, the least."""
    lengths = [7, 5, 5, 7, 7, 8, 7, 7]
    assert batched_deltas.pass_groups(lengths, 22, overhead=32) == [[1, 2], [0, 3, 4, 6, 7], [5]]
    assert batched_deltas.pass_groups(lengths, 22, overhead=10**9) == [list(range(8))]
    assert batched_deltas.pass_groups(lengths, 22, overhead=0) == [[1, 2], [0, 3, 4, 6, 7], [5]]
    assert batched_deltas.pass_groups([3, 9], 1, overhead=7) == [[0, 1]]  # 18 + 7 < 3 + 9 + 14
    assert batched_deltas.pass_groups([3, 9], 7, overhead=5) == [[0], [1]]  # 21 + 63 + 10 < 126 + 5
    assert batched_deltas.pass_groups([], 7) == []


def test_fast_mode_splits_clean_and_noised_facts_into_their_own_passes(tiny, monkeypatch):
    """A clean fact (cut at its last subject token, prefix reused) and a Fact Forcing one (cut at its subject
    start, recomputed from there) in one call: each gets the pass its rows need, and both still agree with the
    one-fact path."""
    reqs = [_requests()[2], _requests()[0]]
    # a pass costs 32 padded row-positions: less than these two facts' rows would pad in one pass
    monkeypatch.setattr(batched_deltas, "PASS_OVERHEAD_POSITIONS", 32)
    made, used = _spy_suffix_passes(monkeypatch)
    one, many = _one_and_many(tiny, reqs, "rome")
    assert len(made) == 2 and all(len(m.cut) == len(tiny.templates.rome) + 1 for m in made)
    ranges = [BT.subject_ranges(tiny.tok, [E.fill(c, r.template) for c in tiny.templates.rome] + ["{} is a"],
                                r.subject) for r in reqs]
    cuts = sorted(m.cut.tolist() for m in made)
    assert cuts == sorted([[b for b, _ in ranges[0]], [e - 1 for _, e in ranges[1]]])
    _assert_same_edits(tiny, reqs, many, one, "rome")


def test_batch_order_by_the_positions_a_pass_needs(tiny):
    """ROME/MEMIT: the positions from the last subject token to the end of the target (a long prefix costs
    nothing: it is reused); FT: the whole row; ties keep the given order."""
    reqs = [E.EditRequest("In the long and winding story told by the old man, {} is", "Zor Makken", "violin"),
            E.EditRequest("{} lives in the big city with the tall towers of", "Lila Durnov", "violin"),
            E.EditRequest("{} plays", "Ottar Venn", "violin"),
            E.EditRequest("{} plays", "Mira Quell", "violin")]
    assert BT.batch_order(tiny.tok, reqs, "rome") == BT.batch_order(tiny.tok, reqs, "memit") == [0, 2, 3, 1]
    assert BT.batch_order(tiny.tok, reqs, "ft1") == [2, 3, 1, 0]


# ------------------------------------------------------------------------------- per-fact rules (FT)


def test_per_fact_linf_clamp(tiny):
    eps = 2e-3
    reqs = _requests()[:4]
    many = BT.edit_many(tiny.model, tiny.tok, reqs, "ft5", 1, {"norm_constraint": eps}, exact=False)
    for e in many:
        dev = e.info["max_abs_delta"]
        assert len(dev) == len(e.info["loss"])
        assert max(dev) <= eps * (1 + 1e-6)
        for t in [*e.deltas.values(), *e.bias_deltas.values()]:
            assert float(t.abs().max()) <= eps * (1 + 1e-6)
    trained = [e for e in many if e.info["updates"] > 0]
    assert any(max(e.info["max_abs_delta"]) == pytest.approx(eps) for e in trained)  # the clamp is active
    # the fact whose loss starts below 1e-2 (erasure of an unlikely target) never moves
    skipped = [e for e in many if e.info["updates"] == 0]
    assert all(float(t.abs().max()) == 0 for e in skipped for t in e.deltas.values())


def test_per_fact_step_skipping_and_early_stop(tiny):
    """Facts stop and skip steps independently; a skipped step does not advance that fact's Adam state."""
    likely = E.EditRequest("{} plays the", "Lila Durnov", "drums", case_id="likely")  # loss soon < 1e-2
    hard = E.EditRequest("The mother tongue of {} is", "Zor Makken", "German", case_id="hard")
    low = E.EditRequest("The mother tongue of {} is", "Zor Makken", "German", direction="lower", case_id="low")
    hp = {"norm_constraint": 1.0, "num_steps": 40, "lr": 1e-2}
    reqs = [likely, hard, low]
    one = [E.edit(tiny.model, tiny.tok, r, "ft5", 1, hp) for r in reqs]
    for exact in (True, False):
        many = BT.edit_many(tiny.model, tiny.tok, reqs, "ft5", 1, hp, exact=exact)
        for a, b in zip(many, one):
            assert a.info["updates"] == b.info["updates"] == sum(l >= 1e-2 for l in a.info["loss"])
            assert len(a.info["loss"]) == len(b.info["loss"])
    e_likely, e_hard, e_low = many
    assert len(e_likely.info["loss"]) < 40 and all(l < 1e-2 for l in e_likely.info["loss"][-5:])  # stopped
    assert e_low.info["updates"] == 0 and len(e_low.info["loss"]) == 40  # erasure: p < 1e-2, never stops
    assert 0 < e_hard.info["updates"]
    assert e_likely.info["updates"] < len(e_likely.info["loss"])  # the last 5 iterations took no step


def test_per_fact_adam_state_with_interleaved_skips(tiny):
    """Two facts, one of which skips steps while the other keeps stepping: exact equality per fact."""
    a = E.EditRequest("{} lives in", "Runa Fael", "Berlin", case_id="a")
    b = E.EditRequest("{} plays the", "Lila Durnov", "drums", case_id="b")
    hp = {"norm_constraint": 1.0, "num_steps": 15, "lr": 3e-2}
    one = [E.edit(tiny.model, tiny.tok, r, "ft1", 2, hp) for r in (a, b)]
    many = BT.edit_many(tiny.model, tiny.tok, [a, b], "ft1", 2, hp)
    assert one[0].info["updates"] != one[1].info["updates"]  # different step counts: per-fact Adam matters
    for x, y in zip(many, one):
        assert torch.equal(x.deltas[2], y.deltas[2]) and torch.equal(x.bias_deltas[2], y.bias_deltas[2])


# ------------------------------------------------------------------------------ per-example application


PROMPTS = [["The mother tongue of Zor Makken is", "Zor Makken is a native speaker of"],
           ["Lila Durnov lives in"],
           ["Ottar Venn plays the", "The instrument of Ottar Venn is the", "Kato Brenn lives in"],
           ["Mira Quell lives in", "Edda Sorn plays the"]]
TARGETS = [["German", "German"], ["Madrid"], ["violin", "violin", "Paris"], ["Rome", "piano"]]


def test_applied_per_example_equals_written_weights(tiny):
    reqs = _requests()[:3]
    methods = ["rome", "memit", "ft5"]  # one edit of each kind in the same batch
    edits = [E.edit(tiny.model, tiny.tok, r, m, 1, HP[m], stats=tiny.stats, templates=tiny.templates)
             for r, m in zip(reqs, methods)]
    edits.append(None)  # the last block is the unedited model
    ref = []
    for e, ps, ts in zip(edits, PROMPTS, TARGETS):
        if e is None:
            ref += scoring.target_probs(tiny.model, tiny.tok, ps, ts).tolist()
        else:
            with E.applied(tiny.model, e):
                ref += scoring.target_probs(tiny.model, tiny.tok, ps, ts).tolist()
    flat_p = [p for ps in PROMPTS for p in ps]
    flat_t = [t for ts in TARGETS for t in ts]
    with BT.applied_per_example(tiny.model, edits, [len(p) for p in PROMPTS]):
        got = scoring.target_probs(tiny.model, tiny.tok, flat_p, flat_t, batch_size=len(flat_p)).tolist()
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, rel=1e-5, abs=1e-9)
    # the edits matter, so the comparison can fail
    clean = scoring.target_probs(tiny.model, tiny.tok, flat_p, flat_t).tolist()
    assert max(abs(a - b) / b for a, b in zip(got[:6], clean[:6])) > 1e-2
    # a row -> edit index tensor, rows interleaved, gives the same numbers
    order = [5, 0, 7, 2, 1, 6, 3, 4]
    idx = torch.tensor([[0, 0, 1, 2, 2, 2, 3, 3][i] for i in order])
    idx[idx == 3] = -1
    with BT.applied_per_example(tiny.model, edits, idx):
        got2 = scoring.target_probs(tiny.model, tiny.tok, [flat_p[i] for i in order], [flat_t[i] for i in order],
                                    batch_size=8).tolist()
    for g, i in zip(got2, order):
        assert g == pytest.approx(ref[i], rel=1e-5, abs=1e-9)


def test_measure_many_equals_measure(tiny):
    reqs = _requests()[:3]
    methods = ["rome", "ft1", "ft5"]
    facts = [
        {"prompt": "The mother tongue of {} is", "subject": "Zor Makken", "target_true": "French",
         "paraphrase_prompts": ["Zor Makken is a native speaker of"],
         "neighborhood_prompts": ["The mother tongue of Lila Durnov is", "Nia Carrow lives in"]},
        {"prompt": "{} lives in", "subject": "Lila Durnov", "target_true": "Madrid",
         "paraphrase_prompts": ["The home city of Lila Durnov is", "Lila Durnov plays the drums. Lila Durnov lives in"],
         "neighborhood_prompts": ["Kato Brenn lives in"]},
        {"prompt": "{} plays the", "subject": "Ottar Venn", "target_true": "violin",
         "paraphrase_prompts": ["The instrument of Ottar Venn is the"],
         "neighborhood_prompts": ["Edda Sorn plays the", "Runa Fael plays the", "Pell Aston plays the"]},
    ]
    tasks = [Task(i, "x", r, r.target, "piano", "Berlin", 0.3 if r.noise is not None else None)
             for i, r in enumerate(reqs)]
    essences = [["Zor Makken is a singer. Zor Makken lives in Paris.", "Zor Makken is a"],
                ["Lila Durnov is a person who lives in Madrid."], None]
    edits = [E.edit(tiny.model, tiny.tok, r, m, 1, HP[m], stats=tiny.stats, templates=tiny.templates)
             for r, m in zip(reqs, methods)]
    _check_measure_many(tiny, tasks, facts, edits, essences)
    assert any(t.eval_sigma is not None for t in tasks)  # one fact noised: facts keep their rows in one pass
    # No noise: rows of any facts share passes by length (the long paraphrase gets a pass of its own)
    clean = [Task(i, "x", r, r.target, "piano", "Berlin", None) for i, r in enumerate(reqs)]
    widths = []
    handle = tiny.model.register_forward_pre_hook(lambda _m, a, kw: widths.append(kw["input_ids"].shape),
                                                  with_kwargs=True)
    try:
        BT.measure_many(tiny.model, tiny.tok, clean, facts, edits, None)
    finally:
        handle.remove()
    rows = [q for P in map(evaluation.Prompts.of, facts) for q in (P.rewrite, *P.paraphrases, *P.neighborhood)]
    one_pass = scoring.make_batch(tiny.tok, rows, ["piano"] * len(rows)).input_ids.shape[1]
    assert len(widths) > 2 and sum(r for r, _ in widths) == 2 * len(rows)  # p and p_base, every row once
    assert sum(r * t for r, t in widths) < 2 * len(rows) * one_pass  # fewer padded positions than one pass each
    _check_measure_many(tiny, clean, facts, edits, essences)


def _check_measure_many(tiny, tasks, facts, edits, essences):
    """measure_many (one pass and one fact per pass, edited and not) against evaluation.measure per fact."""
    ref = []
    for t, f, e, es in zip(tasks, facts, edits, essences):
        with E.applied(tiny.model, e):
            ref.append(evaluation.measure(tiny.model, tiny.tok, t, f, es))
    pre_ref = [evaluation.measure(tiny.model, tiny.tok, t, f, es) for t, f, es in zip(tasks, facts, essences)]
    for max_rows in (256, 3):  # one pass, and one fact per pass
        got = BT.measure_many(tiny.model, tiny.tok, tasks, facts, edits, essences, max_rows=max_rows)
        pre = BT.measure_many(tiny.model, tiny.tok, tasks, facts, None, essences, max_rows=max_rows)
        for g, r in zip(got + pre, ref + pre_ref):
            assert set(g) == set(r)
            for key in r:
                a, b = g[key], r[key]
                if isinstance(b, list):
                    assert len(a) == len(b) and all(x == pytest.approx(y, rel=1e-5, abs=1e-9) for x, y in zip(a, b)), key
                elif math.isnan(b):
                    assert math.isnan(a), key
                else:
                    assert a == pytest.approx(b, rel=1e-5), key
    assert abs(ref[2]["rewrite"] - pre_ref[2]["rewrite"]) > 1e-3  # the third fact's edit matters


def test_essence_passes_unembed_only_read_positions_in_chunks(tiny, monkeypatch):
    """Essence perplexities from passes cut by read positions, the unembedding at those positions only and the
    log-probabilities taken a few rows at a time equal evaluation.essence_ppl per fact (with and without noise);
    the unembedding never sees a padded or last position."""
    from helpers.editing import batched_eval

    texts = [["Zor Makken is a singer. Zor Makken lives in Paris.", "Zor Makken is a"],
             ["Lila Durnov is a person who lives in Madrid."], [], ["Ottar Venn is a violinist from Oslo."]]
    subjects = ["Zor Makken", "Lila Durnov", "Nobody", "Ottar Venn"]
    sigmas = [None, 0.4, None, None]
    ref = [evaluation.essence_ppl(tiny.model, tiny.tok, t, s, sg) if t else float("nan")
           for t, s, sg in zip(texts, subjects, sigmas)]
    ids = [[scoring.encode(tiny.tok, t) for t in ts] for ts in texts]
    seen = []
    head = models.module(tiny.model, "unembed")
    handle = head.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[:2]))
    monkeypatch.setattr(batched_eval, "ESSENCE_POSITIONS", 20)
    monkeypatch.setattr(batched_eval, "LOGPROB_CHUNK", 4)
    try:
        got = batched_eval._essence_many(tiny.model, tiny.tok, texts, subjects, sigmas, None)
    finally:
        handle.remove()
    assert math.isnan(got[2]) and math.isnan(ref[2])
    assert [g for k, g in enumerate(got) if k != 2] == pytest.approx([r for k, r in enumerate(ref) if k != 2], rel=1e-5)
    assert len(seen) > 1 and all(b == 1 for b, _ in seen)  # several passes, each unembedding gathered positions
    assert sum(r for _, r in seen) == sum(len(i) - 1 for ts in ids for i in ts)  # only the read positions
    lg = torch.randn(10, 7)
    want = torch.log_softmax(lg, -1)[torch.arange(10), torch.arange(10) % 7]
    torch.testing.assert_close(batched_eval._read_logprobs(lg, torch.arange(10) % 7), want)


def test_batched_noise_draws_equal_input_noise(tiny):
    """Fact k's rows get bitwise the noise base.input_noise gives them in a pass of their own."""
    from helpers import hooks, models
    from helpers.editing import base as B

    embed = models.module_name(tiny.model, "embed")
    facts = [(["The mother tongue of {} is", "{} is a"], "Zor Makken", E.NoiseSpec(0.5, seed=3)),
             (["{} lives in"], "Lila Durnov", None),
             (["{} plays the", "x. {} plays the"], "Ottar Venn", E.NoiseSpec(0.5, seed=7, positions="code"))]
    ref = []
    for temps, subj, spec in facts:
        ranges = B.subject_ranges(tiny.tok, temps, subj)
        batch = scoring.make_batch(tiny.tok, [B.fill(t, subj) for t in temps])
        npos = B.NoisePositions(spec, ranges[0])
        npos.set_rows(ranges)
        with torch.no_grad(), B.input_noise(tiny.model, spec, npos), hooks.trace(tiny.model, embed) as tr:
            for _ in range(2):  # two passes: the generator advances identically
                tiny.model(**batch.model_inputs())
        ref.append(tr.outputs[embed])
    texts = [B.fill(t, s) for temps, s, _ in facts for t in temps]
    batch = scoring.make_batch(tiny.tok, texts)
    code = [B.subject_token_range(tiny.tok, temps[0], s) for temps, s, _ in facts]
    with torch.no_grad(), BT.batched_noise(tiny.model, [f[2] for f in facts], code) as nr, \
            hooks.trace(tiny.model, embed) as tr:
        for _ in range(2):
            nr.set_rows([(k, B.subject_ranges(tiny.tok, temps, s)) for k, (temps, s, _) in enumerate(facts)])
            tiny.model(**batch.model_inputs())
    got, r0 = tr.outputs[embed], 0
    for x in ref:
        assert torch.equal(got[r0 : r0 + x.shape[0], : x.shape[1]], x)
        r0 += x.shape[0]


@pytest.mark.parametrize("method", E.METHODS)
def test_reusing_lower_layers_changes_nothing(tiny, method, monkeypatch):
    """Reusing the stream below the edited layer (hooks.resume_at) gives bitwise the edits of full passes, for
    clean requests and for Fact Forcing, whose input noise is drawn afresh on every pass (so the optimisation
    must not reuse the first pass's noised stream), one fact at a time and batched."""
    from helpers import hooks

    reqs = _requests()

    def run():
        one = [E.edit(tiny.model, tiny.tok, r, method, 1, HP[method], stats=tiny.stats, templates=tiny.templates)
               for r in reqs]
        many = BT.edit_many(tiny.model, tiny.tok, reqs, method, 1, HP[method], stats=tiny.stats,
                            templates=tiny.templates)
        return one + many

    with_reuse = run()
    monkeypatch.setattr(hooks, "REUSE_BELOW", False)
    without = run()
    for a, b in zip(with_reuse, without):
        for l in b.deltas:
            assert torch.equal(a.deltas[l], b.deltas[l]), (method, l, _rel(a.deltas[l], b.deltas[l]))
