from __future__ import annotations

import pytest
import torch

from helpers import hooks, models
from conftest import tiny_model


@pytest.fixture(scope="module")
def gpt2():
    m = tiny_model("gpt2", 50).eval()
    return m


def test_read_replace_add_and_removal(gpt2):
    x = torch.randint(0, 50, (2, 6))
    base = gpt2(input_ids=x).logits
    mlp = models.module_name(gpt2, "mlp", 1)
    block = models.module_name(gpt2, "block", 0)
    with hooks.trace(gpt2, [mlp, block], retain_input=True) as tr:
        again = gpt2(input_ids=x).logits
    assert torch.equal(base, again)  # reading changes nothing
    assert tr.outputs[mlp].shape == (2, 6, 32) and tr.inputs[block].shape == (2, 6, 32)

    # Replacing the MLP output with itself is a no-op; adding changes the logits downstream only.
    with hooks.trace(gpt2, mlp, edit=lambda out, _n: out.clone()):
        assert torch.equal(gpt2(input_ids=x).logits, base)
    delta = torch.zeros(2, 32)
    delta[:, 0] = 5.0
    with hooks.trace(gpt2, mlp, edit=hooks.add_at_positions(delta, [3, 3])) as tr2:
        edited = gpt2(input_ids=x).logits
    assert torch.allclose(edited[:, :3], base[:, :3], atol=1e-6)  # causal: earlier positions untouched
    assert not torch.allclose(edited[:, 3], base[:, 3])
    assert torch.allclose(tr2.outputs[mlp][:, 3, 0] - tr.outputs[mlp][:, 3, 0], torch.full((2,), 5.0), atol=1e-5)

    # All hooks are gone afterwards.
    for mod in gpt2.modules():
        assert not mod._forward_hooks


def test_hooks_removed_on_exception(gpt2):
    mlp = models.module_name(gpt2, "mlp", 0)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.trace(gpt2, mlp):
            raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in gpt2.modules())


def test_block_tuple_output_is_repacked(gpt2):
    """Blocks return tuples in some transformers versions, tensors in others; edit sees a tensor either way."""
    block = models.module_name(gpt2, "block", 1)
    seen = []

    def edit(out, name):
        seen.append(type(out))
        return out * 0

    x = torch.randint(0, 50, (1, 4))
    with hooks.trace(gpt2, block, edit=edit) as tr:
        gpt2(input_ids=x)
    assert seen == [torch.Tensor] and torch.count_nonzero(tr.outputs[block]) == 0


def test_stop_forward_ends_early(gpt2):
    calls = []
    last = models.module_name(gpt2, "block", 2)
    gpt2.get_submodule(last).register_forward_hook(lambda *a: calls.append(1))
    try:
        with hooks.trace(gpt2, models.module_name(gpt2, "down_proj", 0), retain_input=True, stop=True) as tr:
            gpt2(input_ids=torch.randint(0, 50, (1, 4)))
        assert calls == [] and tr.inputs
    finally:
        gpt2.get_submodule(last)._forward_hooks.clear()


def test_unknown_module_named(gpt2):
    with pytest.raises(KeyError, match="transformer.h.9.mlp"):
        with hooks.trace(gpt2, "transformer.h.9.mlp"):
            pass


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_resume_at_equals_full_pass_bitwise(arch):
    """Skipping the blocks below l and feeding the recorded stream gives the full pass's logits exactly,
    with padding, and hooks on the kept blocks (looked up by their usual names) still fire."""
    m = tiny_model(arch, 50, n_layer=3).eval()
    x = torch.randint(0, 50, (3, 6))
    att = torch.ones_like(x)
    att[0, :2] = 0  # a left-padded row
    mlp2 = models.module_name(m, "mlp", 2)
    for layer in range(3):
        block = models.module_name(m, "block", layer)
        with hooks.trace(m, block, retain_output=False, retain_input=True) as tr:
            full = m(input_ids=x, attention_mask=att).logits
        with hooks.trace(m, mlp2, edit=lambda o, _: o + 1.0) as t2, hooks.resume_at(m, layer, tr.inputs[block]):
            part = m(input_ids=x, attention_mask=att).logits
        with hooks.trace(m, mlp2, edit=lambda o, _: o + 1.0):
            edited_full = m(input_ids=x, attention_mask=att).logits
        assert torch.equal(part, edited_full), (arch, layer)
        assert not torch.equal(part, full)
        assert mlp2 in t2.outputs
    # the block list is restored, also after an exception inside the block
    n = len(list(m.modules()))
    with pytest.raises(RuntimeError):
        with hooks.resume_at(m, 2, tr.inputs[block]):
            raise RuntimeError("boom")
    assert len(list(m.modules())) == n
    assert torch.equal(m(input_ids=x, attention_mask=att).logits, full)
