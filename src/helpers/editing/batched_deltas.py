"""The batched δ optimisation shared by batched ROME and MEMIT (:mod:`.batched`): per fact a δ added to one
module's output at its last subject token, its own Adam, per-fact losses summed for one backward."""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import hooks, models, scoring, thread_budget
from ..scoring import cache_of
from ..suffix import SuffixPass
from .base import EditError, EditRequest, fill, subject_ranges
from .batched_input_noise import _noised, _NoiseRows
from .rome import KL_TEMPLATE

log = logging.getLogger(__name__)


def _prime(model, name: str, resume: int, batch, cut: torch.Tensor, suffixes: dict, belows: dict,
           keys_of: str | None = None):
    """The first, full pass over a clean batch, without autograd: records the stream entering block ``resume``
    (see :func:`resume_layer`) and the key/value cache of the positions before ``cut`` (the δ positions) for
    the suffix passes. Returns ``name``'s output (rows × positions × d_model) and, with ``keys_of``, that
    module's (input, output) at every position, or (None, None) when no suffix pass can be built (the caller then
    runs full passes, as without priming; nothing is recorded)."""
    names = [name] if keys_of is None else [name, keys_of]
    with torch.no_grad(), hooks.trace(model, names, retain_output=True, retain_input=keys_of is not None) as tr, \
            hooks.reuse_below(model, resume, None, record=True) as rb:
        # the decoder alone: nothing reads this pass's logits (the unembedding of every position of every row
        # would cost 1-2% of the edit)
        out = model.base_model(**batch.model_inputs(), use_cache=True)
        try:
            suffixes[id(batch)] = sp = SuffixPass(batch, cut, cache_of(out))
        except ValueError as err:  # a cut outside its prompt: keep full passes
            log.debug("no suffix passes for this batch: %s", err)
            return None, None
        finally:
            del out
    if rb.stream is not None:
        belows[id(batch)] = sp.gather(rb.stream)
    return tr.outputs[name], (None if keys_of is None else (tr.inputs[keys_of], tr.outputs[keys_of]))


def resume_layer(model: nn.Module, kind: str, layer: int) -> int:
    """The first block a clean suffix step runs when δ is added to ``kind``'s output at block ``layer``:
    ``layer + 1`` when δ reaches the block's output unchanged (MEMIT's block output; ROME's MLP output where
    the MLP adds straight into the stream, :attr:`models.ArchSpec.mlp_adds_to_stream`) and a block exists
    above, so that block ``layer``'s output, recorded once with δ = 0, plus δ at the δ positions is what
    the next block reads (SCIENCE.md §6's steps need layers ``layer + 1`` on); else ``layer``."""
    adds = kind == "block" or (kind == "mlp" and models.arch_of(model).mlp_adds_to_stream)
    return layer + 1 if adds and layer + 1 < models.n_layers(model) else layer


#: Fixed cost of one more pass per optimisation step, in padded row-positions: its Python and hook overhead,
#: its own unembedding, which streams the whole (vocabulary x d_model) weight forward and backward
#: whatever its rows, and its smaller, slower products. A fact gets a pass of its own only when that saves more
#: padding than this. Calibrated on SmolLM2 at layer 12, 8 facts (session 25, Intel Xeon, 2 threads, runs
#: alternated in one process): 32 split MEMIT's 8 facts into passes of 294 and 49 rows, 64 keeps one pass of
#: 392 (MEMIT's time x0.90); ROME's grouping (3 passes of 22 rows a fact) is the same at 32 and 64, and 128
#: merged two of them (ROME's time x1.05).
PASS_OVERHEAD_POSITIONS = 64


def cut_kind(spec) -> str:
    """Where a fact's rows are cut for suffix passes, by its input noise (a ``NoiseSpec`` or None):
    "subject_end" (clean rows: from the last subject token), "subject_start" (fresh noise on the subject: from
    its first token) or "none" (noise at the code's positions, inside the prefix: full rows)."""
    if spec is None or spec.sigma == 0:
        return "subject_end"
    return "subject_start" if spec.positions == "subject" else "none"


