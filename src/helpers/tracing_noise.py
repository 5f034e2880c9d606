"""The tracing noise (SCIENCE.md §4.2): the layer windows, the published code's standard-normal draws and σ
(the paper's value for GPT-J / GPT2-XL, else 3 × the subject-embedding std)."""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .models import PAPER_NOISE, module
from .models import window as models_window
from .scoring import encode

log = logging.getLogger(__name__)

N_SAMPLES = 10
NOISE_SEED = 1


def window_layers(layer: int, window: int, n_layer: int) -> range:
    """W(l, w), clipped at the edges (see :func:`helpers.models.window`)."""
    return models_window(layer, window, n_layer)


def noise_draws(n_samples: int, n_subject_tokens: int, d_model: int, seed: int = NOISE_SEED) -> np.ndarray:
    """Unscaled standard-normal draws (n_samples, n_subject_tokens, d_model), float64, exactly as the published
    code draws them: a fresh ``np.random.RandomState(seed)`` (seed 1) and one ``randn`` call."""
    return np.random.RandomState(seed=seed).randn(n_samples, n_subject_tokens, d_model)


def model_name(model: nn.Module) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")


def paper_sigma(model: nn.Module) -> float | None:
    """The paper's σ for GPT-J (0.094) / GPT2-XL (0.1), matched by hub name or a folder named like it."""
    name = model_name(model).rstrip("/")
    for key, sigma in PAPER_NOISE.items():
        if name == key or name.split("/")[-1] == key.split("/")[-1]:
            return sigma
    return None


@torch.no_grad()
def subject_embedding_std(model: nn.Module, tok, subjects: Iterable[str]) -> float:
    """Standard deviation of all token-embedding entries of the (bare, un-prefixed) subject tokens, as ROME's
    ``collect_embedding_std`` computes it (one pooled std over every entry)."""
    emb = module(model, "embed")
    dev = emb.weight.device
    rows = [emb(torch.tensor([encode(tok, s, bos_token=False)], device=dev))[0]
            for s in dict.fromkeys(subjects) if s and encode(tok, s, bos_token=False)]
    if not rows:
        raise ValueError("no subject tokens to compute the embedding std from")
    return float(torch.cat(rows).double().std())


def noise_sigma(model: nn.Module, tok=None, subjects: Iterable[str] | None = None) -> float:
    """σ of the tracing noise: the paper's value for GPT-J / GPT2-XL, else 3 × :func:`subject_embedding_std`."""
    sigma = paper_sigma(model)
    if sigma is not None:
        return sigma
    if tok is None or subjects is None:
        raise ValueError(f"model {model_name(model)!r} has no paper σ: pass tok and subjects to compute 3 × std")
    sigma = 3.0 * subject_embedding_std(model, tok, subjects)
    log.info("noise σ = 3 × subject-embedding std = %.5f", sigma)
    return sigma
