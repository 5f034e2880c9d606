"""Batched editing (issue 8): K facts' edits in one optimisation, and K edited models in one forward pass.

    from helpers.editing import batched
    edits = batched.edit_many(model, tok, requests, "rome", central_layer=3, hparams=hp, stats=stats,
                              templates=templates)                 # == [editing.edit(...) for r in requests]
    with batched.applied_per_example(model, edits, rows_per_edit=[n_1, ..., n_K]):
        model(**batch)        # rows [0, n_1) see edit 0, the next n_2 rows edit 1, ...
    ms = batched.measure_many(model, tok, tasks, facts, edits, essences)   # == [evaluation.measure(...)]

Why the batched results equal the one-fact path:

- Facts never interact: every row of a batch belongs to one fact, rows do not attend to each other, and the
  deltas of fact k are added only to fact k's rows. The per-fact losses are computed with the same operations
  as the one-fact path and *summed* for one backward, so each fact's parameters get exactly their own
  gradient (d sum / d loss_k = 1).
- Every fact has its own parameters and its own ``torch.optim.Adam`` (built as the one-fact path builds it),
  stepped only when the one-fact rules step it: ROME/MEMIT's exit before the last update (not for ROME
  erasure), FT's "step only if loss >= 1e-2" (a skipped step leaves that fact's Adam state alone), FT's
  early stop (the fact leaves the batch), and the per-fact L2 clamp (ROME/MEMIT) or L∞ clamp (FT).
- Input noise (Fact Forcing): every fact has its own generator, seeded as in the one-fact path, and its rows'
  noise is drawn with the same shapes in the same order of passes (:func:`batched_noise`): identical draws.
- ``exact=True`` (default): one pass per padded length, each fact's rows padded exactly as in its own batch,
  and the one-fact helpers for the few no-grad key passes (ROME's u and k*, MEMIT's spreading over the
  window, with the earlier layers' deltas written into the weights). Padding changes attention's float
  rounding, so this grouping is what makes the results **bitwise** equal (tested for every method,
  raise/lower, Fact Forcing). ``exact=False``: one padded pass for all facts per step, batched key passes,
  MEMIT's window applied through per-row hooks and (λC + k kᵀ)⁻¹ k by Sherman-Morrison on one LU of λC per
  layer: float-rounding parity (ROME/MEMIT deltas ~1e-5 of their max, post-edit probabilities ~2e-6
  relative; FT's Adam turns rounding in near-zero gradients into ±lr steps on single elements, so FT deltas
  differ elementwise while post-edit probabilities agree to ~2e-6).

Failures: a fact whose loss or result is non-finite does not stop the others; with ``on_error="return"`` its
slot in the result holds the :class:`EditError` instead of an :class:`Edit` (default: raise it).
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import hooks, metrics, models, scoring
from ..scoring import cache_of
from ..suffix import SuffixPass
from . import memit, rome
from .base import Edit, EditError, EditRequest, NoiseSpec, fill, subject_ranges, subject_token_range
from .finetune import LOSS_FLOOR, PATIENCE, FTHparams
from .memit import MemitHparams
from .rome import KL_TEMPLATE, RomeHparams
from .stats import SecondMoments
from .templates import ContextTemplates, context_templates

log = logging.getLogger(__name__)

__all__ = [
    "edit_many", "applied_per_example", "measure_many", "batched_noise", "Segments",
]

Segments = list[tuple[int, int, int]]  # (edit index k, first row, one past the last row), in row order


# ------------------------------------------------------------------------------------------ row bookkeeping


def segments_from(rows_per_edit: Sequence[int] | torch.Tensor) -> Segments:
    """Contiguous (k, start, end) runs from counts per edit (blocks in edit order) or a (B,) row->edit index
    tensor (-1 = no edit)."""
    if isinstance(rows_per_edit, torch.Tensor):
        idx = rows_per_edit.tolist()
        segs: Segments = []
        start = 0
        for i in range(1, len(idx) + 1):
            if i == len(idx) or idx[i] != idx[start]:
                if idx[start] >= 0:
                    segs.append((int(idx[start]), start, i))
                start = i
        return segs
    segs, r = [], 0
    for k, n in enumerate(rows_per_edit):
        if n:
            segs.append((k, r, r + int(n)))
        r += int(n)
    return segs


def _row_index(segs: Segments, n_rows: int) -> torch.Tensor:
    idx = torch.full((n_rows,), -1, dtype=torch.long)
    for k, s, e in segs:
        idx[s:e] = k
    return idx


@dataclass
class _Targets:
    """Gather indices of the target tokens of a prompt‖target batch: log p per target token, vectorised."""

    rows: torch.Tensor  # (B, t) row index
    cols: torch.Tensor  # (B, t) logit column scoring each target token
    ids: torch.Tensor  # (B, t) target token ids
    mask: torch.Tensor  # (B, t) float 1 for real target tokens
    lens: torch.Tensor  # (B,) number of target tokens

    @classmethod
    def of(cls, batch: scoring.Batch) -> "_Targets":
        B, t = len(batch.target_len), max(batch.target_len)
        cols = torch.zeros((B, t), dtype=torch.long)
        mask = torch.zeros((B, t))
        for i in range(B):
            c0 = batch.start[i] + batch.prompt_len[i] - 1
            n = batch.target_len[i]
            cols[i, :n] = torch.arange(c0, c0 + n)
            cols[i, n:] = c0
            mask[i, :n] = 1
        rows = torch.arange(B)[:, None].expand(B, t)
        ids = batch.input_ids[rows, cols + 1]
        return cls(rows, cols, ids, mask, torch.tensor(batch.target_len, dtype=torch.float32))

    def token_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, t) log p of each target token (0 beyond a row's target)."""
        lg = logits[self.rows, self.cols]
        lp = scoring.log_probs(lg)
        return lp.gather(-1, self.ids[..., None])[..., 0] * self.mask

    def sums(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) summed log p(target | prompt)."""
        return self.token_logprobs(logits).sum(-1)

    def sums_selected(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) summed log p(target | prompt) from logits (B, t, V) taken at (rows, cols) only."""
        lp = scoring.log_probs(logits)
        return (lp.gather(-1, self.ids[..., None])[..., 0] * self.mask).sum(-1)


