"""Editing and tracing on tiny trained Llama and Gemma 3 models that went through a GGUF file (issue 19).

The models of tests/test_architectures.py (``TinyArch``: trained here on the fact sentences; byte-level BPE
tokenizers, Gemma's prepending <bos>) are written as float32 GGUF files the way llama.cpp writes them
(``gguf_fixtures.write_gguf_from_model``) and loaded back offline with ``helpers.models.load_model(<file>.gguf)``
(converted into a tmp ``HELPERS_CACHE``). The loaded model must compute the trained one's logits and its
tokenizer the same ids; then on the LOADED model: every method raises p(target_new), FT's L-inf clamp holds
and binds, the batched editing path equals the one-fact path, restoring every block output at every position
gives p_clean, and the fast tracing path equals the reference.

What the GGUF route does with these tokenizers (transformers 5):

* transformers' GGUF loader builds the tokenizer from ``tokenizer.ggml.model`` whatever the architecture, so
  ``"gpt2"`` works for gemma3 too, and ``tokenizer.ggml.add_bos_token = True`` makes it prepend <bos>
  (``test_transformers_reads_the_gguf_tokenizer``).
* Gemma 3 from GGUF has no ``query_pre_attn_scalar`` (the loader keeps the default 256; TinyArch uses 12), so
  the writer folds the difference into the stored q-norm weights (see ``write_gguf_from_model``).
* ``helpers.checkpoints.convert_gguf`` saves that tokenizer with ``tokenizer_class: GemmaTokenizer`` (chosen by
  transformers from the model type), and loading the folder rebuilds a sentencepiece pipeline around the
  byte-level vocabulary: other ids (spaces become <unk>). ``test_converted_folder_tokenizer_as_written``
  records this as an expected failure for gemma3; the fixture then loads the folder's own ``tokenizer.json``
  (``tokenizer_class: TokenizersBackend``) -- the tokenizer transformers built from the GGUF file, not the
  original one -- and everything else runs on that.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import write_gguf_from_model  # noqa: E402
from test_architectures import PARITY_REL, REQUESTS, TinyArch, check_raises_p  # noqa: E402
from test_editing import HP  # noqa: E402

from helpers import checkpoints, models, scoring  # noqa: E402
from helpers import editing as E  # noqa: E402
from helpers import tracing as tr  # noqa: E402
from helpers.editing import batched as BT  # noqa: E402

torch.set_num_threads(1)

PROMPTS = ["The mother tongue of Zor Makken is", "Lila Durnov lives in Madrid", "Ottar Venn plays the violin.",
           "Kato Brenn plays the drums. Edda Sorn is"]


def _same_ids(tok_a, tok_b, texts) -> bool:
    return all(scoring.encode(tok_a, t) == scoring.encode(tok_b, t) for t in texts)


class FromGGUF:
    """A TinyArch written to GGUF and loaded back with ``load_model``, with its own statistics and templates."""

    def __init__(self, arch: str, d: Path):
        self.arch = arch
        self.trained = TinyArch(arch, d / "trained")
        self.gguf = write_gguf_from_model(self.trained.model, self.trained.tok, d / f"tiny-{arch}.gguf")
        cache = d / "helpers-cache"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HELPERS_CACHE", str(cache))
            self.model, self.tok = models.load_model(self.gguf)
            self.folder = Path(checkpoints.resolve_model_source(str(self.gguf), cache))  # the cached conversion
            self.tokenizer_class = json.loads((self.folder / "tokenizer_config.json").read_text())["tokenizer_class"]
            self.as_written = _same_ids(self.trained.tok, self.tok, PROMPTS + self.trained.docs[:200])
            if not self.as_written:  # Gemma 3 with a BPE vocabulary: see the module docstring
                cfg_file = self.folder / "tokenizer_config.json"
                cfg = json.loads(cfg_file.read_text())
                cfg["tokenizer_class"] = "TokenizersBackend"
                cfg_file.write_text(json.dumps(cfg, indent=2))
                from helpers import integrity

                integrity.write_manifest(self.folder)  # a deliberate edit: record it, or the load converts again
                self.model, self.tok = models.load_model(self.gguf)  # the same cached folder, read again
        self.stats = E.SecondMoments(self.model, self.tok, self.trained.docs[:400], n_tokens=3000,
                                     cache_dir=d / "loaded", progress=False)
        self.stats.precompute(range(models.n_layers(self.model)))
        self.templates = E.context_templates(self.model, self.tok, cache_dir=d / "loaded")

    def p(self, text: str, target: str) -> float:
        return float(scoring.target_probs(self.model, self.tok, [text], [target])[0])


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def gg(request, tmp_path_factory):
    return FromGGUF(request.param, tmp_path_factory.mktemp(f"gguf-{request.param}"))


def test_transformers_reads_the_gguf_tokenizer(gg):
    """transformers' own GGUF tokenizer (no folder in between): byte-level for both architectures, BOS as written."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gg.gguf.parent), gguf_file=gg.gguf.name, local_files_only=True)
    assert _same_ids(gg.trained.tok, tok, PROMPTS + gg.trained.docs[:200])
    assert scoring.bos(tok) == ([gg.trained.tok.bos_token_id] if gg.arch == "gemma3" else [])


