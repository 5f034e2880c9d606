"""Batched ROME and MEMIT (:mod:`.batched`): the key passes of many facts, the batched δ optimisation, and the
rank-one (ROME) or spread-over-the-window (MEMIT) updates, exact or in fast mode."""

from __future__ import annotations

import contextlib
import weakref
from typing import Sequence

import torch

from .. import hooks, models, scoring
from . import memit, rome
from .base import Edit, EditError, EditRequest, fill, subject_ranges
from .batched_deltas import _optimize_deltas
from .batched_input_noise import _noised, _NoiseRows, _OneFact
from .batched_rows import segments_from
from .memit import MemitHparams
from .per_example import _per_example, _PerExample
from .rome import RomeHparams
from .stats import SecondMoments


def _through_subject(tok, template: str, subject: str, e: int) -> str:
    """``fill(template, subject)`` cut after the subject when its first ``e`` tokens (through the last subject
    token) stay the same: a key pass reads nothing later, and causal attention lets nothing later change it."""
    full = fill(template, subject)
    cut = fill(template[: template.find("{}") + 2], subject)
    if cut != full and scoring.encode(tok, cut) != scoring.encode(tok, full)[:e]:
        return full
    return cut


def _keys_many(model, tok, filled_templates: Sequence[Sequence[str]], requests: Sequence[EditRequest],
               layer: int, noise: _NoiseRows | None, pe: _PerExample | None = None,
               block_layer: int | None = None, below: dict | None = None):
    """Per fact k: down-projection (input (n_k, d_ff), output (n_k, d_model)) at the last subject token of each
    of its filled templates, in one pass (stopped after the last module needed); with ``block_layer``, also
    block ``block_layer``'s output at those positions. ``below`` = {"layer": ℓ0}: the stream entering block ℓ0
    is recorded into it by the first call and replayed by later calls on the same texts (MEMIT's passes over
    its window: nothing below the window's first layer changes between them)."""
    texts, pos, blocks, counts = [], [], [], []
    for k, (temps, req) in enumerate(zip(filled_templates, requests)):
        ranges = subject_ranges(tok, temps, req.subject)
        texts += [_through_subject(tok, t, req.subject, e) for t, (_, e) in zip(temps, ranges)]
        pos += [e - 1 for _, e in ranges]
        blocks.append((k, ranges))
        counts.append(len(temps))
    dev = models.device_of(model)
    batch = scoring.make_batch(tok, texts, device=dev)
    name = models.module_name(model, "down_proj", layer)
    names = [name]
    if block_layer is not None:
        bname = models.module_name(model, "block", block_layer)
        names = [name, bname] if block_layer >= layer else [bname, name]
    if noise is not None:
        noise.set_rows(blocks)
    if pe is not None:
        pe.set_segments(segments_from(counts))
    reuse, record = contextlib.nullcontext(), None
    if below is not None and below["layer"] > 0:
        if "stream" in below:
            reuse = hooks.resume_at(model, below["layer"], below["stream"])
        else:  # the output of the block below (a pass may stop inside block ℓ0, before its input is handed over)
            record = models.module_name(model, "block", below["layer"] - 1)
            names = [record, *names]
    with torch.no_grad(), reuse, \
            hooks.trace(model, names, retain_input=True, retain_output=True, stop=True) as tr:
        model(**batch.model_inputs())
    if record is not None:
        below["stream"] = tr.outputs[record]
    rows = torch.arange(len(texts), device=dev)
    p = torch.tensor(pos, device=dev)
    k_in, k_out = tr.inputs[name][rows, p].float(), tr.outputs[name][rows, p].float()
    h = tr.outputs[bname][rows, p].float() if block_layer is not None else None
    out, r = [], 0
    for n in counts:
        out.append((k_in[r : r + n], k_out[r : r + n], h[r : r + n] if h is not None else None))
        r += n
    return out


def _rome_keys(model, tok, requests, layer: int, templates: Sequence[str] | None, noise):
    """Key passes of their own: per fact W's (inputs, outputs) at the last subject token of each templated prompt,
    or with ``templates`` None of the bare prompt (k*, W k*)."""
    filled = [[fill(c, r.template) for c in templates] if templates is not None else [r.template] for r in requests]
    return _keys_many(model, tok, filled, requests, layer, noise)