def _sub_batch(batch: scoring.Batch, rows: Sequence[int]) -> scoring.Batch:
    r = torch.as_tensor(list(rows), dtype=torch.long)
    return scoring.Batch(batch.input_ids[r], batch.attention_mask[r], batch.position_ids[r],
                         [batch.prompt_len[i] for i in rows], [batch.target_len[i] for i in rows],
                         [batch.start[i] for i in rows])


# ------------------------------------------------------------------------------------------------- noise


class _NoiseRows:
    """Per fact: its spec, its generator, and (per pass) the token ranges of its rows."""

    def __init__(self, specs: Sequence[NoiseSpec | None], code_ranges: Sequence[tuple[int, int]] | None = None):
        self.specs = list(specs)
        self.code = list(code_ranges) if code_ranges is not None else [(0, 0)] * len(self.specs)
        self.gens = [torch.Generator().manual_seed(s.seed) if s is not None and s.sigma != 0 else None
                     for s in self.specs]
        self.blocks: list[tuple[int, list[tuple[int, int]]]] = []

    def set_rows(self, blocks: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> None:
        """``blocks`` = [(fact k, subject range of each of its rows)] in row order (contiguous rows)."""
        self.blocks = [(k, list(r)) for k, r in blocks]

    def hook(self, out: torch.Tensor, _name: str) -> torch.Tensor | None:
        if out.shape[1] <= 1 or not any(self.gens[k] is not None for k, _ in self.blocks):
            return None
        if sum(len(r) for _, r in self.blocks) != out.shape[0]:
            raise RuntimeError(f"noise rows set for {sum(len(r) for _, r in self.blocks)} rows, pass has {out.shape[0]}")
        new = out.clone()
        row = 0
        for k, ranges in self.blocks:
            gen, spec = self.gens[k], self.specs[k]
            if gen is not None:
                if spec.positions == "code":
                    ranges = [self.code[k]] * len(ranges)
                # exactly base.input_noise's draws for this fact's rows
                lens = {e - b for b, e in ranges}
                if len(lens) == 1:
                    n = lens.pop()
                    noise = torch.randn((len(ranges), n, out.shape[2]), generator=gen) * spec.sigma
                    for i, (b, e) in enumerate(ranges):
                        new[row + i, b:e] = new[row + i, b:e] + noise[i].to(out.dtype)
                else:
                    for i, (b, e) in enumerate(ranges):
                        noise = torch.randn((e - b, out.shape[2]), generator=gen) * spec.sigma
                        new[row + i, b:e] = new[row + i, b:e] + noise.to(out.dtype)
            row += len(ranges)
        return new


def _noised(noise: "_NoiseRows | None", ks: Sequence[int]) -> bool:
    """True if any of the facts ``ks`` has input noise, drawn afresh on every pass (so nothing can be reused)."""
    return noise is not None and any(noise.gens[k] is not None for k in ks)


@contextlib.contextmanager
def batched_noise(
    model: nn.Module,
    specs: Sequence[NoiseSpec | None],
    code_ranges: Sequence[tuple[int, int]] | None = None,
) -> Iterator[_NoiseRows]:
    """Per-fact input noise for batched passes: fact k's rows get the noise ``base.input_noise`` would give
    them in a pass of their own (same generator, seeded per fact, same draw shapes and order). Set the rows
    of every pass with ``.set_rows([(k, ranges_of_its_rows), ...])``. A no-op when no spec has noise."""
    nr = _NoiseRows(specs, code_ranges)
    if all(g is None for g in nr.gens):
        yield nr
        return
    with hooks.trace(model, models.module_name(model, "embed"), edit=nr.hook, retain_output=False):
        yield nr


# ------------------------------------------------------------------------------------- per-example deltas


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
                self._idx = _row_index(self.segs, out.shape[0])
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
            ks = torch.tensor([k for k, _, _ in self.segs])
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
    """Stacked per-layer tensors of ``edits`` (None = no edit); rank-one layers use their factors."""
    d_model, d_ff = models.dims(model)
    K = len(edits)
    layers = sorted({l for e in edits if e is not None for l in (*e.deltas, *e.bias_deltas)})
    dense, bias, factors = {}, {}, {}
    for l in layers:
        touching = [e for e in edits if e is not None and (l in e.deltas or l in e.bias_deltas)]
        if all(l in e.factors and l not in e.bias_deltas for e in touching):
            R, A = torch.zeros(K, d_model), torch.zeros(K, d_ff)
            for k, e in enumerate(edits):
                if e is not None and l in e.factors:
                    r, a = e.factors[l]
                    R[k], A[k] = r.float(), a.float()
            factors[l] = (R, A)
            continue
        if any(l in e.deltas for e in touching):
            dense[l] = torch.zeros(K, d_model, d_ff)
        if any(l in e.bias_deltas for e in touching):
            bias[l] = torch.zeros(K, d_model)
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


# ------------------------------------------------------------------------------------------ ROME and MEMIT


def _keys_many(model, tok, filled_templates: Sequence[Sequence[str]], requests: Sequence[EditRequest],
               layer: int, noise: _NoiseRows | None, pe: _PerExample | None = None,
               block_layer: int | None = None):
    """Per fact k: down-projection (input (n_k, d_ff), output (n_k, d_model)) at the last subject token of each
    of its filled templates, in one pass (stopped after the last module needed); with ``block_layer``, also
    block ``block_layer``'s output at those positions."""
    texts, pos, blocks, counts = [], [], [], []
    for k, (temps, req) in enumerate(zip(filled_templates, requests)):
        ranges = subject_ranges(tok, temps, req.subject)
        texts += [fill(t, req.subject) for t in temps]
        pos += [e - 1 for _, e in ranges]
        blocks.append((k, ranges))
        counts.append(len(temps))
    batch = scoring.make_batch(tok, texts)
    name = models.module_name(model, "down_proj", layer)
    names = [name]
    if block_layer is not None:
        bname = models.module_name(model, "block", block_layer)
        names = [name, bname] if block_layer >= layer else [bname, name]
    if noise is not None:
        noise.set_rows(blocks)
    if pe is not None:
        pe.set_segments(segments_from(counts))
    with torch.no_grad(), hooks.trace(model, names, retain_input=True, retain_output=True, stop=True) as tr:
        model(**batch.model_inputs())
    rows = torch.arange(len(texts))
    p = torch.tensor(pos)
    k_in, k_out = tr.inputs[name][rows, p].float(), tr.outputs[name][rows, p].float()
    h = tr.outputs[bname][rows, p].float() if block_layer is not None else None
    out, r = [], 0
    for n in counts:
        out.append((k_in[r : r + n], k_out[r : r + n], h[r : r + n] if h is not None else None))
        r += n
    return out


class _OneFact:
    """The ``NoisePositions``-like view of one fact of a :class:`_NoiseRows`, for the one-fact helpers."""

    def __init__(self, noise: _NoiseRows | None, k: int):
        self.noise, self.k = noise, k

    def set_rows(self, rows: Sequence[tuple[int, int]]) -> None:
        if self.noise is not None:
            self.noise.set_rows([(self.k, rows)])


def _optimize_deltas(
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest],
    context_templates: Sequence[str],
    kind: str,
    layer: int,
    steps: int,
    lr: float,
    weight_decay: float,
    clamp_norm_factor: float,
    kl_factor: float,
    break_before_last: Sequence[bool],
    noise: _NoiseRows | None,
    failed: dict[int, EditError],
    exact: bool,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], list[dict]]:
    """Batched :func:`.rome.optimize_delta`: per fact k a δ_k (d_model,) added to ``module(kind, layer)``'s
    output at the last subject token of its rows, with its own Adam; per-fact losses computed with the same
    operations as the one-fact path and summed for one backward. ``exact``: one pass per padded length (the
    fact's rows padded exactly as in its own batch: bitwise parity); else one padded pass for all facts.
    Returns (v_init per fact, δ per fact, infos)."""
    if context_templates[0] != "{}":
        raise ValueError("the first context template must be the bare '{}'")
    K, n = len(requests), len(context_templates)
    per = n + 1
    facts = []  # per fact: texts, targets, positions, ranges
    for req in requests:
        full = [fill(c, req.template) for c in context_templates] + [KL_TEMPLATE]
        ranges = subject_ranges(tok, full, req.subject)
        facts.append(([fill(t, req.subject) for t in full], [req.target] * per, [e - 1 for _, e in ranges], ranges))
    lengths = [scoring.make_batch(tok, f[0], f[1]).input_ids.shape[1] if exact else 0 for f in facts]
    groups: dict[int, list[int]] = {}
    for k in range(K):
        groups.setdefault(lengths[k], []).append(k)
    passes = []
    for _, ks in sorted(groups.items()):
        batch = scoring.make_batch(tok, [t for k in ks for t in facts[k][0]], [t for k in ks for t in facts[k][1]])
        pos = torch.tensor([p for k in ks for p in facts[k][2]])
        passes.append((ks, batch, pos))
    name = models.module_name(model, kind, layer)
    belows: dict[int, torch.Tensor] = {}
    suffixes: dict[int, SuffixPass] = {}
    d_model, _ = models.dims(model)

    deltas = [torch.zeros(d_model, requires_grad=True) for _ in range(K)]
    opts = [torch.optim.Adam([d], lr=lr) for d in deltas]
    v_init: list[torch.Tensor | None] = [None] * K
    kl_init: list[torch.Tensor | None] = [None] * K
    infos = [{"nll": [], "kl": [], "decay": [], "loss": [], "p_target": [], "updates": 0} for _ in range(K)]
    for it in range(steps):
        losses: dict[int, torch.Tensor] = {}
        for ks, batch, pos in passes:
            ks_ok = [k for k in ks if k not in failed]
            if not ks_ok:
                continue
            for k in ks_ok:
                opts[k].zero_grad()
            d_rows = torch.cat([deltas[k].expand(per, -1) for k in ks])
            # Clean rows: the stream entering the block, computed at step 0, is reused at every later step; in fast
            # mode also the prefix before each row's δ position (suffix.SuffixPass). Under fresh input noise on the
            # rows' own subject tokens (Fact Forcing) nothing below the block can be reused, but the prefix before
            # each row's subject is never noised: fast mode recomputes only positions from the subject on.
            reuse = not _noised(noise, ks)
            subject_noise = not reuse and all(noise.specs[k] is None or noise.specs[k].positions == "subject"
                                              for k in ks)
            prefix = not exact and hooks.REUSE_BELOW and (reuse or subject_noise)
            below = belows.get(id(batch)) if reuse else None
            sp = suffixes.get(id(batch)) if prefix else None
            if noise is not None:  # each row's subject range, in the columns of the pass that runs
                cuts = sp.cut.tolist() if sp is not None else [0] * (per * len(ks))
                noise.set_rows([(k, [(b - c, e - c) for (b, e), c in zip(facts[k][3], cuts[j * per: (j + 1) * per])])
                                for j, k in enumerate(ks)])
            edit_pos = pos - sp.cut if sp is not None else pos
            scored = sp.batch if sp is not None else batch
            kl_at = [(j * per + n, int(edit_pos[j * per + n])) for j in range(len(ks))]
            with hooks.trace(model, name, edit=hooks.add_at_positions(d_rows, edit_pos), retain_output=it == 0) \
                    as tr, hooks.reuse_below(model, layer, below, record=reuse) as rb, \
                    scoring.scored_logits(model, scored, extra=kl_at) as sc:
                if sp is not None:
                    sc.set(model(**sp.model_inputs(model)).logits)
                else:
                    out = model(**batch.model_inputs(), use_cache=prefix)
                    sc.set(out.logits)
                    if prefix:
                        cut = pos if reuse else torch.tensor([b for k in ks for b, _ in facts[k][3]])
                        try:
                            suffixes[id(batch)] = SuffixPass(batch, cut, cache_of(out))
                        except ValueError as err:  # a cut outside its prompt: keep full passes
                            log.debug("no suffix passes for this batch: %s", err)
                    del out  # the full pass's cache (all layers, all positions)
            if rb.stream is not None:
                sp_new = suffixes.get(id(batch))
                belows[id(batch)] = sp_new.gather(rb.stream) if sp_new is not None else rb.stream
            row_lps, kl_logits = sc.target_token_logprobs(), sc.extra()
            for j, k in enumerate(ks):
                if k in failed:
                    continue
                r0 = j * per
                if it == 0:
                    v_init[k] = tr.outputs[name][r0, pos[r0]].detach().float().clone()
                lps = row_lps[r0 : r0 + n]
                nll = torch.stack([-lp.mean() for lp in lps]).mean()
                kl_logp = torch.log_softmax(kl_logits[j].float(), -1)[None]
                if kl_init[k] is None:
                    kl_init[k] = kl_logp.detach().clone()
                kl = kl_factor * F.kl_div(kl_init[k], kl_logp, log_target=True, reduction="batchmean")
                decay = weight_decay * (deltas[k].norm() / v_init[k].norm() ** 2)
                main = torch.exp(-nll) if requests[k].erase else nll
                loss = main + kl + decay
                if not torch.isfinite(loss.detach()):
                    failed[k] = EditError(f"{requests[k].where()}: non-finite loss at iteration {it}")
                    continue
                inf = infos[k]
                inf["nll"].append(float(nll.detach()))
                inf["kl"].append(float(kl.detach()))
                inf["decay"].append(float(decay.detach()))
                inf["loss"].append(float(loss.detach()))
                inf["p_target"].append(float(lps[0].detach().sum().exp()))
                if not (break_before_last[k] and it == steps - 1):
                    losses[k] = loss
        if not losses:
            continue
        # d(sum)/d(loss_k) = 1: each δ_k gets exactly its one-fact gradient
        torch.stack(list(losses.values())).sum().backward()
        for k in losses:
            opts[k].step()
            infos[k]["updates"] += 1
            with torch.no_grad():
                delta = deltas[k]
                max_norm = clamp_norm_factor * v_init[k].norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    out = []
    for k in range(K):
        if k not in failed and not torch.isfinite(deltas[k]).all():
            failed[k] = EditError(f"{requests[k].where()}: non-finite delta")
        out.append(None if k in failed else deltas[k].detach().clone())
    return v_init, out, infos


