"""helpers.suffix: a pass over positions >= cut[i] with the prefix's cached keys/values equals the full pass
(edited at cut[i]) at those positions, for every architecture, under right and left padding, with the stream
below the edited layer replayed (hooks.resume_at); and ROME/MEMIT's fast mode, which uses it, stays within
float tolerance of the one-fact path."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from helpers import hooks, models, scoring
from helpers.scoring import cache_of
from helpers.suffix import SuffixPass

torch.set_num_threads(1)


def _batch(padding: str) -> scoring.Batch:
    """Three prompt‖target rows of lengths 9, 6 and 4 (targets of 2, 1 and 2 tokens), padded to 9."""
    g = torch.Generator().manual_seed(0)
    lens, plen, tlen = [9, 6, 4], [7, 5, 2], [2, 1, 2]
    T = max(lens)
    ids, mask, starts = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long), []
    for i, n in enumerate(lens):
        s = 0 if padding == "right" else T - n
        ids[i, s : s + n] = torch.randint(1, 50, (n,), generator=g)
        mask[i, s : s + n] = 1
        starts.append(s)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return scoring.Batch(ids, mask, pos, plen, tlen, starts)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gpt_neox", "llama"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", ["mlp", "block"])  # ROME's δ on the MLP output, MEMIT's on the block output
def test_suffix_pass_equals_full_pass_edited_at_the_cut(arch, padding, kind):
    m = tiny_model(arch, 50, n_layer=3).eval()
    b = _batch(padding)
    # row 0 mid-prompt, row 1 at its last prompt token (its first target token is scored from suffix column 0),
    # row 2 at its first token (no prefix at all)
    cut = torch.tensor([b.start[0] + 4, b.start[1] + 4, b.start[2] + 0])
    layer = 1
    mlp, block = models.module_name(m, kind, layer), models.module_name(m, "block", layer)
    delta = torch.randn(3, models.dims(m)[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with hooks.trace(m, block, retain_output=False, retain_input=True) as tr:
            clean = m(**b.model_inputs(), use_cache=True)
        with hooks.trace(m, mlp, edit=hooks.add_at_positions(delta, cut)):
            edited = m(**b.model_inputs()).logits
        sp = SuffixPass(b, cut, cache_of(clean))
        with hooks.trace(m, mlp, edit=hooks.add_at_positions(delta, torch.zeros(3, dtype=torch.long))), \
                hooks.resume_at(m, layer, sp.gather(tr.inputs[block])):
            part = m(**sp.model_inputs(m)).logits
    # each row runs from its cut to its last target token but one (the logits after the last are never read)
    assert part.shape[1] == int((torch.tensor([s + p + t for s, p, t in zip(b.start, b.prompt_len, b.target_len)])
                                 - cut).max()) - 1
    assert sp.batch.input_ids.shape[1] == part.shape[1] + 1
    ref = sp.gather(edited)
    err = ((part - ref).abs() * sp.valid[..., None]).max()
    assert err < 1e-5, (arch, padding, float(err))
    assert float((ref - sp.gather(clean.logits)).abs().max()) > 1e-3  # the edit matters
    full_lp = scoring.target_token_logprobs(edited, b)
    part_lp = scoring.target_token_logprobs(part, sp.batch)
    for a, c in zip(part_lp, full_lp):
        assert torch.allclose(a, c, atol=1e-5)


def test_cut_outside_the_prompt_is_refused():
    m = tiny_model("gpt2", 50, n_layer=2).eval()
    b = _batch("right")
    with torch.no_grad():
        out = m(**b.model_inputs(), use_cache=True)
    with pytest.raises(ValueError, match="row 1: cut 5"):
        SuffixPass(b, torch.tensor([0, 5, 0]), cache_of(out))  # row 1's last prompt position is 4