def _rome_many(model, tok, requests, layer, hp: RomeHparams, stats: SecondMoments, templates: Sequence[str],
               noise, failed, exact: bool) -> list[Edit | None]:
    K = len(requests)
    uk: list = []  # exact mode: per fact (u, k̄), or (None, None) where its key pass failed
    if exact:  # one-fact key passes (two per fact; the optimisation's 20 passes are the batched part)
        for k, req in enumerate(requests):
            try:
                uk.append(rome.left_vector(model, tok, req, layer, hp, stats, templates, _OneFact(noise, k)))
            except EditError as err:
                failed[k] = err
                uk.append((None, None))
    # Fast mode on clean rows: the optimisation's graph-free first pass also yields the keys (W's inputs at the
    # last subject token of every templated prompt, row 0 the bare prompt) and W k*, so no key pass of their own.
    # Under input noise the key passes run where the one-fact path runs them (the templated keys before the
    # optimisation, k* after it), so that each fact's noise generator draws in the same order.
    from_first_pass = not exact and hooks.REUSE_BELOW and not _noised(noise, range(K))
    keys = None
    if not exact and not from_first_pass:
        keys = _rome_keys(model, tok, requests, layer, templates, noise)
    primed: dict = {}
    v_init, delta, infos = _optimize_deltas(
        model, tok, requests, templates, "mlp", layer, steps=hp.v_num_grad_steps, lr=hp.v_lr,
        weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
        break_before_last=[not r.erase for r in requests], noise=noise, failed=failed, exact=exact,
        keys=primed if from_first_pass else None, keys_of=models.module_name(model, "down_proj", layer))
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
    if from_first_pass and all(k in primed for k in range(K) if k not in failed):
        keys = [primed.get(k) for k in range(K)]  # (inputs, outputs) per templated prompt, or None (failed)
        bare = [None if kv is None else (kv[0][:1], kv[1][:1]) for kv in keys]
    else:  # noised rows, or a pass that could not be primed (no suffix pass; clean rows: any order)
        if keys is None:
            keys = _rome_keys(model, tok, requests, layer, templates, noise)
        bare = _rome_keys(model, tok, requests, layer, None, noise)
    live = [k for k in range(K) if k not in failed]
    left: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per live fact (u, k̄)
    if live:
        k_bar = torch.stack([keys[k][0].mean(0) for k in live]).double()  # (K', d_ff)
        u = (stats.inverse(layer).double() @ k_bar.T).T if hp.mom2_adjustment else k_bar
        u = (u / u.norm(dim=-1, keepdim=True)).float()
        for i, k in enumerate(live):
            if not torch.isfinite(u[i]).all():
                failed[k] = EditError(f"{requests[k].where()}: non-finite left vector u")
            left[k] = (u[i], k_bar[i])
    for k, req in enumerate(requests):
        if k in failed:
            out.append(None)
            continue
        u_k, kb = left[k]
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
    d_model, _ = models.dims(model)
    dev = models.device_of(model)
    zero = torch.zeros(d_model, device=dev)
    z = torch.stack([h_init[k] + delta[k] if k not in failed else zero for k in range(K)])
    h_init = torch.stack([h if h is not None else zero for h in h_init])
    full_groups = [[[fill(t, r.template) for t in g] for g in groups] for r in requests]
    full = [[t for g in fg for t in g] for fg in full_groups]
    edits = [Edit(method="memit", layers=list(layers), deltas={}, info=infos[k]) for k in range(K)]
    for k in range(K):
        infos[k].update(z=z[k], z_layer=z_layer, h_init=h_init[k], residual_norms=[])
    n = len(layers)
    pe = _PerExample(model, factors={})
    # clean rows: the stream entering the window's first layer is the same in every pass below (fresh input noise
    # is drawn in every pass, as the one-fact path draws it: then every pass runs from the embeddings)
    clean = not _noised(noise, range(K))
    below_keys = {"layer": layers[0]} if clean else None
    below_bare = {"layer": layers[0]} if clean else None
    for i, layer in enumerate(layers):
        # earlier layers' updates through per-row hooks (the one-fact path writes them into the weights)
        with _per_example(model, pe):
            keys = _keys_many(model, tok, full, requests, layer, noise, pe, below=below_keys)
            bare = _keys_many(model, tok, [[r.template] for r in requests], requests, z_layer, noise, pe,
                              block_layer=z_layer, below=below_bare)
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
            # next layer's passes see this layer's update as its rank-one factors, (x . a_k) r_k per row: the
            # one-fact path writes the float outer product into the weights, which differs by float rounding only
            # (exact mode spreads per fact, above). A dense (K, d_model, d_ff) stack cost a copy of it (28 MB for 8
            # facts of SmolLM2) and a batched product per pass, for no speed-up measurable on 2 cores (session 29).
            ok = torch.tensor([layer in edits[k].factors for k in range(K)], device=dev)[:, None]
            pe.factors[layer] = (torch.where(ok, resid.float(), 0.0), torch.where(ok, a.float(), 0.0))
            pe.layers = sorted(set(pe.factors))
            pe.names = {models.module_name(model, "down_proj", l): l for l in pe.layers}
    return [None if k in failed else edits[k] for k in range(K)]