def _rome_many(model, tok, requests, layer, hp: RomeHparams, stats: SecondMoments, templates: Sequence[str],
               noise, failed, exact: bool) -> list[Edit | None]:
    K = len(requests)
    if exact:  # one-fact key passes (two per fact; the optimisation's 20 passes are the batched part)
        uk: list = []
        for k, req in enumerate(requests):
            try:
                uk.append(rome.left_vector(model, tok, req, layer, hp, stats, templates, _OneFact(noise, k)))
            except EditError as err:
                failed[k] = err
                uk.append((None, None))
    else:
        keys = _keys_many(model, tok, [[fill(c, r.template) for c in templates] for r in requests], requests,
                          layer, noise)
        k_bar = torch.stack([k.mean(0) for k, _, _ in keys]).double()  # (K, d_ff)
        if hp.mom2_adjustment:
            inv = stats.inverse(layer).double()
            u = torch.stack([inv @ k_bar[k] for k in range(K)])
        else:
            u = k_bar
        u = (u / u.norm(dim=-1, keepdim=True)).float()
        uk = [(u[k], k_bar[k]) for k in range(K)]
        for k in range(K):
            if not torch.isfinite(u[k]).all():
                failed[k] = EditError(f"{requests[k].where()}: non-finite left vector u")
    v_init, delta, infos = _optimize_deltas(
        model, tok, requests, templates, "mlp", layer, steps=hp.v_num_grad_steps, lr=hp.v_lr,
        weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
        break_before_last=[not r.erase for r in requests], noise=noise, failed=failed, exact=exact)
    out: list[Edit | None] = []
    if exact:
        for k, req in enumerate(requests):
            if k in failed:
                out.append(None)
                continue
            try:
                out.append(rome.rome_result(model, tok, req, layer, uk[k][0], uk[k][1], v_init[k], delta[k],
                                            infos[k], _OneFact(noise, k)))
            except EditError as err:
                failed[k] = err
                out.append(None)
        return out
    bare = _keys_many(model, tok, [[r.template] for r in requests], requests, layer, noise)
    for k, req in enumerate(requests):
        if k in failed:
            out.append(None)
            continue
        u_k, kb = uk[k]
        v_star = v_init[k] + delta[k]
        k_star, m = bare[k][0][0], bare[k][1][0]
        denom = float(k_star.double() @ u_k.double())
        if abs(denom) < 1e-12:
            failed[k] = EditError(f"{req.where()}: k*^T u = {denom:g}, cannot form the right vector")
            out.append(None)
            continue
        r = ((v_star - m).double() / denom).float()
        info = infos[k]
        info.update(k_star=k_star, v_star=v_star, m=m, v_init=v_init[k], k_bar=kb.float())
        out.append(Edit(method="rome", layers=[layer], deltas={layer: torch.outer(r, u_k)},
                        factors={layer: (r, u_k.clone())}, info=info))
    return out


