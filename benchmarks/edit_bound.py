"""A lower bound on the time of one edit: the matrix products the spec's steps cannot avoid, at this CPU's speed.

For one request, :func:`edit_flops` counts the floating-point operations (2 per multiply-add) of the dense
matrix products that SCIENCE.md §6's steps need when every reuse is taken:

- **ROME** (§6.1): a first pass over the 21 templated prompts (prompt + target[:-1]) and the KL row, through the
  edited layer at every position (the states below the edit that later steps reuse; k̄, the keys at the last
  subject token of each templated prompt, and k*, the bare prompt's, are among them), and above it at the
  positions before each row's last subject token (their keys/values, which every step attends to, computed
  once; the last block's are left out); v* needs, in each of its ``v_num_grad_steps`` forward passes, layers
  ℓ+1..L-1 at the positions from the last subject token on (earlier positions do not see δ), over the 21
  rewriting rows and, of the KL row, its last subject token (the one position the KL reads; from the subject's
  first token under noise); the unembedding only at the target positions and at the KL position; ``updates``
  backward passes of the same products (activation gradients only: no weight is trained, so a backward pass
  costs one product per forward product). Under noise the keys need passes of their own (layers 0..ℓ-1).
- **MEMIT** (§6.2): the same for z at the block output of the window's top layer (6 rows + KL), then per
  window layer i the keys over the 6 templates (layers win[0]..i-1 up to the last subject token, on the stream
  entering the window, which does not change; from layer 0 under noise), the bare prompt's block-z output, and
  one solve of (λC + kkᵀ)⁻¹k from a factorisation of λC made once per layer (its (2/3) d_ff³ amortised over
  ``facts_per_layer`` edits).
- Without ``context`` (the template strings), every row is taken as the bare prompt: fewer positions before
  the subject, a looser bound.
- **FT-w** (§6.3): per step taken (``updates``; the forward passes of skipped steps are not counted), layers from the window's first
  down-projection to the top at every position of the row(s) (the trained weight changes every position),
  the unembedding at the target positions; backward: activation gradients through the same layers plus
  the weight gradient of each trained down-projection (d_model x d_ff x positions).
- **Fact Forcing** draws fresh subject noise on every pass, so every step recomputes every layer from the
  first noised position on (nothing below the edit can be reused); FT uses ``noise.n_samples`` rows.

The unembedding (d_model x vocabulary) is timed at its own rows (the positions whose logits are read, per chunk):
with a few dozen rows it streams its weight (113 MB for SmolLM2) from memory and runs far below the rate of
the block's products at a pass's few hundred rows; at a given chunk size no step of the spec gives it more.

Left out (so the bound stays a bound): attention's score products (T x T per head; ≤ 2% here), norms,
activations, softmax, Adam, and the evaluation after the edit. :func:`matmul_rate` measures this machine's
float32 GEMM throughput on products of the same shapes (rows = the positions of one step), in the same run, two
ways: one product repeated (its weight stays in cache: the fastest rate, the looser bound) and products cycling
through as many weights of the shape as the model has layers (each weight read as a pass meets it: a step runs
every layer once, and a layer's weights no longer sit in cache when the next step reaches it). Both bounds are
printed; see docs/measurements.md for which is which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from helpers import models, scoring
from helpers.editing import edit_layers
from helpers.editing.base import EditRequest, fill, subject_ranges
from helpers.editing.rome import KL_TEMPLATE


def linear_shapes(block: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every dense product in a decoder block (nn.Linear, or GPT-2's Conv1D (in, out) weight)."""
    shapes = []
    for m in block.modules():
        if isinstance(m, nn.Linear):
            shapes.append((m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D":
            shapes.append(tuple(m.weight.shape))
    return shapes


@dataclass
class Work:
    """Multiply-adds of one edit, split by product shape: {(in, out): rows} (flops = 2 * rows * in * out)."""

    rows: dict[tuple[int, int], float]
    extra_flops: float = 0.0  # solves and factorisations (not GEMMs of the block's shapes)
    pass_rows: int = 0  # rows of one optimisation pass's products for this edit (the GEMM shapes to time)
    unembed_rows: int = 0  # rows of one pass's unembedding for this edit (the positions whose logits are read)

    def add(self, shapes: list[tuple[int, int]], n_rows: float, times: float = 1.0) -> None:
        for s in shapes:
            self.rows[s] = self.rows.get(s, 0.0) + n_rows * times

    @property
    def flops(self) -> float:
        return sum(2.0 * r * i * o for (i, o), r in self.rows.items()) + self.extra_flops


def _lengths(tok, texts: list[str]) -> list[int]:
    return [len(scoring.encode(tok, t)) for t in texts]


def unembed_shape(model: nn.Module) -> tuple[int, int]:
    """(in, out) of the unembedding product: (d_model, vocabulary size)."""
    return models.dims(model)[0], int(model.get_output_embeddings().weight.shape[0])


def edit_flops(model: nn.Module, tok, request: EditRequest, method: str, layer: int, hp: dict,
               n_templates: int, updates: int, noised: bool, facts_per_layer: int = 1,
               context: Sequence[str] | None = None) -> Work:
    """The products one edit needs (see the module docstring). ``n_templates``: rewriting rows (ROME 21,
    MEMIT 6); ``updates``: backward passes (optimiser steps) the edit took; ``noised``: Fact Forcing.
    ``context``: ROME's (MEMIT's, flattened) context templates, "{}" first: the rows are then the templated
    prompts themselves (their prefixes' keys and values counted once), else every row is taken as the bare
    prompt (fewer positions: a looser bound)."""
    L = models.n_layers(model)
    d_model, d_ff = models.dims(model)
    blocks = [linear_shapes(b) for b in _blocks(model)]
    unemb = [unembed_shape(model)]
    n_target = len(scoring.encode(tok, scoring.with_space(request.target), bos_token=False))
    w = Work({})
    win = edit_layers(model, method, layer, hp)  # ROME/FT-1 [layer]; MEMIT/FT-5 W(layer, 5)
    if method in ("rome", "memit"):
        top = win[-1]  # where δ is added: ROME's MLP output, MEMIT's last window block
        # the templated prompts, or every row as the bare prompt: the same positions from the subject on as a
        # templated row (the steps' work is the same), fewer before it
        templates = ([fill(c, request.template) for c in context] if context is not None
                     else [request.template] * n_templates)
        n_templates = len(templates)
        full = templates + [KL_TEMPLATE]
        ranges = subject_ranges(tok, full, request.subject)
        lens = _lengths(tok, [fill(t, request.subject) for t in full])
        lens = [n + (n_target - 1 if i < n_templates else 0) for i, n in enumerate(lens)]
        lens[-1] = ranges[-1][1]  # the KL row: only its last subject token's logits are read
        first = [b if noised else e - 1 for b, e in ranges]  # first position a step must recompute
        suffix = sum(n - f for n, f in zip(lens, first))
        w.pass_rows = suffix
        prefix_keys = sum(e for _, e in ranges[:n_templates])
        steps = int(hp["v_num_grad_steps"])
        lo = 0 if noised else top + 1
        for j in range(lo, L):
            w.add(blocks[j], suffix, steps + updates)
        w.unembed_rows = n_templates * n_target + 1
        w.add(unemb, w.unembed_rows, steps + updates)
        for j in range(0, top + 1 if not noised else 0):
            w.add(blocks[j], sum(lens), 1)  # the first pass, whose states below the edit later steps reuse
        # the positions before each row's cut, whose keys and values every step attends to: once, in the blocks
        # the first pass leaves (all of them under noise, which spares those positions); the last block's keys
        # and values need only its attention's input projections (left out)
        for j in range(top + 1 if not noised else 0, L - 1):
            w.add(blocks[j], sum(first), 1)
        # The keys: clean rows reach the edited layer in the first pass, at every position through the subject
        # (ROME: nothing more; MEMIT: the stream entering the window is reused, so the keys of window layer i need
        # blocks win[0]..i-1 with the lower layers' updates); under noise, passes of their own from the embeddings.
        if method == "rome":
            for j in range(layer if noised else 0):
                w.add(blocks[j], prefix_keys, 1)  # under noise: k̄ over the templates (k* included: the bare row)
        else:
            for i in win:
                for j in range(0 if noised else win[0], i):
                    w.add(blocks[j], prefix_keys, 1)  # keys at layer i
                for j in range(win[0], top + 1):
                    w.add(blocks[j], ranges[0][1], 1)  # h_cur of the bare prompt
                w.extra_flops += 2.0 * d_ff * d_ff + (2.0 / 3.0) * d_ff ** 3 / max(facts_per_layer, 1)
    else:
        n_rows = int(request.noise.n_samples) if noised and request.noise is not None else 1
        (b, e), = subject_ranges(tok, [request.template], request.subject)
        n = _lengths(tok, [request.text])[0] + n_target - 1
        lo = 0 if noised else win[0]
        first = b if noised else 0
        tokens = n_rows * (n - first)
        w.pass_rows = tokens
        for j in range(lo, L):
            w.add(blocks[j], tokens, 2 * updates)  # forward passes >= updates (a skipped step still runs one)
        w.unembed_rows = n_rows * n_target
        w.add(unemb, w.unembed_rows, 2 * updates)
        w.add([(d_ff, d_model)], tokens, updates * len(win))  # weight gradient of each trained down-projection
        for j in range(0, win[0] if not noised else 0):
            w.add(blocks[j], n_rows * n, 1)
    return w


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [models.module(model, "block", j) for j in range(models.n_layers(model))]


def matmul_rate(shapes: list[tuple[int, int]], rows: int, repeats: int = 20,
                device: torch.device | str = "cpu", distinct: int = 1) -> dict[tuple[int, int], float]:
    """This machine's float32 GEMM speed (flop/s) for (rows x in) @ (in x out), per shape, best of ``repeats``,
    on ``device`` (a GPU's products are timed to their end: the device is synchronised around each).

    ``distinct`` = 1 times one product again and again: its weight stays in cache (the fastest case). ``distinct``
    = n > 1 times n products with n different weights of the shape in turn, as a pass through n layers meets
    them: each reads a weight that the other n - 1 have pushed out of cache (a step of an optimisation runs
    every layer once, so no product of it can find its weight in cache from the step before)."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = {}
    for i, o in sorted(set(shapes)):
        a = torch.randn(rows, i, device=device)
        bs = [torch.randn(i, o, device=device) for _ in range(max(distinct, 1))]
        for b in bs:
            a @ b
        best = float("inf")
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            for b in bs:
                a @ b
            sync()
            best = min(best, time.perf_counter() - t)
        out[(i, o)] = 2.0 * rows * i * o * len(bs) / best
    return out


def bound_seconds(work: Work, rates: dict[tuple[int, int], float]) -> float:
    """Seconds the products of ``work`` take at ``rates`` (extra flops at the fastest measured rate)."""
    t = sum(2.0 * r * i * o / rates[(i, o)] for (i, o), r in work.rows.items())
    return t + work.extra_flops / max(rates.values())
