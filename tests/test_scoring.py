from __future__ import annotations

import pytest
import torch

from helpers import generation, scoring
from conftest import tiny_model


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_model("gpt2", len(tokenizer), seed=1).eval(), tokenizer


def _manual_logprob(model, tok, prompt, target):
    x = scoring.encode(tok, prompt)
    y = scoring.encode(tok, " " + target)
    ids = torch.tensor([x + y])
    logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    return sum(logp[len(x) - 1 + j, y[j]].item() for j in range(len(y)))


def test_multi_token_product_with_leading_space(lm):
    model, tok = lm
    prompt, target = "The mother tongue of Danielle Darrieux is", "Christianity Islam"
    assert len(scoring.encode(tok, " " + target)) > 1
    got = scoring.target_logprobs(model, tok, [prompt], [target])[0].item()
    assert got == pytest.approx(_manual_logprob(model, tok, prompt, target), abs=1e-5)
    # A target given with its space already is not spaced twice.
    assert scoring.target_logprobs(model, tok, [prompt], [" " + target])[0].item() == pytest.approx(got, abs=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_rows_alone(lm, side):
    model, tok = lm
    prompts = ["The mother tongue of Danielle Darrieux is", "Toko Yasuda, the", "The official religion of Edwin of Northumbria is"]
    targets = ["French", "guitar piano", "Christianity"]
    batched = scoring.target_logprobs(model, tok, prompts, targets, padding_side=side)
    alone = torch.stack([scoring.target_logprobs(model, tok, [p], [t])[0] for p, t in zip(prompts, targets)])
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(scoring.target_probs(model, tok, prompts, targets), alone.exp(), atol=1e-6)


def test_greedy_generation_matches_stepwise_argmax_and_batches(lm):
    model, tok = lm
    prompts = ["The mother tongue of", "Toko Yasuda, the"]
    batched = generation.generate(model, tok, prompts, max_new_tokens=5)
    for p, g in zip(prompts, batched):
        ids = scoring.encode(tok, p)
        new = []
        for _ in range(5):
            nxt = model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
            new.append(nxt)
        assert g == tok.decode([i for i in new if i != tok.eos_token_id]).strip()


def test_generation_unembeds_only_the_newest_position(lm):
    """The unembedding sees one position per row on every step, the prompt's pass included (logits_to_keep)."""
    model, tok = lm
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:2])))
    try:
        generation.generate(model, tok, ["The mother tongue of", "Toko Yasuda, the"], max_new_tokens=3)
    finally:
        handle.remove()
    assert seen == [(2, 1)] * 3


def test_topk_sampling_is_seeded_and_respects_total_length(lm):
    model, tok = lm
    a = generation.generate(model, tok, ["Toko Yasuda, the"], max_out_len=12, top_k=5, seed=3)
    b = generation.generate(model, tok, ["Toko Yasuda, the"], max_out_len=12, top_k=5, seed=3)
    assert a == b
    n_prompt = len(scoring.encode(tok, "Toko Yasuda, the"))
    assert len(scoring.encode(tok, a[0])) <= 12 - n_prompt + 1
    # top-k = 1 is greedy decoding, whatever the seed
    greedy = generation.generate(model, tok, ["Toko Yasuda, the"], max_new_tokens=6)
    assert generation.generate(model, tok, ["Toko Yasuda, the"], max_new_tokens=6, top_k=1, seed=11) == greedy
    seen = {generation.generate(model, tok, ["Toko Yasuda, the"], max_new_tokens=3, top_k=5, seed=k)[0] for k in range(6)}
    assert len(seen) > 1  # different seeds sample different continuations
    # A prompt already at max_out_len tokens gets no continuation (the published sampler's behaviour).
    assert generation.generate(model, tok, ["Toko Yasuda, the"], max_out_len=n_prompt, top_k=5) == [""]