def _pass_length(tok, fact, cut_kind: str) -> int:
    """Positions the longest of fact's rows runs in a pass: from its cut to its last target token but one (a
    suffix pass runs no position whose logits nothing reads), or the whole row for a full pass."""
    texts, targets, _, ranges = fact
    b = scoring.make_batch(tok, texts, targets)
    ends = [s + p + t for s, p, t in zip(b.start, b.prompt_len, b.target_len)]
    if cut_kind == "none":
        return max(ends)
    cuts = [e - 1 if cut_kind == "subject_end" else s for s, e in ranges]
    return max(e - c for e, c in zip(ends, cuts)) - 1


def pass_groups(lengths: Sequence[int], rows: int, overhead: float | None = None) -> list[list[int]]:
    """Facts (indices into ``lengths``) split into passes: sorted by pass length, cut into contiguous runs that
    minimise Σ_pass (rows × facts × longest length) + ``overhead`` per pass (default
    :data:`PASS_OVERHEAD_POSITIONS`; dynamic programming over the sorted order; each fact has ``rows`` rows).
    Deterministic; facts keep their order within a pass."""
    if overhead is None:
        overhead = PASS_OVERHEAD_POSITIONS
    order = sorted(range(len(lengths)), key=lambda k: (lengths[k], k))
    n = len(order)
    best, prev = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + overhead + rows * (j - i) * lengths[order[j - 1]]
            if c < best[j]:
                best[j], prev[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(sorted(order[prev[j]:j]))
        j = prev[j]
    return out[::-1]


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
    keys: dict | None = None,
    keys_of: str | None = None,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], list[dict]]:
    """Batched :func:`.rome.optimize_delta`: per fact k a δ_k (d_model,) added to ``module(kind, layer)``'s
    output at the last subject token of its rows, with its own Adam; per-fact losses computed with the same
    operations as the one-fact path and summed for one backward. ``exact``: one pass per padded length (the
    fact's rows padded exactly as in its own batch: bitwise parity); else one padded pass for all facts.
    ``keys`` (a dict) with ``keys_of`` (a module name): for every fact whose rows get a graph-free first pass (fast
    mode, clean rows), ``keys[k]`` = (input (n, ·), output (n, ·)) of ``keys_of`` at the δ positions of its n
    context-template rows, in template order, float32: ROME's keys at the last subject token of each templated
    prompt, which that pass computes anyway (through the subject the rows' tokens are the key pass's).
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
    if exact:  # one pass per padded length: each fact's rows padded exactly as in its own batch
        lengths = [scoring.make_batch(tok, f[0], f[1]).input_ids.shape[1] for f in facts]
        by_len: dict[int, list[int]] = {}
        for k in range(K):
            by_len.setdefault(lengths[k], []).append(k)
        groups = [ks for _, ks in sorted(by_len.items())]
    else:  # facts of similar pass length share a pass (padding to the longest row costs every step)
        prefix_ok = hooks.REUSE_BELOW
        specs = noise.specs if noise is not None else [None] * K
        groups = pass_groups([_pass_length(tok, f, cut_kind(specs[k]) if prefix_ok else "none")
                              for k, f in enumerate(facts)], per)
    passes = []
    dev = models.device_of(model)
    for ks in groups:
        batch = scoring.make_batch(tok, [t for k in ks for t in facts[k][0]], [t for k in ks for t in facts[k][1]],
                                   device=dev)
        pos_list = [p for k in ks for p in facts[k][2]]
        passes.append((ks, batch, torch.tensor(pos_list, device=dev), pos_list))
    name = models.module_name(model, kind, layer)
    resume = resume_layer(model, kind, layer)  # where a primed (clean, suffix) step starts
    belows: dict[int, torch.Tensor] = {}  # per pass: the stream entering block `resume` if primed, else `layer`
    suffixes: dict[int, SuffixPass] = {}
    primed: dict[int, torch.Tensor | None] = {}  # per pass: the module's output in the graph-free first pass
    d_model, _ = models.dims(model)

    deltas = [torch.zeros(d_model, device=dev, requires_grad=True) for _ in range(K)]
    opts = [torch.optim.Adam([d], lr=lr) for d in deltas]
    v_init: list[torch.Tensor | None] = [None] * K
    kl_init: list[torch.Tensor | None] = [None] * K
    infos = [{"nll": [], "kl": [], "decay": [], "loss": [], "p_target": [], "updates": 0} for _ in range(K)]
    for it in range(steps):
        thread_budget.follow()  # the stage runner may have freed a core
        losses: dict[int, torch.Tensor] = {}
        for ks, batch, pos, pos_list in passes:
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
            if prefix and reuse and id(batch) not in primed:
                if noise is not None:  # this pass's rows (full rows; none of them noised)
                    noise.set_rows([(k, facts[k][3]) for k in ks])
                # Clean rows: δ is 0 before the first update, so the full pass that fills the prefix cache and the
                # stream below the block needs no graph; the first step's loss then comes from a suffix pass like
                # every later step's. Keeping the full pass's activations for a backward was the peak of memory
                # (8 facts of SmolLM2: about 2.5 GB of the 5.5 GB peak).
                primed[id(batch)], got = _prime(model, name, resume, batch, pos, suffixes, belows,
                                                keys_of if keys is not None else None)
                if got is not None:
                    for j, k in enumerate(ks):
                        r = torch.arange(j * per, j * per + n, device=dev)
                        keys[k] = (got[0][r, pos[r]].float(), got[1][r, pos[r]].float())
            below = belows.get(id(batch)) if reuse else None
            sp = suffixes.get(id(batch)) if prefix else None
            cuts = sp.cuts if sp is not None else [0] * (per * len(ks))
            add = hooks.add_at_positions(d_rows, pos - sp.cut if sp is not None else pos)
            # a primed step (its priming pass recorded the stream entering block `resume`) starts above the edited
            # block: that block's recorded output plus δ at the δ positions; any other step adds δ in the block
            start, edit = layer, add
            if reuse and primed.get(id(batch)) is not None and resume > layer:
                start, edit, below = resume, None, add(below, name)
            if noise is not None:  # each row's subject range, in the columns of the pass that runs
                noise.set_rows([(k, [(b - c, e - c) for (b, e), c in zip(facts[k][3], cuts[j * per: (j + 1) * per])])
                                for j, k in enumerate(ks)])
            scored = sp.batch if sp is not None else batch
            kl_at = [(j * per + n, pos_list[j * per + n] - cuts[j * per + n]) for j in range(len(ks))]
            with hooks.trace(model, name, edit=edit, retain_output=it == 0 and primed.get(id(batch)) is None) \
                    as tr, hooks.reuse_below(model, start, below, record=reuse) as rb, \
                    scoring.scored_logits(model, scored, extra=kl_at) as sc:
                if sp is not None:
                    sc.set(model(**sp.model_inputs(model)).logits)
                else:
                    out = model(**batch.model_inputs(), use_cache=prefix)
                    sc.set(out.logits)
                    if prefix:
                        cut = pos if reuse else torch.tensor([b for k in ks for b, _ in facts[k][3]], device=dev)
                        try:
                            suffixes[id(batch)] = SuffixPass(batch, cut, cache_of(out))
                        except ValueError as err:  # a cut outside its prompt: keep full passes
                            log.debug("no suffix passes for this batch: %s", err)
                    del out  # the full pass's cache (all layers, all positions)
            if rb.stream is not None:
                sp_new = suffixes.get(id(batch))
                belows[id(batch)] = sp_new.gather(rb.stream) if sp_new is not None else rb.stream
            row_lps, kl_rows = sc.target_token_logprobs(), sc.extra_logprobs()
            for j, k in enumerate(ks):
                if k in failed:
                    continue
                r0 = j * per
                if it == 0:  # the module's output before any update: the graph-free first pass's, if one ran
                    first = primed.get(id(batch))
                    first = tr.outputs[name] if first is None else first
                    v_init[k] = first[r0, pos_list[r0]].detach().float().clone()
                lps = row_lps[r0 : r0 + n]
                nll = torch.stack([-lp.mean() for lp in lps]).mean()
                kl_logp = kl_rows[j][None]
                if kl_init[k] is None:
                    kl_init[k] = kl_logp.detach().clone()
                kl = kl_factor * F.kl_div(kl_init[k], kl_logp, log_target=True, reduction="batchmean")
                decay = weight_decay * (deltas[k].norm() / v_init[k].norm() ** 2)
                main = torch.exp(-nll) if requests[k].erase else nll
                loss = main + kl + decay
                # the step's numbers for the info, in one copy to the CPU
                vals = torch.stack([nll, kl, decay, loss, lps[0].sum().exp()]).detach().tolist()
                if not math.isfinite(vals[3]):
                    failed[k] = EditError(f"{requests[k].where()}: non-finite loss at iteration {it}")
                    continue
                for key, v in zip(("nll", "kl", "decay", "loss", "p_target"), vals):
                    infos[k][key].append(v)
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
