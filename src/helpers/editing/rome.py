"""ROME: a rank-one update of one layer's down-projection (SCIENCE.md §6.1).

1. k̄ = mean over the 21 context-templated prompts of the down-projection input at the last subject token;
   u = C^-1 k̄ / ||C^-1 k̄|| (C = uncentered second moment, :mod:`.stats`).
2. v* = v_init + δ, δ optimised by Adam (``v_lr``) on NLL (or exp(-NLL) for erasure) + KL + weight decay,
   δ added to the MLP output at the last subject token of every prompt; δ projected onto the L2 ball of
   radius ``clamp_norm_factor`` * ||v_init|| after each step. ``v_num_grad_steps`` iterations give
   steps - 1 updates (the loop exits before the last step), except for erasure, which does all of them.
3. With k*, m the down-projection's input and output at the last subject token of the bare prompt,
   r = (v* - m) / (k*^T u) and ΔW = r u^T (d_model, d_ff), so ΔW k* = v* - m.

:func:`optimize_delta` (step 2) is shared with MEMIT, which optimises at a block output instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import hooks, models, scoring
from .base import Edit, EditError, EditRequest, NoisePositions, fill, subject_ranges
from .stats import SecondMoments

log = logging.getLogger(__name__)

KL_TEMPLATE = "{} is a"


@dataclass
class RomeHparams:
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "RomeHparams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _check(t: torch.Tensor, what: str, request: EditRequest) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise EditError(f"{request.where()}: non-finite {what}")
    return t


def keys_at(
    model: nn.Module,
    tok,
    templates: Sequence[str],
    subject: str,
    layer: int,
    noise_pos: NoisePositions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Down-projection (input, output) at the last subject token of each filled template: (n, d_ff), (n, d_model)."""
    ranges = subject_ranges(tok, templates, subject)
    dev = models.device_of(model)
    pos = torch.tensor([e - 1 for _, e in ranges], device=dev)
    batch = scoring.make_batch(tok, [fill(t, subject) for t in templates], device=dev)
    name = models.module_name(model, "down_proj", layer)
    if noise_pos is not None:
        noise_pos.set_rows(ranges)
    with torch.no_grad(), hooks.trace(model, name, retain_input=True, retain_output=True) as tr:
        model(**batch.model_inputs())
    rows = torch.arange(len(templates), device=dev)
    return tr.inputs[name][rows, pos].float(), tr.outputs[name][rows, pos].float()


