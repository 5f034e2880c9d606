"""The editing benchmark's lower bound (benchmarks/edit_bound.py): known-answer counts of the products an edit
needs, so that the ratio `make bench` prints is measured against the work the spec's steps cannot skip."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_model

from helpers import models, scoring
from helpers.editing import edit_layers
from helpers.editing.base import EditRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import edit_bound  # noqa: E402


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_model("llama", len(tokenizer), n_layer=4).eval()


def _request() -> EditRequest:
    return EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target="English French")


def _n_target(tokenizer, req: EditRequest) -> int:
    """Target tokens of the request (the positions whose logits a rewriting row reads)."""
    return len(scoring.encode(tokenizer, scoring.with_space(req.target), bos_token=False))


def _unemb(model, tokenizer) -> tuple[int, int]:
    """The unembedding's (in, out), written out: d_model x the tokenizer's vocabulary."""
    return models.dims(model)[0], len(tokenizer)


def test_flops_count_two_per_multiply_add():
    w = edit_bound.Work({(2, 3): 5.0}, extra_flops=7.0)
    w.add([(2, 3), (4, 1)], 2.0, times=3.0)
    assert w.rows == {(2, 3): 11.0, (4, 1): 6.0}
    assert w.flops == 2 * 11 * 2 * 3 + 2 * 6 * 4 * 1 + 7


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_rome_memit_unembed_only_the_read_positions(llama, tokenizer, method):
    """Per optimisation pass the unembedding sees each rewriting row's target positions and the KL row's one
    position; it runs in every step's forward pass and, for the steps that update, in its backward pass."""
    req = _request()
    n_target = _n_target(tokenizer, req)
    assert n_target >= 2  # the count below would not tell target positions from rows otherwise
    hp = {"v_num_grad_steps": 5, "layers": [1, 2], "window": 2}
    w = edit_bound.edit_flops(llama, tokenizer, req, method, 2, hp, n_templates=6, updates=4, noised=False)
    unemb = _unemb(llama, tokenizer)
    assert w.unembed_rows == 6 * n_target + 1
    assert w.rows[unemb] == w.unembed_rows * (5 + 4)


def test_each_update_costs_one_backward_over_the_blocks_above_the_edit(llama, tokenizer):
    """ROME at layer 1 of 4: one more update adds, for every product of blocks 2 and 3, the suffix rows of one
    pass (activation gradients only), and one more pass of the unembedding; nothing below the edit."""
    req = _request()
    hp = {"v_num_grad_steps": 5}
    assert edit_layers(llama, "rome", 1, hp) == [1]
    w3 = edit_bound.edit_flops(llama, tokenizer, req, "rome", 1, hp, n_templates=3, updates=3, noised=False)
    w4 = edit_bound.edit_flops(llama, tokenizer, req, "rome", 1, hp, n_templates=3, updates=4, noised=False)
    unemb = _unemb(llama, tokenizer)
    per_block = Counter(edit_bound.linear_shapes(models.module(llama, "block", 0)))  # gate and up: one shape, 2
    assert w3.pass_rows > 0 and w3.pass_rows == w4.pass_rows
    for s, n in per_block.items():
        assert w4.rows[s] - w3.rows[s] == 2 * n * w3.pass_rows  # blocks 2 and 3
    assert w4.rows[unemb] - w3.rows[unemb] == w3.unembed_rows
    assert w4.flops > w3.flops


def test_fine_tuning_unembeds_only_its_target_positions(llama, tokenizer):
    req = _request()
    n_target = _n_target(tokenizer, req)
    hp = {"layers": [2], "window": 1}
    w = edit_bound.edit_flops(llama, tokenizer, req, "ft1", 2, hp, n_templates=1, updates=3, noised=False)
    assert w.unembed_rows == n_target
    assert w.rows[_unemb(llama, tokenizer)] == n_target * 2 * 3  # forward and backward of each of 3 updates


def test_rome_counts_each_template_prefix_once_through_every_block_but_the_last(llama, tokenizer):
    """Clean ROME with its context templates given: a template whose prefix adds p tokens to its row adds p
    positions to the first pass (blocks 0..ℓ) and to the keys and values above it (blocks ℓ+1..L-2), once each,
    and nothing to the steps, which start at the last subject token. The keys are the first pass's: no pass of
    their own."""
    req = _request()
    hp = {"v_num_grad_steps": 5}
    L = models.n_layers(llama)
    bare = ["{}", "{}"]
    ctx = ["{}", "Hello there. {}"]
    p = (len(scoring.encode(tokenizer, "Hello there. " + req.text))
         - len(scoring.encode(tokenizer, req.text)))
    assert p > 0
    w0 = edit_bound.edit_flops(llama, tokenizer, req, "rome", 1, hp, n_templates=2, updates=4, noised=False,
                               context=bare)
    w1 = edit_bound.edit_flops(llama, tokenizer, req, "rome", 1, hp, n_templates=2, updates=4, noised=False,
                               context=ctx)
    assert w1.pass_rows == w0.pass_rows
    for s, n in Counter(edit_bound.linear_shapes(models.module(llama, "block", 0))).items():
        assert w1.rows[s] - w0.rows[s] == n * p * (L - 1)
    # the bare-prompt approximation (no context) is the same count as all-bare templates
    w_none = edit_bound.edit_flops(llama, tokenizer, req, "rome", 1, hp, n_templates=2, updates=4, noised=False)
    assert w_none.rows == w0.rows
