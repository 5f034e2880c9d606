"""Editing methods behind one interface (SCIENCE.md §6): ROME, MEMIT, FT-1 and FT-5.

    from helpers.editing import EditRequest, edit, applied, load_hparams, SecondMoments, context_templates
    stats = SecondMoments(model, tok, corpus, n_tokens=20_000, cache_dir=".cache")
    stats.precompute(layers)                       # before any noise hook
    templates = context_templates(model, tok, cache_dir=".cache")
    hp = load_hparams("world", "rome", "error_injection")
    e = edit(model, tok, EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
             "rome", central_layer=5, hparams=hp, stats=stats, templates=templates)
    with applied(model, e):                        # weights edited; restored bitwise on exit
        ...

An :class:`Edit` is data (per-layer deltas); see :mod:`.base`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, is_dataclass, replace

from torch import nn

from .. import models
from .base import (
    METHODS,
    PROBLEMS,
    Edit,
    EditError,
    EditRequest,
    NoisePositions,
    NoiseSpec,
    apply_edit,
    applied,
    edit_hooks,
    fill,
    hooked,
    input_noise,
    load_hparams,
    model_fingerprint,
    restore,
    subject_token_range,
    window,
)
from .finetune import FTHparams, ft_edit
from .memit import MemitHparams, memit_edit
from .rome import RomeHparams, rome_edit
from .stats import SecondMoments, compute_second_moments
from .templates import ContextTemplates, context_templates

log = logging.getLogger(__name__)

__all__ = [
    "METHODS", "PROBLEMS", "Edit", "EditError", "EditRequest", "NoiseSpec", "ContextTemplates", "SecondMoments",
    "RomeHparams", "MemitHparams", "FTHparams", "edit", "edit_layers", "apply_edit", "restore", "applied",
    "hooked", "edit_hooks", "window", "load_hparams", "hparams_for", "context_templates",
    "compute_second_moments", "subject_token_range", "fill", "model_fingerprint",
]

_HP = {"rome": RomeHparams, "memit": MemitHparams, "ft1": FTHparams, "ft5": FTHparams}
_WINDOW = {"ft1": 1, "ft5": 5}


def hparams_for(method: str, hparams: dict | object | None) -> RomeHparams | MemitHparams | FTHparams:
    """The method's hparams dataclass from a dict (unknown keys ignored), a dataclass, or None (defaults)."""
    if method not in _HP:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    cls = _HP[method]
    if hparams is None:
        hp = cls()
    elif isinstance(hparams, cls):
        hp = hparams
    else:
        hp = cls.from_dict(asdict(hparams) if is_dataclass(hparams) else dict(hparams))
    if method in ("ft1", "ft5") and hp.window != _WINDOW[method]:
        hp = replace(hp, window=_WINDOW[method])  # the method name fixes the window
    return hp


def edit_layers(model: nn.Module, method: str, central_layer: int, hparams: dict | object | None = None) -> list[int]:
    """The layers ``method`` edits at ``central_layer``: W(c, 1) for ROME/FT-1, W(c, 5) for MEMIT/FT-5."""
    hp = hparams_for(method, hparams)
    w = getattr(hp, "window", 1)  # ROME: 1
    return window(central_layer, w, models.n_layers(model))


def prepare(model: nn.Module, tok, method: str, central_layer: int, hparams, stats: SecondMoments | None,
            templates: ContextTemplates | None):
    """What every edit at ``central_layer`` needs before any noise hook: (hparams, edited layers, templates).
    ROME/MEMIT statistics are precomputed here, outside the hook."""
    hp = hparams_for(method, hparams)
    layers = edit_layers(model, method, central_layer, hp)
    if method in ("rome", "memit"):
        if stats is None:
            raise ValueError(f"{method} needs second-moment statistics (stats=SecondMoments(...))")
        stats.precompute(layers)
        if templates is None:
            templates = context_templates(model, tok)
    return hp, layers, templates


def edit(
    model: nn.Module,
    tok,
    request: EditRequest,
    method: str,
    central_layer: int,
    hparams: dict | object | None = None,
    stats: SecondMoments | None = None,
    templates: ContextTemplates | None = None,
) -> Edit:
    """Compute (not apply) the ``method`` edit for ``request`` at ``central_layer``.

    ROME and MEMIT need ``stats`` (precomputed for the edited layers) and ``templates`` (sampled and cached
    by :func:`context_templates` when None). Input noise (``request.noise``, Fact Forcing) is active during
    the whole computation. The model's weights are unchanged on return. Raises :class:`EditError` on a bad
    request or a non-finite result.
    """
    hp, layers, templates = prepare(model, tok, method, central_layer, hparams, stats, templates)
    t0 = time.perf_counter()
    code_range = subject_token_range(tok, request.template, request.subject)
    npos = NoisePositions(request.noise, code_range)
    with input_noise(model, request.noise, npos):
        if method == "rome":
            result = rome_edit(model, tok, request, central_layer, hp, stats, templates.rome, npos)
        elif method == "memit":
            result = memit_edit(model, tok, request, layers, hp, stats, templates.memit, npos)
        else:
            result = ft_edit(model, tok, request, layers, hp, npos, method=method)
    result.info["seconds"] = time.perf_counter() - t0
    result.info["central_layer"] = central_layer
    return result.check_finite(request.where())
