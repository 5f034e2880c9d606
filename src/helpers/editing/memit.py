"""MEMIT on one request: spread a residual-stream target over the window W(c, 5) (SCIENCE.md §6.2).

1. z = h_init + δ at the output of block z_layer (= the window's **last** layer), last subject token; δ from
   :func:`.rome.optimize_delta` with MEMIT's templates ("{}" + 5 sampled) and ``clamp_norm_factor`` 0.75;
   ``v_num_grad_steps`` iterations give steps - 1 updates (for erasure too, as in the code).
2. For layer i = 0..n-1 of the window (ascending), with the earlier layers' updates already in the weights:
   k_i = down-projection input at the last subject token, averaged within each template group then across
   the two groups; h_cur = block z_layer output at the last subject token of the bare prompt;
   R = (z - h_cur) / (n - i); A = (λ C_i + k_i k_i^T)^-1 k_i (float64 solve); ΔW_i = R A^T.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import nn

from .. import hooks, models, scoring
from .base import Edit, EditRequest, NoisePositions, applied, fill, subject_ranges
from .rome import _check, keys_at, optimize_delta
from .stats import SecondMoments

log = logging.getLogger(__name__)


@dataclass
class MemitHparams:
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_update_weight: float = 15000.0
    window: int = 5

    @classmethod
    def from_dict(cls, d: dict) -> "MemitHparams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _block_out(model: nn.Module, tok, request: EditRequest, layer: int, noise_pos: NoisePositions | None) -> torch.Tensor:
    """Block ``layer`` output (d_model,) at the last subject token of the bare prompt."""
    rng = subject_ranges(tok, [request.template], request.subject)
    batch = scoring.make_batch(tok, [request.text], device=models.device_of(model))
    name = models.module_name(model, "block", layer)
    if noise_pos is not None:
        noise_pos.set_rows(rng)
    with torch.no_grad(), hooks.trace(model, name, stop=True) as tr:
        model(**batch.model_inputs())
    return tr.outputs[name][0, rng[0][1] - 1].float()


def memit_edit(
    model: nn.Module,
    tok,
    request: EditRequest,
    layers: Sequence[int],
    hp: MemitHparams,
    stats: SecondMoments,
    template_groups: Sequence[Sequence[str]],
    noise_pos: NoisePositions | None = None,
) -> Edit:
    """The MEMIT edit of ``layers`` (ascending, the window) for ``request``."""
    layers = sorted(layers)
    z_layer = layers[-1]
    flat = [t for g in template_groups for t in g]
    h_init, delta, info = optimize_delta(
        model, tok, request, flat, "block", z_layer,
        steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay,
        clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
        break_before_last=True, noise_pos=noise_pos,
    )
    return spread(model, tok, request, layers, hp, stats, template_groups, h_init, delta, info, noise_pos)


def spread(
    model: nn.Module,
    tok,
    request: EditRequest,
    layers: Sequence[int],
    hp: MemitHparams,
    stats: SecondMoments,
    template_groups: Sequence[Sequence[str]],
    h_init: torch.Tensor,
    delta: torch.Tensor,
    info: dict,
    noise_pos: NoisePositions | None = None,
) -> Edit:
    """Step 2 of the module docstring: spread z - h over ``layers`` (shared with the batched path)."""
    layers = sorted(layers)
    z_layer = layers[-1]
    z = h_init + delta
    full_groups = [[fill(t, request.template) for t in g] for g in template_groups]
    full = [t for g in full_groups for t in g]
    edit = Edit(method="memit", layers=list(layers), deltas={}, info=info)
    info.update(z=z, z_layer=z_layer, h_init=h_init, residual_norms=[])
    n = len(layers)
    for i, layer in enumerate(layers):
        with applied(model, edit):  # earlier layers' updates in the weights; restored bitwise after
            k_all, _ = keys_at(model, tok, full, request.subject, layer, noise_pos)
            h_cur = _block_out(model, tok, request, z_layer, noise_pos)
        groups, j = [], 0
        for g in full_groups:
            groups.append(k_all[j : j + len(g)].double().mean(0))
            j += len(g)
        k = torch.stack(groups).mean(0)  # (d_ff,)
        resid = (z - h_cur).double() / (n - i)
        C = stats.moment(layer).double()
        a = torch.linalg.solve(hp.mom2_update_weight * C + torch.outer(k, k), k)
        r = _check(resid.float(), f"residual at layer {layer}", request)
        a = _check(a.float(), f"solve at layer {layer}", request)
        edit.deltas[layer] = torch.outer(resid, a.double()).float()
        edit.factors[layer] = (r, a)
        info["residual_norms"].append(float(resid.norm() * (n - i)))
    return edit
