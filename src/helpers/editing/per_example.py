"""Per-example edits (:mod:`.batched`): forward hooks on the down-projections that add edit k's deltas to the
rows of edit k only, so that K edited models run in one forward pass."""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .. import hooks, models
from .base import Edit
from .batched_rows import Segments, _row_index, segments_from


class _PerExample:
    """Forward hooks on down-projections adding per-row deltas: rows of segment (k, s, e) get
    ``x @ W_k^T + b_k`` (dense) or ``(x . a_k) r_k`` (rank one, ``factors``)."""

    def __init__(self, model: nn.Module, dense: Mapping[int, torch.Tensor] | None = None,
                 bias: Mapping[int, torch.Tensor] | None = None,
                 factors: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.dense = dict(dense or {})  # layer -> (K, d_model, d_ff)
        self.bias = dict(bias or {})  # layer -> (K, d_model)
        self.factors = dict(factors or {})  # layer -> (R (K, d_model), A (K, d_ff))
        self.layers = sorted(set(self.dense) | set(self.bias) | set(self.factors))
        self.names = {models.module_name(model, "down_proj", l): l for l in self.layers}
        self.segs: Segments = []
        self._idx: torch.Tensor | None = None
        self.tr: hooks.Trace | None = None
        self.exact = False  # True: one matmul per segment (bitwise the one-fact hook's op)

    def set_segments(self, segs: Segments) -> None:
        self.segs = list(segs)
        self._idx = None

    def hook(self, out: torch.Tensor, name: str) -> torch.Tensor:
        layer = self.names[name]
        x = self.tr.inputs[name]
        if layer in self.factors:
            R, A = self.factors[layer]
            if self._idx is None or self._idx.shape[0] != out.shape[0]:
                self._idx = _row_index(self.segs, out.shape[0], out.device)
            idx = self._idx
            ok = (idx >= 0).to(out.dtype)[:, None]
            a = A.index_select(0, idx.clamp(min=0)).to(out.dtype) * ok  # (B, d_ff)
            r = R.index_select(0, idx.clamp(min=0)).to(out.dtype) * ok  # (B, d_model)
            coef = torch.einsum("btf,bf->bt", x, a)
            out = out + coef[..., None] * r[:, None, :]
        if layer not in self.dense and layer not in self.bias:
            return out
        D, Bi = self.dense.get(layer), self.bias.get(layer)
        sizes = {e - s for _, s, e in self.segs}
        covered = self.segs and self.segs[0][1] == 0 and self.segs[-1][2] == out.shape[0] and all(
            a[2] == b[1] for a, b in zip(self.segs, self.segs[1:]))
        if covered and len(sizes) == 1 and not self.exact and isinstance(D if D is not None else Bi, torch.Tensor):  # equal contiguous blocks: one batched matmul
            ks = torch.tensor([k for k, _, _ in self.segs], device=out.device)
            n, T = sizes.pop(), out.shape[1]
            new = out
            if D is not None:
                xs = x.reshape(len(ks), n * T, x.shape[-1])
                add = torch.bmm(xs, D.index_select(0, ks).to(out.dtype).transpose(1, 2))
                new = new + add.reshape(out.shape)
            if Bi is not None:
                new = new + Bi.index_select(0, ks).to(out.dtype).repeat_interleave(n, 0)[:, None, :]
            return new
        pieces, row = [], 0
        for k, s, e in self.segs:
            if s > row:
                pieces.append(out[row:s])
            p = out[s:e]
            if D is not None:
                p = p + x[s:e] @ D[k].to(out.dtype).T
            if Bi is not None:
                p = p + Bi[k].to(out.dtype)
            pieces.append(p)
            row = e
        if row < out.shape[0]:
            pieces.append(out[row:])
        return torch.cat(pieces, 0)


@contextlib.contextmanager
def _per_example(model: nn.Module, pe: _PerExample) -> Iterator[_PerExample]:
    if not pe.layers:
        yield pe
        return
    with hooks.trace(model, list(pe.names), edit=pe.hook, retain_output=False, retain_input=True,
                     keep_grad=True) as tr:
        pe.tr = tr
        yield pe


def _stack_edits(model: nn.Module, edits: Sequence[Edit | None]) -> _PerExample:
    """Stacked per-layer tensors of ``edits`` (None = no edit); rank-one layers use their factors. On the model's
    device (an edit from another device is copied there)."""
    d_model, d_ff = models.dims(model)
    dev = models.device_of(model)
    K = len(edits)
    layers = sorted({l for e in edits if e is not None for l in (*e.deltas, *e.bias_deltas)})
    dense, bias, factors = {}, {}, {}
    for l in layers:
        touching = [e for e in edits if e is not None and (l in e.deltas or l in e.bias_deltas)]
        if all(l in e.factors and l not in e.bias_deltas for e in touching):
            R, A = torch.zeros(K, d_model, device=dev), torch.zeros(K, d_ff, device=dev)
            for k, e in enumerate(edits):
                if e is not None and l in e.factors:
                    r, a = e.factors[l]
                    R[k], A[k] = r.float(), a.float()
            factors[l] = (R, A)
            continue
        if any(l in e.deltas for e in touching):
            dense[l] = torch.zeros(K, d_model, d_ff, device=dev)
        if any(l in e.bias_deltas for e in touching):
            bias[l] = torch.zeros(K, d_model, device=dev)
        for k, e in enumerate(edits):
            if e is None:
                continue
            if l in e.deltas:
                dense[l][k] = e.deltas[l]
            if l in e.bias_deltas:
                bias[l][k] = e.bias_deltas[l]
    return _PerExample(model, dense, bias, factors)


@contextlib.contextmanager
def applied_per_example(
    model: nn.Module,
    edits: Sequence[Edit | None],
    rows_per_edit: Sequence[int] | torch.Tensor,
) -> Iterator[nn.Module]:
    """``with applied_per_example(model, edits, rows_per_edit):`` every forward pass adds edit k's deltas to
    its own rows only, through hooks on the down-projections (out += x @ ΔW_kᵀ + Δb_k; rank-one edits as
    (x·a_k) r_k). No weight changes. ``rows_per_edit``: the number of rows of each edit, as contiguous
    blocks in edit order, or a (B,) long tensor row -> edit index (-1: unedited row). ``edits[k]`` may be
    None (unedited rows). Every pass inside the block must have that row layout.
    """
    pe = _stack_edits(model, edits)
    pe.set_segments(segments_from(rows_per_edit))
    with _per_example(model, pe):
        yield model
