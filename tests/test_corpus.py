"""helpers.corpus: WikiText-2 de-tokenizing, the <unk> rule, the vendored slice, corpus names, unrelated
sentences and the second-moment stability check."""

from __future__ import annotations

import gzip
import logging

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from helpers import corpus as C

needs_shared = pytest.mark.skipif(not C.shared_available(), reason="shared WikiText-2 folder not present")


# ----------------------------------------------------------------------------------------- detokenize
@pytest.mark.parametrize(
    "line, expected",
    [
        ("the 2011 @-@ 12 season , 1 @,@ 000 people", "the 2011-12 season, 1,000 people"),
        (" It grew 4 @.@ 5 % ; then : it fell ! Why ? ", "It grew 4.5%; then: it fell! Why?"),
        ("The game 's theme ( the first ) was sung .", "The game's theme (the first) was sung."),
        ("it wasn 't until 1985 , and they didn 't", "it wasn't until 1985, and they didn't"),
        ('He called it " the best " , then " a flop . "', 'He called it "the best", then "a flop."'),
        ('" Nameless " units', '"Nameless" units'),
        ("the two nations ' cease @-@ fire", "the two nations' cease-fire"),
        ("O 'Brien paid $ 14 @,@ 000 [ note 1 ]", "O'Brien paid $14,000 [note 1]"),
        ("Her father ’ s death", "Her father’s death"),
        ("a  <unk>   word", "a <unk> word"),
    ],
)
def test_detokenize_known_answers(line, expected):
    assert C.detokenize(line) == expected


def test_headings_detected_and_dropped():
    assert C.is_heading(" = Valkyria Chronicles III = ")
    assert C.is_heading(" = = = Plot = = = ")
    assert not C.is_heading(" The score was 2 = 2 . ")
    assert C.clean_paragraph(" = = Gameplay = = ") is None
    assert C.clean_paragraph(" ") is None


def test_unk_sentences_dropped():
    line = " The first is fine . The <unk> second is not . ( Japanese : <unk> , lit . X ) stays out . The last , too . "
    assert C.clean_paragraph(line) == "The first is fine. The last, too."
    assert C.clean_paragraph(" Only <unk> here . ") is None


def test_tokenized_sentence_split_keeps_closing_quote_and_brackets():
    sents = C.split_tokenized_sentences(' He said " go home . " Then ( c . 1400 , lit . war ) it ended . ')
    assert [" ".join(s) for s in sents] == ['He said " go home . "', "Then ( c . 1400 , lit . war ) it ended ."]


def test_survival_counts():
    s = C.survival([" = T = ", " A b . C <unk> d . ", " <unk> . ", ""])
    assert (s.paragraphs, s.paragraphs_kept, s.sentences, s.sentences_kept) == (2, 1, 3, 1)
    assert (s.words, s.words_kept) == (9, 3)
    assert s.word_fraction == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------- loading
def _mini_split(tmp_path):
    (tmp_path / "train.txt").write_text(
        " \n = Title = \n \n The A @-@ B road , built in 1 @,@ 900 . It <unk> here . \n = = Sub = = \n <unk> . \n"
        " Second paragraph 's end . \n",
        encoding="utf-8",
    )
    return tmp_path


def test_documents_from_explicit_source(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="helpers.corpus"):
        docs = C.wikitext_documents("train", source=_mini_split(tmp_path))
    assert docs == ["The A-B road, built in 1,900.", "Second paragraph's end."]
    assert "sha256" in caplog.text  # a hand-made file is not the official one: warned, still used


def test_shared_sha_mismatch_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "SHARED_DIR", _mini_split(tmp_path))
    with pytest.raises(ValueError, match=str(tmp_path / "train.txt")):
        C.wikitext_documents("train")


def test_fallback_to_slice_without_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "SHARED_DIR", tmp_path / "absent")
    assert C.wikitext_documents("train") == C.read_slice()
    with pytest.raises(FileNotFoundError, match="vendored"):
        C.wikitext_documents("valid")
    with pytest.raises(ValueError, match="split"):
        C.read_split_lines("dev", source=tmp_path)


def test_vendored_slice_form():
    docs = C.read_slice()
    words = sum(len(d.split()) for d in docs)
    assert 150_000 <= words <= 250_000 and words >= C.SLICE_WORDS
    assert C.SLICE_PATH.stat().st_size < 600_000
    text = "\n".join(docs)
    for residue in ("<unk>", "@-@", "@,@", "@.@", " , ", " . ", " 's"):
        assert residue not in text
    assert not any(C.is_heading(d) for d in docs)
    assert docs[0].startswith("The game began development in 2010")
    assert (C.SLICE_PATH.parent / "LICENSE-wikitext.txt").read_text().count("CC BY-SA 3.0") >= 1


