from __future__ import annotations

import pytest
import torch

from helpers import hooks, models, scoring

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


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_adds_to_stream_matches_the_block(model_dirs, arch):
    """The table's ``mlp_adds_to_stream`` is what the block does: a vector added to the MLP module's output at
    one position moves the block's output there by exactly that vector (float rounding) where it says True, and
    by something else where it says False (Gemma 3 norms the MLP's output before the residual add)."""
    model, tok = models.load_model(model_dirs[arch])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, len(tok), (2, 5), generator=g)
    v = torch.randn(models.dims(model)[0], generator=g) * 3
    block = models.module_name(model, "block", 1)

    def block_out(edit):
        with hooks.trace(model, [block, models.module_name(model, "mlp", 1)], edit=edit) as tr, torch.no_grad():
            model(input_ids=x)
        return tr.outputs[block]

    def add(out, name):
        if name.endswith("mlp"):
            out = out.clone()
            out[1, 3] += v
        return out

    clean, moved = block_out(None), block_out(add)
    expect = clean.clone()
    expect[1, 3] += v
    adds = torch.allclose(moved, expect, atol=1e-5, rtol=1e-5)
    assert adds == models.arch_of(model).mlp_adds_to_stream, arch
    assert torch.equal(moved[0], clean[0]) and torch.equal(moved[1, :3], clean[1, :3])  # nothing else moved


@pytest.mark.parametrize("arch", ["gemma3", "llama-gqa"])
def test_grouped_sdpa_matches_the_repeated_heads(model_dirs, tokenizer, arch, monkeypatch):
    """A grouped-query model on a CPU hands its key/value heads to torch's SDPA as they are
    (models.use_grouped_sdpa): over a padded batch (a mask) with a key/value cache, as the suffix passes run,
    the logits equal bitwise those of transformers' default (heads repeated), with 1 and with 2 threads, and so
    does the gradient reaching the input embeddings up to the order of one sum: the repeated heads' backward adds
    each key/value head's gradients over its group after the kernel, the grouped kernel inside it. Bitwise on the
    Intel Xeon and at SmolLM2's head size on an AMD EPYC; 4e-8 to 8e-8 relative on that EPYC at this model's head
    size of 8. The grouped path is thread-count invariant bitwise."""
    monkeypatch.delenv(models.SDPA_GQA_ENV, raising=False)
    if arch == "gemma3":
        model, tok = models.load_model(model_dirs[arch])
    else:  # 4 query heads share 2 key/value heads
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=len(tokenizer)))
        model.eval().requires_grad_(False)
        tok = tokenizer
    assert models.use_grouped_sdpa(model)  # the loader (or this call) switched it on
    x = torch.randint(2, len(tok), (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    mask[2, 3:] = 0

    def run(env: str, threads: int):
        monkeypatch.setenv(models.SDPA_GQA_ENV, env)
        torch.set_num_threads(threads)
        emb = models.module(model, "embed")(x).detach().requires_grad_()
        with torch.no_grad():
            past = scoring.cache_of(model(inputs_embeds=emb[:, :5], attention_mask=mask[:, :5], use_cache=True))
        out = model(inputs_embeds=emb[:, 5:], attention_mask=mask, position_ids=torch.arange(5, 9)[None].expand(3, -1),
                    **{scoring.cache_kwarg(model): past}).logits
        out.pow(2).sum().backward()
        return out.detach(), emb.grad

    grouped_calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        grouped_calls.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    run("1", 1)
    assert grouped_calls and all(grouped_calls)  # the switch reaches torch's kernel
    try:
        for threads in (1, 2):
            (out_g, grad_g), (out_r, grad_r) = run("1", threads), run("0", threads)
            assert torch.equal(out_g, out_r), threads
            assert float((grad_g - grad_r).abs().max()) <= 1e-6 * float(grad_r.abs().max()), threads
        assert all(torch.equal(a, b) for a, b in zip(run("1", 1), run("1", 2)))
    finally:
        torch.set_num_threads(1)