_LU_CACHE: "weakref.WeakKeyDictionary[SecondMoments, dict]" = weakref.WeakKeyDictionary()


def _lam_c_lu(stats: SecondMoments, layer: int, lam: float):
    """LU factors of λ C (float64), cached per statistics object."""
    cache = _LU_CACHE.setdefault(stats, {})
    key = (layer, float(lam))
    if key not in cache:
        cache[key] = torch.linalg.lu_factor(lam * stats.moment(layer).double())
    return cache[key]


def _memit_many(model, tok, requests, layers, hp: MemitHparams, stats: SecondMoments,
                groups: Sequence[Sequence[str]], noise, failed, exact: bool) -> list[Edit | None]:
    K = len(requests)
    layers = sorted(layers)
    z_layer = layers[-1]
    flat = [t for g in groups for t in g]
    h_init, delta, infos = _optimize_deltas(
        model, tok, requests, flat, "block", z_layer, steps=hp.v_num_grad_steps, lr=hp.v_lr,
        weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
        break_before_last=[True] * K, noise=noise, failed=failed, exact=exact)
    if exact:  # the one-fact spreading per fact (2 no-grad passes per layer, the original weights edited)
        out: list[Edit | None] = []
        for k, req in enumerate(requests):
            if k in failed:
                out.append(None)
                continue
            try:
                out.append(memit.spread(model, tok, req, layers, hp, stats, groups, h_init[k], delta[k], infos[k],
                                        _OneFact(noise, k)))
            except EditError as err:
                failed[k] = err
                out.append(None)
        return out
    d_model, d_ff = models.dims(model)
    zero = torch.zeros(d_model)
    z = torch.stack([h_init[k] + delta[k] if k not in failed else zero for k in range(K)])
    h_init = torch.stack([h if h is not None else zero for h in h_init])
    full_groups = [[[fill(t, r.template) for t in g] for g in groups] for r in requests]
    full = [[t for g in fg for t in g] for fg in full_groups]
    edits = [Edit(method="memit", layers=list(layers), deltas={}, info=infos[k]) for k in range(K)]
    for k in range(K):
        infos[k].update(z=z[k], z_layer=z_layer, h_init=h_init[k], residual_norms=[])
    n = len(layers)
    pe = _PerExample(model, factors={})
    for i, layer in enumerate(layers):
        # earlier layers' updates through per-row hooks (the one-fact path writes them into the weights)
        with _per_example(model, pe):
            keys = _keys_many(model, tok, full, requests, layer, noise, pe)
            bare = _keys_many(model, tok, [[r.template] for r in requests], requests, z_layer, noise, pe,
                              block_layer=z_layer)
        ks = []
        for k in range(K):
            k_all, j, gm = keys[k][0], 0, []
            for g in full_groups[k]:
                gm.append(k_all[j : j + len(g)].double().mean(0))
                j += len(g)
            ks.append(torch.stack(gm).mean(0))
        kmat = torch.stack(ks)  # (K, d_ff) float64
        h_cur = torch.stack([bare[k][2][0] for k in range(K)])
        resid = (z - h_cur).double() / (n - i)
        # (λC + k kᵀ)⁻¹ k = y / (1 + kᵀ y) with y = (λC)⁻¹ k  (Sherman-Morrison, float64)
        y = torch.linalg.lu_solve(*_lam_c_lu(stats, layer, hp.mom2_update_weight), kmat.T).T
        a = y / (1 + (kmat * y).sum(-1, keepdim=True))
        for k in range(K):
            if k in failed:
                continue
            r_k, a_k = resid[k].float(), a[k].float()
            if not (torch.isfinite(r_k).all() and torch.isfinite(a_k).all()):
                failed[k] = EditError(f"{requests[k].where()}: non-finite residual or solve at layer {layer}")
                continue
            edits[k].deltas[layer] = torch.outer(resid[k], a[k]).float()
            edits[k].factors[layer] = (r_k, a_k)
            infos[k]["residual_norms"].append(float(resid[k].norm() * (n - i)))
        if i < n - 1:
            # next layer's passes see this layer's update; the one-fact path writes the float outer product
            # into the weights: use it as a dense per-row delta (exact same delta values)
            pe.dense[layer] = torch.stack([edits[k].deltas.get(layer, torch.zeros(d_model, d_ff))
                                           for k in range(K)])
            pe.layers = sorted(set(pe.dense))
            pe.names = {models.module_name(model, "down_proj", l): l for l in pe.layers}
    return [None if k in failed else edits[k] for k in range(K)]