@needs_shared
def test_write_slice_is_deterministic_and_matches_vendored(tmp_path):
    words, size = C.write_slice(tmp_path / "slice.txt.gz")
    data = (tmp_path / "slice.txt.gz").read_bytes()
    assert data == C.SLICE_PATH.read_bytes()
    assert size == len(data) and words == sum(len(d.split()) for d in C.read_slice())
    C.write_slice(tmp_path / "again.txt.gz")
    assert (tmp_path / "again.txt.gz").read_bytes() == data
    assert gzip.decompress(data).decode("utf-8").splitlines()[:5] == C.read_slice()[:5]


@needs_shared
def test_full_train_documents_clean():
    docs = C.wikitext_documents("train")
    assert len(docs) == 14_718
    assert docs[: len(C.read_slice())] == C.read_slice()
    assert not any("<unk>" in d or "@-@" in d for d in docs)


# ----------------------------------------------------------------------------------------- corpus_for
def test_corpus_for_names_and_files(tmp_path):
    assert C.corpus_for("wikitext-slice") == C.read_slice()
    assert C.corpus_for({"corpus": "wikitext-slice", "tokens": 1000}) == C.read_slice()
    f = tmp_path / "docs.txt"
    f.write_text("one doc\n\ntwo doc\n", encoding="utf-8")
    assert C.corpus_for(str(f)) == ["one doc", "two doc"]
    assert C.corpus_for({"corpus": f}) == ["one doc", "two doc"]


def test_corpus_for_errors(tmp_path):
    with pytest.raises(ValueError, match="'wikitext'.*'wikitext-slice'"):
        C.corpus_for("wikipedia")
    with pytest.raises(ValueError, match="no such text file"):
        C.corpus_for(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="no 'corpus'"):
        C.corpus_for({"tokens": 5})


# ----------------------------------------------------------------------------------------- sentences
def test_split_sentences_respects_abbreviations():
    text = 'Dr. Smith moved to the U.S. Army in 1950. He left. "Yes," said J. Doe. Done!'
    assert C.split_sentences(text) == ["Dr. Smith moved to the U.S. Army in 1950.", "He left.",
                                       '"Yes," said J. Doe.', "Done!"]


def test_unrelated_sentences_deterministic_and_well_formed():
    docs = C.read_slice()
    a = C.unrelated_sentences(docs, 50, seed=3)
    assert a == C.unrelated_sentences(docs, 50, seed=3)
    assert a != C.unrelated_sentences(docs, 50, seed=4)
    assert len(set(a)) == 50
    for s in a:
        assert 6 <= len(s.split()) <= 25 and s.endswith(".") and s[0].isupper()
        assert "<unk>" not in s and "@" not in s
        assert any(s in d for d in docs)  # whole sentences of the corpus
    with pytest.raises(ValueError, match="suitable sentences"):
        C.unrelated_sentences(["Too short."], 1, seed=0)


# ----------------------------------------------------------------------------------------- stability
@pytest.fixture(scope="module")
def gpt2_tiny():
    tok = tiny_tokenizer()
    return tiny_model("gpt2", len(tok), n_layer=2).eval(), tok


def test_stability_large_n_is_stable(gpt2_tiny):
    model, tok = gpt2_tiny
    r = C.stability(model, tok, C.read_slice(), layer=1, n_tokens=20_000, n_probe=6, seed=0)
    assert (r.n_tokens, r.n_half, r.d_ff) == (20_000, 10_000, 128)
    assert r.tokens_per_dim == pytest.approx(20_000 / 128)
    assert len(r.cosines) == 6 and r.probe == "random" and not r.ridge
    assert 0 < r.rel_frobenius < 0.1
    assert r.min_cosine > 0.98 and all(c <= 1 + 1e-9 for c in r.cosines)
    p = C.stability(model, tok, C.read_slice(), layer=1, n_tokens=20_000,
                    prompts=["The Eiffel Tower is in", "The mother tongue of Danielle Darrieux is"])
    assert p.probe == "prompts" and len(p.cosines) == 2 and p.min_cosine > 0.98


def test_stability_small_n_differs_and_ridges(gpt2_tiny):
    model, tok = gpt2_tiny
    r = C.stability(model, tok, C.read_slice(), layer=0, n_tokens=100, n_probe=4, seed=1)
    assert r.n_half == 50 and r.n_tokens == 100
    assert r.ridge  # 50 keys < d_ff = 128: C_half is singular
    assert r.rel_frobenius > 0.05  # would be 0 if the half estimate were the full one
    assert r.min_cosine < 0.99
    assert all(torch.isfinite(torch.tensor(r.cosines)))