def test_converted_folder_tokenizer_as_written(gg):
    """``load_model(<file>.gguf)`` with the converted folder as ``convert_gguf`` wrote it."""
    if not gg.as_written:
        assert gg.arch == "gemma3"
        pytest.xfail(f"convert_gguf saved the GGUF's byte-level tokenizer as {gg.tokenizer_class}, which reloads "
                     "with a sentencepiece pipeline (different ids); see the module docstring")


def test_loaded_model_is_the_trained_model(gg):
    assert gg.model.config.model_type == gg.trained.model.config.model_type
    assert checkpoints.read_marker(gg.folder)["gguf_tensor_types"] == ["F32"]
    for text in PROMPTS + gg.trained.docs[:3]:
        ids = scoring.encode(gg.tok, text)
        assert ids == scoring.encode(gg.trained.tok, text)
        if gg.arch == "gemma3":
            assert ids[0] == gg.tok.bos_token_id == gg.trained.tok.bos_token_id and ids.count(ids[0]) == 1
        else:
            assert gg.tok.bos_token_id not in ids
        x = torch.tensor([ids])
        a, b = gg.model(input_ids=x).logits, gg.trained.model(input_ids=x).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the model still knows its facts (the edits below start from a trained model)
    p = sum(gg.p("Zor Makken lives in", c) for c in ("Paris", "Berlin", "Madrid", "Rome"))
    assert p > 0.5


@pytest.mark.parametrize("method", E.METHODS)
def test_every_method_raises_p_target_new(gg, method):
    check_raises_p(gg, method)


@pytest.mark.parametrize("method,eps", [("ft1", 2e-3), ("ft5", 5e-4)])
def test_linf_clamp_holds(gg, method, eps):
    e = E.edit(gg.model, gg.tok, REQUESTS[1], method, 1, {"norm_constraint": eps}, stats=gg.stats)
    assert max(e.info["max_abs_delta"]) <= eps * (1 + 1e-6)
    assert max(e.info["max_abs_delta"]) == pytest.approx(eps)  # the constraint binds, so the test can fail


@pytest.mark.parametrize("method", E.METHODS)
def test_batched_equals_one_fact_path(gg, method):
    one = [E.edit(gg.model, gg.tok, r, method, 0, HP[method], stats=gg.stats, templates=gg.templates)
           for r in REQUESTS]
    many = BT.edit_many(gg.model, gg.tok, REQUESTS, method, 0, HP[method], stats=gg.stats, templates=gg.templates,
                        exact=False)
    for r, a, b in zip(REQUESTS, many, one):
        with E.applied(gg.model, a):
            pa = gg.p(r.text, r.target)
        with E.applied(gg.model, b):
            pb = gg.p(r.text, r.target)
        assert abs(pa - pb) <= PARITY_REL * pb, (method, r.case_id, pa, pb)


def _fact(gg, prompt: str, subject: str, target: str) -> tr.Fact:
    f = tr.prepare_fact(gg.tok, prompt, subject, target)
    assert "".join(f.tokens[f.b:f.e]).strip() == subject
    if gg.arch == "gemma3":  # the BOS is position 0 and not part of the subject
        assert f.ids[0] == gg.tok.bos_token_id and f.b >= 1
    return f


def test_restoring_every_site_gives_p_clean(gg):
    model = copy.deepcopy(gg.model).double()
    f = _fact(gg, "{} lives in", "Lila Durnov", "Madrid")
    noise = tr._noise_tensor(model, f, tr.noise_sigma(gg.model, gg.tok, ["Lila Durnov", "Zor Makken"]), 10, 1)
    p_clean, p_corrupt = tr.reference_run(model, f, noise)
    assert abs(p_clean - p_corrupt) > 1e-3 * p_clean  # the corruption does something
    L = models.n_layers(model)
    everything = {models.module_name(model, "block", j): range(f.prompt_len + f.target_len) for j in range(L)}
    p0, p_all = tr.reference_run(model, f, noise, everything)
    assert p0 == pytest.approx(p_clean, rel=1e-12) and p_all == pytest.approx(p_clean, rel=1e-12)


def test_fast_trace_equals_reference(gg):
    assert tr.fast_path_supported(gg.model)
    f = _fact(gg, "The mother tongue of {} is", "Zor Makken", "French")
    noise = tr._noise_tensor(gg.model, f, tr.noise_sigma(gg.model, gg.tok, ["Lila Durnov", "Zor Makken"]), 10, 1)
    fast = tr.fast_trace(gg.model, f, "mlp", [1, 3], noise)
    ref = tr.reference_trace(gg.model, f, "mlp", [1, 3], noise)
    assert fast.p_clean == pytest.approx(ref.p_clean, rel=1e-5)
    assert fast.p_corrupt == pytest.approx(ref.p_corrupt, rel=1e-5)
    worst = max(float((np.abs(fast.p_restored[w] - ref.p_restored[w]) / ref.p_restored[w]).max()) for w in (1, 3))
    effect = max(float(np.abs(ref.p_restored[w] - ref.p_corrupt).max() / ref.p_corrupt) for w in (1, 3))
    assert effect > 1e-2, "restorations must move p for the parity to mean anything"
    assert worst < 1e-5, (gg.arch, worst)
