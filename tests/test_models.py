from __future__ import annotations

import pytest
import torch

from helpers import hooks, models

from conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_load_by_path_and_every_table_entry_resolves(model_dirs, arch):
    model, tok = models.load_model(model_dirs[arch])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token_id == tok.eos_token_id
    L = models.n_layers(model)
    assert L == 3
    d_model, d_ff = models.dims(model)
    assert d_model == 32 and d_ff > d_model
    spec = models.arch_of(model)
    # Non-layer modules exist and have the expected shapes.
    assert models.module(model, "embed").weight.shape == (len(tok), d_model)
    assert models.module(model, "unembed").weight.shape == (len(tok), d_model)
    assert models.module(model, "final_norm").weight.shape == (d_model,)
    for layer in range(L):
        for kind in ("block", "mlp", "attn", "down_proj"):
            assert isinstance(models.module(model, kind, layer), torch.nn.Module)
        w = models.down_proj_weight(model, layer)
        assert tuple(w.shape) == ((d_ff, d_model) if spec.down_proj_transposed else (d_model, d_ff))
        assert models.down_proj_out_in(model, layer).shape == (d_model, d_ff)
    # Every hooked module hands out a (batch, seq, d) main tensor; down_proj's input is (batch, seq, d_ff).
    x = torch.randint(1, len(tok), (2, 5))
    names = [models.module_name(model, k, 1) for k in ("block", "mlp", "attn", "down_proj")]
    with hooks.trace(model, names, retain_input=True) as tr:
        model(input_ids=x)
    for n in names:
        assert tr.outputs[n].shape == (2, 5, d_model), n
    assert tr.inputs[models.module_name(model, "down_proj", 1)].shape == (2, 5, d_ff)


def test_gpt2_is_transposed_others_are_linear(model_dirs):
    assert models.ARCHITECTURES["gpt2"].down_proj_transposed
    for k in ("gptj", "gpt_neox", "llama"):
        assert not models.ARCHITECTURES[k].down_proj_transposed


def test_unknown_architecture_error_names_it_and_supported():
    from transformers import BertConfig, BertForMaskedLM

    m = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"'bert'.*gpt2.*gptj.*llama"):
        models.arch_of(m)


def test_layer_out_of_range(model_dirs):
    model, _ = models.load_model(model_dirs["gpt2"])
    with pytest.raises(IndexError):
        models.module_name(model, "mlp", 3)
    with pytest.raises(ValueError):
        models.module_name(model, "mlp")


def test_missing_folder_gives_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="cannot load model"):
        models.load_model(tmp_path / "empty")


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_fused_gelu_replaces_transformers_module_with_the_same_function(model_dirs, arch):
    fused, _ = models.load_model(model_dirs[arch])
    plain, _ = models.load_model(model_dirs[arch], fused_gelu=False)
    acts = lambda m: {type(x).__name__ for x in m.modules()} & {"TanhGELU", "NewGELUActivation"}
    assert acts(fused) == {"TanhGELU"} and acts(plain) == {"NewGELUActivation"}
    torch.manual_seed(0)
    x = torch.randn(10_000) * 4
    new_gelu = next(m for m in plain.modules() if type(m).__name__ == "NewGELUActivation")
    torch.testing.assert_close(models.TanhGELU()(x), new_gelu(x), atol=1e-6, rtol=0)  # the same function
    assert (torch.nn.functional.gelu(x) - new_gelu(x)).abs().max() > 1e-4  # (the erf GELU would fail above)
    ids = torch.randint(1, 100, (2, 7))
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_named_model_conversion_gets_its_first_token(model_dirs, tmp_path):
    """A converted folder whose marker records SmolLM2's GGUF sha256 loads with <|endoftext|> first (the named
    model's prepend_bos), recorded in the config so fingerprint-keyed caches differ; bos_token=None and an
    unmarked folder load without it."""
    import json
    import shutil

    from helpers import scoring
    from helpers.editing.base import model_fingerprint
    from helpers.gguf_convert import MARKER
    from helpers.named_models import NAMED_MODELS, prepend_bos_for

    smol = NAMED_MODELS["smollm2-135m"]
    assert prepend_bos_for(smol.gguf_sha256) == "<|endoftext|>"
    assert prepend_bos_for(NAMED_MODELS["gemma3-270m"].gguf_sha256) is None  # its tokenizer adds <bos> itself
    assert prepend_bos_for("0" * 64) is None and prepend_bos_for(None) is None
    folder = tmp_path / "converted"
    shutil.copytree(model_dirs["llama"], folder)
    (folder / MARKER).write_text(json.dumps({"gguf_sha256": smol.gguf_sha256}))
    model, tok = models.load_model(folder)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert scoring.bos(tok) == [eot] and scoring.encode(tok, "a")[0] == eot
    assert model.config.helpers_prepend_bos == "<|endoftext|>"
    bare, bare_tok = models.load_model(folder, bos_token=None)
    assert scoring.bos(bare_tok) == [] and model_fingerprint(bare) != model_fingerprint(model)
    plain, plain_tok = models.load_model(model_dirs["llama"])  # no marker: nothing prepended
    assert scoring.bos(plain_tok) == [] and not hasattr(plain.config, "helpers_prepend_bos")