def test_errors():
    with pytest.raises(ValueError):
        scoring.make_batch(type("T", (), {"__call__": lambda *a, **k: {"input_ids": []}, "pad_token_id": 0})(), ["x"], None)


def test_pad_right_known_answer():
    class Tok:
        pad_token_id = None
        eos_token_id = 9

    x, mask = scoring.pad_right(Tok(), [[1, 2, 3], [4], []])
    assert x.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    Tok.pad_token_id = 0
    x, mask = scoring.pad_right(Tok(), [[], []])  # all empty: one padded column
    assert x.tolist() == [[0], [0]] and mask.tolist() == [[0], [0]]


def test_logits_only_at_target_positions_change_nothing(lm):
    """scoring.target_logprobs runs the unembedding only where targets are scored; the numbers equal the
    full-logits computation (mutation check: a wrong column gives other numbers)."""
    model, tok = lm
    prompts = ["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays", "Apple A5 was made by"]
    targets = ["French", "the piano and the guitar", "Apple"]
    scoring.SELECT_LOGITS = False
    try:
        full = scoring.target_logprobs(model, tok, prompts, targets)
    finally:
        scoring.SELECT_LOGITS = True
    sel = scoring.target_logprobs(model, tok, prompts, targets)
    torch.testing.assert_close(sel, full, rtol=1e-6, atol=1e-6)
    b = scoring.make_batch(tok, prompts, targets)
    rows, cols, counts = scoring.target_pairs(b)
    assert counts == b.target_len and len(rows) == sum(counts)
    with scoring.unembed_at(model, rows, cols - 1):  # one column early: not the same numbers
        wrong = model(**b.model_inputs()).logits[0]
    with scoring.unembed_at(model, rows, cols):
        right = model(**b.model_inputs()).logits[0]
    assert right.shape == (sum(counts), len(tok)) and not torch.allclose(wrong, right)


def test_set_bos_puts_the_token_first_in_every_path(lm):
    """A prepended first token (SmolLM2's <|endoftext|>): encoding, scoring (padded either side) and generation
    all see it; the manual product below is computed from raw ids, not through encode."""
    from conftest import tiny_tokenizer

    model, _ = lm
    tok = tiny_tokenizer()  # its own copy: the session fixture stays without a BOS
    plain = list(tok("The mother tongue of", add_special_tokens=False)["input_ids"])
    y = list(tok(" French", add_special_tokens=False)["input_ids"])
    scoring.set_bos(tok, "<|endoftext|>")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert scoring.encode(tok, "The mother tongue of") == [eot] + plain
    assert scoring.encode(tok, " French", bos_token=False) == y
    logp = torch.log_softmax(model(input_ids=torch.tensor([[eot] + plain + y])).logits[0], -1)
    want = sum(logp[len(plain) + j, y[j]].item() for j in range(len(y)))
    prompts = ["The mother tongue of", "Danielle Darrieux is a native speaker of"]
    for side in ("right", "left"):
        got = scoring.target_logprobs(model, tok, prompts, ["French", "French"], padding_side=side)
        assert got[0].item() == pytest.approx(want, abs=1e-5)
    cont = generation.generate(model, tok, ["The mother tongue of"], max_new_tokens=3)[0]
    ids = torch.tensor([[eot] + plain])
    for _ in range(3):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert cont == tok.decode([i for i in ids[0, 1 + len(plain):].tolist() if i != eot]).strip()
    scoring.set_bos(tok, None)
    assert scoring.encode(tok, "The mother tongue of") == plain


def test_set_bos_errors(bos_tokenizer):
    from conftest import tiny_tokenizer

    with pytest.raises(ValueError, match="already prepends"):
        scoring.set_bos(bos_tokenizer, "<|endoftext|>")
    assert scoring.bos(bos_tokenizer) == [bos_tokenizer.convert_tokens_to_ids("<bos>")]  # left as it was
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="no token"):
        scoring.set_bos(tok, "<|no such token|>")
    assert scoring.bos(tok) == []