# ------------------------------------------------------------------------------------------- fine-tuning


def _ft_many(model, tok, requests, layers, hp: FTHparams, noise, failed, method: str,
             exact: bool) -> list[Edit | None]:
    """Batched :func:`.finetune.ft_edit`. Per fact its own delta tensors and its own ``torch.optim.Adam``
    (built exactly as the one-fact path builds it), stepped only when the fact's loss is >= 1e-2, so skipped
    steps leave that fact's Adam state untouched. Facts are grouped by sequence length, one pass per
    length (no padding), and the hook does one matmul per fact: each row computes bitwise what it computes
    in the one-fact pass. ``exact=False``: one padded pass per step for all facts."""
    K = len(requests)
    layers = sorted(layers)
    n_rows = [r.noise.n_samples if r.noise is not None else 1 for r in requests]
    texts, targets, ranges = [], [], []
    for r, nr in zip(requests, n_rows):
        texts += [r.text] * nr
        targets += [r.target] * nr
        ranges.append(subject_ranges(tok, [r.template], r.subject) * nr)
    full = scoring.make_batch(tok, texts, targets)
    first = [sum(n_rows[:k]) for k in range(K)]
    T_all = full.input_ids.shape[1]
    lengths = [full.prompt_len[first[k]] + full.target_len[first[k]] if exact else T_all for k in range(K)]
    eps = float(hp.norm_constraint)
    d_model, d_ff = models.dims(model)
    has_bias = [l for l in layers if getattr(models.module(model, "down_proj", l), "bias", None) is not None]
    dw = {l: [torch.zeros(d_model, d_ff, requires_grad=True) for _ in range(K)] for l in layers}
    db = {l: [torch.zeros(d_model, requires_grad=True) for _ in range(K)] for l in has_bias}
    params = [[dw[l][k] for l in layers] + [db[l][k] for l in has_bias] for k in range(K)]
    opts = [torch.optim.Adam(params[k], lr=hp.lr, weight_decay=hp.weight_decay) for k in range(K)]
    infos = [{"loss": [], "max_abs_delta": [], "updates": 0} for _ in range(K)]
    below = [0] * K
    fact_below: dict[int, torch.Tensor] = {}
    active = list(range(K))
    pe = _PerExample(model, dw, db)
    pe.exact = True
    with _per_example(model, pe):
        for step in range(hp.num_steps):
            active = [k for k in active if k not in failed]
            if not active:
                break
            groups: dict[int, list[int]] = {}
            for k in active:
                groups.setdefault(lengths[k], []).append(k)
            losses = {}
            for T, ks in sorted(groups.items()):
                rows = [first[k] + j for k in ks for j in range(n_rows[k])]
                batch = _sub_batch(full, rows)
                batch.input_ids, batch.attention_mask, batch.position_ids = (
                    batch.input_ids[:, :T], batch.attention_mask[:, :T], batch.position_ids[:, :T])
                segs, r0 = [], 0
                for k in ks:
                    segs.append((k, r0, r0 + n_rows[k]))
                    r0 += n_rows[k]
                pe.set_segments(segs)
                if noise is not None:
                    noise.set_rows([(k, ranges[k]) for k in ks])
                # streams entering the first tuned block, per fact (not under fresh input noise)
                reuse = not _noised(noise, ks)
                cached = reuse and all(k in fact_below for k in ks)
                stream_in = torch.cat([fact_below[k] for k in ks]) if cached else None
                with hooks.reuse_below(model, layers[0], stream_in, record=reuse) as rb, \
                        scoring.scored_logits(model, batch) as sc:
                    sc.set(model(**batch.model_inputs()).logits)
                if rb.stream is not None:
                    for k, s, e in segs:
                        fact_below[k] = rb.stream[s:e]
                logp = torch.stack([lp.sum() for lp in sc.target_token_logprobs()])
                for k, s, e in segs:
                    lk = logp[s:e].exp().sum() if requests[k].erase else -logp[s:e].sum()
                    if not torch.isfinite(lk):
                        failed[k] = EditError(f"{requests[k].where()}: non-finite fine-tuning loss at step {step}")
                        continue
                    losses[k] = lk
            ks_ok = sorted(losses)
            for k in ks_ok:
                infos[k]["loss"].append(float(losses[k].detach()))
            stepping = [k for k in ks_ok if infos[k]["loss"][-1] >= LOSS_FLOOR]
            if stepping:
                for k in stepping:
                    opts[k].zero_grad()
                # d(sum)/d(loss_k) = 1: each fact's graph gets exactly the one-fact path's gradient
                torch.stack([losses[k] for k in stepping]).sum().backward()
                for k in stepping:
                    opts[k].step()
                    infos[k]["updates"] += 1
                    with torch.no_grad():
                        for p in params[k]:
                            p.clamp_(-eps, eps)
            done = []
            for k in ks_ok:
                infos[k]["max_abs_delta"].append(max(float(p.detach().abs().max()) for p in params[k]))
                if not requests[k].erase:
                    below[k] = below[k] + 1 if infos[k]["loss"][-1] < LOSS_FLOOR else 0
                    if below[k] >= PATIENCE:
                        done.append(k)
            active = [k for k in active if k not in done]
    out: list[Edit | None] = []
    for k in range(K):
        if k in failed:
            out.append(None)
            continue
        out.append(Edit(method=method, layers=list(layers),
                        deltas={l: dw[l][k].detach().clone() for l in layers},
                        bias_deltas={l: db[l][k].detach().clone() for l in has_bias}, info=infos[k]))
    return out


