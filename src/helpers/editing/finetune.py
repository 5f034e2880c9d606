"""Constrained fine-tuning FT-1 / FT-5 of the down-projections in W(c, w) (SCIENCE.md §6.3).

Weight **and bias** of each down-projection in the window are trained with Adam (lr 5e-4, no weight decay)
on the single rewrite prompt (no templates, no KL):

- loss = -Σ_rows log p(target | prompt) (full sequence), one row, or ``noise.n_samples`` rows each with
  independent subject noise drawn afresh every step (Fact Forcing);
- erasure (direction "lower"): loss = p(target | prompt);
- a step is taken only if loss >= 1e-2; except for erasure, training stops once the loss was < 1e-2 in
  5 consecutive steps; ``num_steps`` steps at most (25; 50 for Fact Forcing);
- after every step each trained tensor is clamped element-wise to [W0 - ε, W0 + ε].

The trained parameters are the *deltas* themselves (W = W0 + Δ applied through :func:`.base.hooked`), which
is the same optimisation as training W in place (same gradients, same Adam state, clamp Δ to [-ε, ε]) and
leaves the model untouched. ``info["max_abs_delta"]`` records max |W - W0| after every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import nn

from .. import hooks, models, scoring
from .base import Edit, EditError, EditRequest, NoisePositions, hooked, subject_ranges

log = logging.getLogger(__name__)

LOSS_FLOOR = 1e-2
PATIENCE = 5


@dataclass
class FTHparams:
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: float = 5e-5
    window: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "FTHparams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def ft_edit(
    model: nn.Module,
    tok,
    request: EditRequest,
    layers: Sequence[int],
    hp: FTHparams,
    noise_pos: NoisePositions | None = None,
    method: str = "ft",
) -> Edit:
    """Fine-tune the down-projections of ``layers`` for ``request`` (see the module docstring)."""
    layers = sorted(layers)
    n_rows = request.noise.n_samples if request.noise is not None else 1
    dev = models.device_of(model)
    batch = scoring.make_batch(tok, [request.text] * n_rows, [request.target] * n_rows, device=dev)
    ranges = subject_ranges(tok, [request.template], request.subject) * n_rows
    eps = float(hp.norm_constraint)
    d_model, d_ff = models.dims(model)
    dw = {l: torch.zeros(d_model, d_ff, device=dev, requires_grad=True) for l in layers}
    db = {}
    for l in layers:
        if getattr(models.module(model, "down_proj", l), "bias", None) is not None:
            db[l] = torch.zeros(d_model, device=dev, requires_grad=True)
    params = list(dw.values()) + list(db.values())
    opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    info: dict = {"loss": [], "max_abs_delta": [], "updates": 0}
    below = 0
    first_in: torch.Tensor | None = None
    reuse = request.noise is None or request.noise.sigma == 0
    with hooked(model, dw, db):
        for step in range(hp.num_steps):
            if noise_pos is not None:
                noise_pos.set_rows(ranges)
            # the stream entering the first tuned block cannot change: step 0 computes it, later steps reuse it
            # (unless input noise is active: Fact Forcing draws fresh noise on every pass)
            with hooks.reuse_below(model, layers[0], first_in, record=reuse) as rb, \
                    scoring.scored_logits(model, batch) as sc:
                sc.set(model(**batch.model_inputs()).logits)
            if step == 0:
                first_in = rb.stream
            logp = torch.stack([lp.sum() for lp in sc.target_token_logprobs()])
            loss = logp.exp().sum() if request.erase else -logp.sum()
            if not torch.isfinite(loss):
                raise EditError(f"{request.where()}: non-finite fine-tuning loss at step {step}")
            info["loss"].append(float(loss.detach()))
            if float(loss.detach()) >= LOSS_FLOOR:
                opt.zero_grad()
                loss.backward()
                opt.step()
                info["updates"] += 1
                with torch.no_grad():
                    for p in params:
                        p.clamp_(-eps, eps)
            info["max_abs_delta"].append(max(float(p.detach().abs().max()) for p in params))
            if not request.erase:
                below = below + 1 if info["loss"][-1] < LOSS_FLOOR else 0
                if below >= PATIENCE:
                    break
    edit = Edit(
        method=method,
        layers=list(layers),
        deltas={l: t.detach().clone() for l, t in dw.items()},
        bias_deltas={l: t.detach().clone() for l, t in db.items()},
        info=info,
    )
    return edit
