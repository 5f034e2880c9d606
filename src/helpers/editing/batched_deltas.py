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


def _prime(model, name: str, layer: int, batch, cut: torch.Tensor, suffixes: dict, belows: dict):
    """The first, full pass over a clean batch, without autograd: records the stream entering block ``layer``
    and the key/value cache of the positions before ``cut`` (the δ positions) for the suffix passes. Returns
    ``name``'s output (rows × positions × d_model), or None when no suffix pass can be built (the caller then
    runs full passes, as without priming)."""
    with torch.no_grad(), hooks.trace(model, name, retain_output=True) as tr, \
            hooks.reuse_below(model, layer, None, record=True) as rb:
        out = model(**batch.model_inputs(), use_cache=True)
        try:
            suffixes[id(batch)] = sp = SuffixPass(batch, cut, cache_of(out))
        except ValueError as err:  # a cut outside its prompt: keep full passes
            log.debug("no suffix passes for this batch: %s", err)
            return None
        finally:
            del out
    if rb.stream is not None:
        belows[id(batch)] = sp.gather(rb.stream)
    return tr.outputs[name]


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
    dev = models.device_of(model)
    for _, ks in sorted(groups.items()):
        batch = scoring.make_batch(tok, [t for k in ks for t in facts[k][0]], [t for k in ks for t in facts[k][1]],
                                   device=dev)
        pos_list = [p for k in ks for p in facts[k][2]]
        passes.append((ks, batch, torch.tensor(pos_list, device=dev), pos_list))
    name = models.module_name(model, kind, layer)
    belows: dict[int, torch.Tensor] = {}
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
                # Clean rows: δ is 0 before the first update, so the full pass that fills the prefix cache and the
                # stream below the block needs no graph; the first step's loss then comes from a suffix pass like
                # every later step's. Keeping the full pass's activations for a backward was the peak of memory
                # (8 facts of SmolLM2: about 2.5 GB of the 5.5 GB peak).
                primed[id(batch)] = _prime(model, name, layer, batch, pos, suffixes, belows)
            below = belows.get(id(batch)) if reuse else None
            sp = suffixes.get(id(batch)) if prefix else None
            cuts = sp.cuts if sp is not None else [0] * (per * len(ks))
            if noise is not None:  # each row's subject range, in the columns of the pass that runs
                noise.set_rows([(k, [(b - c, e - c) for (b, e), c in zip(facts[k][3], cuts[j * per: (j + 1) * per])])
                                for j, k in enumerate(ks)])
            edit_pos = pos - sp.cut if sp is not None else pos
            scored = sp.batch if sp is not None else batch
            kl_at = [(j * per + n, pos_list[j * per + n] - cuts[j * per + n]) for j in range(len(ks))]
            with hooks.trace(model, name, edit=hooks.add_at_positions(d_rows, edit_pos), retain_output=it == 0 and primed.get(id(batch)) is None) \
                    as tr, hooks.reuse_below(model, layer, below, record=reuse) as rb, \
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
            row_lps, kl_logits = sc.target_token_logprobs(), sc.extra()
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
                kl_logp = torch.log_softmax(kl_logits[j].float(), -1)[None]
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