# ------------------------------------------------------------------------------------------------ the API


def edit_many(
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest],
    method: str,
    central_layer: int,
    hparams: dict | object | None = None,
    stats: SecondMoments | None = None,
    templates: ContextTemplates | None = None,
    chunk_size: int | None = None,
    on_error: str = "raise",
    exact: bool = True,
) -> list[Edit | EditError]:
    """The ``method`` edits of all ``requests`` at ``central_layer``, optimised together.

    Equals ``[editing.edit(model, tok, r, method, central_layer, hparams, stats, templates) for r in
    requests]`` up to float rounding (see the module docstring). ``chunk_size`` bounds how many facts are
    optimised at once (memory: FT keeps ~4 x K x window x d_model x d_ff floats). ``on_error``: "raise" the
    first :class:`EditError`, or "return" it in the failed fact's slot. ``info["seconds"]`` is the chunk's
    wall time divided by its size; ``info["batch_size"]`` the chunk size.
    """
    from . import prepare  # the package's own resolution of hparams, windows, statistics and templates

    if on_error not in ("raise", "return"):
        raise ValueError(f"on_error must be 'raise' or 'return', not {on_error!r}")
    requests = list(requests)
    if not requests:
        return []
    if chunk_size is not None and len(requests) > chunk_size:
        out: list[Edit | EditError] = []
        for i in range(0, len(requests), chunk_size):
            out += edit_many(model, tok, requests[i : i + chunk_size], method, central_layer, hparams, stats,
                             templates, None, on_error, exact)
        return out
    hp, layers, templates = prepare(model, tok, method, central_layer, hparams, stats, templates)
    t0 = time.perf_counter()
    specs = [r.noise for r in requests]
    code = [subject_token_range(tok, r.template, r.subject) for r in requests]
    failed: dict[int, EditError] = {}
    with batched_noise(model, specs, code) as noise:
        if method == "rome":
            res = _rome_many(model, tok, requests, central_layer, hp, stats, templates.rome, noise, failed, exact)
        elif method == "memit":
            res = _memit_many(model, tok, requests, layers, hp, stats, templates.memit, noise, failed, exact)
        else:
            res = _ft_many(model, tok, requests, layers, hp, noise, failed, method, exact)
    seconds = (time.perf_counter() - t0) / len(requests)
    out = []
    for k, (req, e) in enumerate(zip(requests, res)):
        if e is not None and k not in failed:
            e.info["seconds"] = seconds
            e.info["central_layer"] = central_layer
            e.info["batch_size"] = len(requests)
            try:
                e.check_finite(req.where())
            except EditError as err:
                failed[k] = err
        if k in failed:
            if on_error == "raise":
                raise failed[k]
            out.append(failed[k])
        else:
            out.append(e)
    return out