def optimize_delta(
    model: nn.Module,
    tok,
    request: EditRequest,
    context_templates: Sequence[str],
    kind: str,
    layer: int,
    steps: int,
    lr: float,
    weight_decay: float,
    clamp_norm_factor: float,
    kl_factor: float,
    break_before_last: bool,
    noise_pos: NoisePositions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Optimise δ (d_model,) added to ``module(kind, layer)``'s output at the last subject token.

    Rows: each context template filled with the request prompt + target (teacher forced), then the KL
    prompt "{s} is a". The first context template must be the bare "{}": v_init is read from its row.
    Returns (v_init, δ, info) with info = per-iteration losses and the bare-prompt target probability.
    """
    if context_templates[0] != "{}":
        raise ValueError("the first context template must be the bare '{}'")
    full = [fill(c, request.template) for c in context_templates] + [KL_TEMPLATE]
    n = len(context_templates)
    ranges = subject_ranges(tok, full, request.subject)
    pos = [e - 1 for _, e in ranges]
    texts = [fill(t, request.subject) for t in full]
    dev = models.device_of(model)
    batch = scoring.make_batch(tok, texts, [request.target] * len(texts), device=dev)
    name = models.module_name(model, kind, layer)
    d_model, _ = models.dims(model)

    delta = torch.zeros(d_model, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    v_init: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None
    info: dict = {"nll": [], "kl": [], "decay": [], "loss": [], "p_target": [], "updates": 0}
    # the stream entering the block: step 0 computes it, later steps reuse it -- unless input noise is active,
    # which is drawn afresh on every pass (Fact Forcing), so the stream changes from step to step
    reuse = noise_pos is None or noise_pos.spec is None or noise_pos.spec.sigma == 0
    below: torch.Tensor | None = None
    for it in range(steps):
        opt.zero_grad()
        if noise_pos is not None:
            noise_pos.set_rows(ranges)
        with hooks.trace(model, name, edit=hooks.add_at_positions(delta, pos), retain_output=it == 0) as tr, \
                hooks.reuse_below(model, layer, below, record=reuse) as rb, \
                scoring.scored_logits(model, batch, extra=[(n, pos[n])]) as sc:
            sc.set(model(**batch.model_inputs()).logits)
        if it == 0:
            v_init = tr.outputs[name][0, pos[0]].detach().float().clone()
            below = rb.stream
        lps = sc.target_token_logprobs()[:n]
        nll = torch.stack([-lp.mean() for lp in lps]).mean()
        kl_logp = sc.extra_logprobs()[0][None]
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        kl = kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        decay = weight_decay * (delta.norm() / v_init.norm() ** 2)
        main = torch.exp(-nll) if request.erase else nll
        loss = main + kl + decay
        _check(loss.detach(), f"loss at iteration {it}", request)
        info["nll"].append(float(nll.detach()))
        info["kl"].append(float(kl.detach()))
        info["decay"].append(float(decay.detach()))
        info["loss"].append(float(loss.detach()))
        info["p_target"].append(float(lps[0].detach().sum().exp()))
        if break_before_last and it == steps - 1:
            break
        loss.backward()
        opt.step()
        info["updates"] += 1
        with torch.no_grad():
            max_norm = clamp_norm_factor * v_init.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    assert v_init is not None
    return v_init, _check(delta.detach().clone(), "delta", request), info


def left_vector(
    model: nn.Module,
    tok,
    request: EditRequest,
    layer: int,
    hp: RomeHparams,
    stats: SecondMoments,
    context_templates: Sequence[str],
    noise_pos: NoisePositions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u (d_ff,) unit, k̄ (d_ff,) float64): step 1 of the module docstring."""
    full = [fill(c, request.template) for c in context_templates]
    k, _ = keys_at(model, tok, full, request.subject, layer, noise_pos)
    k_bar = k.mean(0).double()
    u = stats.inverse(layer).double() @ k_bar if hp.mom2_adjustment else k_bar
    u = _check((u / u.norm()).float(), "left vector u", request)
    return u, k_bar


def right_vector(
    model: nn.Module,
    tok,
    request: EditRequest,
    layer: int,
    u: torch.Tensor,
    v_star: torch.Tensor,
    noise_pos: NoisePositions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r (d_model,), k*, m): step 3 of the module docstring."""
    k_star, m = keys_at(model, tok, [request.template], request.subject, layer, noise_pos)
    k_star, m = k_star[0], m[0]
    denom = float(k_star.double() @ u.double())
    if abs(denom) < 1e-12:
        raise EditError(f"{request.where()}: k*^T u = {denom:g}, cannot form the right vector")
    r = _check(((v_star - m).double() / denom).float(), "right vector r", request)
    return r, k_star, m


def rome_edit(
    model: nn.Module,
    tok,
    request: EditRequest,
    layer: int,
    hp: RomeHparams,
    stats: SecondMoments,
    context_templates: Sequence[str],
    noise_pos: NoisePositions | None = None,
) -> Edit:
    """The ROME edit of ``layer`` for ``request`` (see the module docstring)."""
    u, k_bar = left_vector(model, tok, request, layer, hp, stats, context_templates, noise_pos)
    v_init, delta, info = optimize_delta(
        model, tok, request, context_templates, "mlp", layer,
        steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay,
        clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
        break_before_last=not request.erase, noise_pos=noise_pos,
    )
    return rome_result(model, tok, request, layer, u, k_bar, v_init, delta, info, noise_pos)


def rome_result(model, tok, request: EditRequest, layer: int, u: torch.Tensor, k_bar: torch.Tensor,
                v_init: torch.Tensor, delta: torch.Tensor, info: dict,
                noise_pos: NoisePositions | None = None) -> Edit:
    """The :class:`Edit` from u and the optimised δ (step 3; shared with the batched path)."""
    v_star = v_init + delta
    r, k_star, m = right_vector(model, tok, request, layer, u, v_star, noise_pos)
    info.update(k_star=k_star, v_star=v_star, m=m, v_init=v_init, k_bar=k_bar.float())
    dw = torch.outer(r, u)
    return Edit(method="rome", layers=[layer], deltas={layer: dw}, factors={layer: (r, u)}, info=info)