# ------------------------------------------------------------------------------------------- evaluation


def _chunks(sizes: Sequence[int], max_rows: int) -> list[list[int]]:
    """Greedy groups of consecutive items whose sizes sum to <= max_rows (at least one item per group)."""
    groups, cur, n = [], [], 0
    for i, s in enumerate(sizes):
        if cur and n + s > max_rows:
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += s
    if cur:
        groups.append(cur)
    return groups


def _probs_many(model, tok, prompts: Sequence[Sequence[str]], targets: Sequence[Sequence[str]],
                subjects: Sequence[str], sigmas: Sequence[float | None], edits: Sequence[Edit | None] | None,
                max_rows: int) -> list[list[float]]:
    """Per fact k, p(targets[k][i] | prompts[k][i]) as :func:`helpers.evaluation.probs` computes it (one pass
    per fact, fresh seed-1 noise per fact), with fact k's edit applied to its rows."""
    from ..evaluation import EVAL_NOISE_SEED, _ranges

    out: list[list[float]] = [[] for _ in prompts]
    for group in _chunks([len(p) for p in prompts], max_rows):
        texts = [p for k in group for p in prompts[k]]
        tgts = [t for k in group for t in targets[k]]
        if not texts:
            continue
        specs = [NoiseSpec(sigma=sigmas[k], n_samples=1, seed=EVAL_NOISE_SEED, positions="subject")
                 if sigmas[k] is not None else None for k in group]
        counts = [len(prompts[k]) for k in group]
        batch = scoring.make_batch(tok, texts, tgts)
        sub_edits = [edits[k] for k in group] if edits is not None else [None] * len(group)
        with torch.no_grad(), batched_noise(model, specs) as noise, \
                applied_per_example(model, sub_edits, counts):
            noise.set_rows([(j, _ranges(tok, prompts[k], subjects[k])) for j, k in enumerate(group)])
            tg = _Targets.of(batch)
            if scoring.SELECT_LOGITS:  # the unembedding only at the target positions
                with scoring.unembed_at(model, tg.rows, tg.cols):
                    lg = model(**batch.model_inputs()).logits[0].reshape(*tg.cols.shape, -1)
                logp = tg.sums_selected(lg)
            else:
                logp = tg.sums(model(**batch.model_inputs()).logits)
        p = logp.exp().tolist()
        r = 0
        for k, n in zip(group, counts):
            out[k] = p[r : r + n]
            r += n
    return out


def _essence_many(model, tok, texts: Sequence[Sequence[str]], subjects: Sequence[str],
                  sigmas: Sequence[float | None], edits: Sequence[Edit | None] | None, max_rows: int,
                  max_tokens: int = 100) -> list[float]:
    """Per fact, :func:`helpers.evaluation.essence_ppl` of its texts, with its edit applied to its rows."""
    from ..evaluation import EVAL_NOISE_SEED, _ranges

    out = [float("nan")] * len(texts)
    for group in _chunks([len(t) for t in texts], max_rows):
        group = [k for k in group if texts[k]]
        if not group:
            continue
        ids = [scoring.encode(tok, t)[:max_tokens] for k in group for t in texts[k]]
        counts = [len(texts[k]) for k in group]
        x, mask = scoring.pad_right(tok, ids)
        specs = [NoiseSpec(sigma=sigmas[k], n_samples=1, seed=EVAL_NOISE_SEED, positions="subject")
                 if sigmas[k] is not None else None for k in group]
        sub_edits = [edits[k] for k in group] if edits is not None else [None] * len(group)
        with torch.no_grad(), batched_noise(model, specs) as noise, \
                applied_per_example(model, sub_edits, counts):
            noise.set_rows([(j, _ranges(tok, texts[k], subjects[k])) for j, k in enumerate(group)])
            logits = model(input_ids=x, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        logp = torch.log_softmax(logits.float(), -1)
        r = 0
        for k, n in zip(group, counts):
            lps = []
            for row in range(r, r + n):
                m = len(ids[row])
                lps.append((logp[row, torch.arange(m - 1), x[row, 1:m]] if m >= 2 else torch.zeros(0)).numpy())
            out[k] = metrics.essence_ppl(lps)
            r += n
    return out


def measure_many(
    model: nn.Module,
    tok,
    tasks: Sequence,
    facts: Sequence[Mapping],
    edits: Sequence[Edit | None] | None = None,
    essences: Sequence[Sequence[str] | None] | None = None,
    max_rows: int = 256,
) -> list[dict]:
    """``[evaluation.measure(model_k, tok, tasks[k], facts[k], essences[k])]`` where model_k is the model
    with ``edits[k]`` applied (None / no ``edits``: the unedited model), computed in a few batched passes
    with per-example edits. ``max_rows`` bounds the rows of one pass (facts are never split across passes).
    """
    from ..evaluation import Prompts

    K = len(tasks)
    P = [Prompts.of(f) for f in facts]
    subj = [f["subject"] for f in facts]
    sig = [t.eval_sigma for t in tasks]
    own = [[p.rewrite, *p.paraphrases] for p in P]
    nb = [list(p.neighborhood) for p in P]
    prompts = [own[k] + nb[k] for k in range(K)]
    tgt = [[tasks[k].target] * len(own[k]) + [tasks[k].neighborhood_target] * len(nb[k]) for k in range(K)]
    base = [[tasks[k].baseline] * len(own[k]) + [facts[k]["target_true"]] * len(nb[k]) for k in range(K)]
    p_t = _probs_many(model, tok, prompts, tgt, subj, sig, edits, max_rows)
    p_b = _probs_many(model, tok, prompts, base, subj, sig, edits, max_rows)
    ess = [list(e) if e else [] for e in (essences or [None] * K)]
    ppl = _essence_many(model, tok, ess, subj, sig, edits, max(1, max_rows // 4))
    out = []
    for k in range(K):
        n = len(own[k])
        out.append({
            "rewrite": p_t[k][0], "paraphrase": p_t[k][1:n], "neighborhood": p_t[k][n:],
            "rewrite_base": p_b[k][0], "paraphrase_base": p_b[k][1:n], "neighborhood_base": p_b[k][n:],
            "essence_ppl": ppl[k] if ess[k] else float("nan"),
        })
    return out
