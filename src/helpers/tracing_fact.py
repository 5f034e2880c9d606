"""Tracing one fact (SCIENCE.md §4.2, §4.5): its tokenization, the one-site-at-a-time reference path, the fast
path (:mod:`helpers.tracing_fast`) and representation zeroing, as arrays of p(target) per token and layer.
:mod:`helpers.tracing` turns them into the long table.

Devices: a fact's batch and its noise live on the model's device (the noise drawn by numpy, as the published
code draws it, and moved once per fact); probabilities come back to the CPU once per pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .hooks import trace
from .models import arch_of, device_of, module, module_name, n_layers
from .scoring import Batch, make_batch, target_logprob_from_logits
from .tracing_noise import noise_draws, window_layers
from .tracing_subject import fill_prompt, subject_range

KINDS = ("mlp", "attn", "hidden")  # restorable module kinds; "zero" marks representation-zeroing rows
_MODULE_KIND = {"mlp": "mlp", "attn": "attn", "hidden": "block"}


@dataclass
class Fact:
    """One prompt/subject/target with its tokenization: ``ids`` = prompt ‖ target ids, T = ``prompt_len``."""

    case_id: object
    prompt: str
    subject: str
    target: str
    batch: Batch  # a 1-row prompt‖target batch (scoring.make_batch), on the model's device
    prompt_len: int
    target_len: int
    b: int
    e: int
    tokens: list[str]  # decoded prompt tokens

    @property
    def ids(self) -> torch.Tensor:
        return self.batch.input_ids[0]


def prepare_fact(tok, prompt: str, subject: str, target: str, case_id=None, device=None) -> Fact:
    """Tokenize one fact (``prompt`` may be a template with ``{}``) and locate its subject tokens; the batch is
    moved to ``device`` (the model's) when given."""
    text = fill_prompt(prompt, subject)
    b, e = subject_range(tok, text, subject, case_id)
    batch = make_batch(tok, [text], [target])
    T = batch.prompt_len[0]
    ids = batch.input_ids[0, :T].tolist()
    return Fact(case_id, text, subject, target, batch.to(device), T, batch.target_len[0], b, e,
                [tok.decode([i]) for i in ids])


def _repeat(batch: Batch, n: int) -> Batch:
    return Batch(
        batch.input_ids.repeat(n, 1), batch.attention_mask.repeat(n, 1), batch.position_ids.repeat(n, 1),
        batch.prompt_len * n, batch.target_len * n, batch.start * n,
    )


def _noise_tensor(model: nn.Module, fact: Fact, sigma: float, n_samples: int, seed: int) -> torch.Tensor:
    """σ · draws, float64, (n_samples, e - b, d), on the model's device (numpy's draws, moved in one copy)."""
    d = module(model, "embed").weight.shape[1]
    return (sigma * torch.from_numpy(noise_draws(n_samples, fact.e - fact.b, d, seed))).to(device_of(model))


def _add_noise(x: torch.Tensor, noise: torch.Tensor, b: int, e: int, first_row: int) -> torch.Tensor:
    """Embedding output with noise added at [b, e) of rows first_row.. (the sum taken in float64, like the
    published code's in-place ``x[1:, b:e] += noise`` with a float64 right-hand side)."""
    x = x.clone()
    rows = slice(first_row, first_row + noise.shape[0])
    x[rows, b:e] = (x[rows, b:e].double() + noise).to(x.dtype)
    return x


def _probs(model: nn.Module, batch: Batch, edit=None, modules: Sequence[str] = ()) -> torch.Tensor:
    """(B,) p(target) of each row of ``batch`` with the optional hook ``edit`` on ``modules``, on the CPU."""
    batch = batch.to(device_of(model))  # a fact prepared without a device (no copy when it is there)
    with trace(model, list(modules), edit=edit, retain_output=False):
        logits = model(**batch.model_inputs()).logits
    return target_logprob_from_logits(logits, batch).exp().cpu()


# ---------- reference path: one site at a time, full forward of N + 1 rows with hooks -------------------------


@torch.no_grad()
def reference_run(
    model: nn.Module, fact: Fact, noise: torch.Tensor, restore: dict[str, Sequence[int]] | None = None
) -> tuple[float, float]:
    """One published-code forward pass: row 0 clean, rows 1..N noised at the subject; in rows 1..N the outputs
    of the modules named in ``restore`` are overwritten at the given positions with row 0's values.

    Returns (p of row 0, mean p of rows 1..N). ``restore`` maps a module name to token positions (any positions,
    so tests can restore many sites at once).
    """
    restore = restore or {}
    embed = module_name(model, "embed")
    n = noise.shape[0]
    dev = device_of(model)
    pos = {name: torch.as_tensor(list(p), dtype=torch.long, device=dev) for name, p in restore.items()}

    def edit(out: torch.Tensor, name: str):
        if name == embed:
            return _add_noise(out, noise.to(out.device), fact.b, fact.e, 1)
        new = out.clone()
        new[1:, pos[name]] = out[0, pos[name]]
        return new

    p = _probs(model, _repeat(fact.batch, n + 1), edit, [embed, *restore])
    return float(p[0]), float(p[1:].mean())


@torch.no_grad()
def clean_prob(model: nn.Module, fact: Fact) -> float:
    """p(target | prompt) from its own clean pass (§4.2 step 4)."""
    return float(_probs(model, fact.batch)[0])


def _site_list(fact: Fact, windows: Sequence[int], L: int,
               tokens: Sequence[int] | None = None) -> list[tuple[int, int, int, int, int]]:
    """(t, window, layer, l0, l1) for every traced site: t in [b, T) (or in ``tokens``), every layer and window."""
    return [
        (t, w, l, r.start, r.stop)
        for t in (range(fact.b, fact.prompt_len) if tokens is None else tokens)
        for w in windows
        for l in range(L)
        for r in [window_layers(l, w, L)]
    ]


@dataclass
class TraceArrays:
    """Result of tracing one fact with one kind: p_restored[window] is (T, L); rows t < b hold p_corrupt."""

    p_clean: float
    p_corrupt: float
    p_restored: dict[int, np.ndarray]


@torch.no_grad()
def reference_trace(
    model: nn.Module, fact: Fact, kind: str, windows: Sequence[int], noise: torch.Tensor, progress: bool = False,
    tokens: Sequence[int] | None = None,
) -> TraceArrays:
    """The ground truth: one forward pass of N + 1 rows per (t, layer, window) site, as in the published code."""
    L = n_layers(model)
    p_clean = clean_prob(model, fact)
    _, p_corrupt = reference_run(model, fact, noise)
    out = {w: np.full((fact.prompt_len, L), p_corrupt) for w in windows}
    sites = _site_list(fact, windows, L, tokens)
    if progress:
        from .progress import tqdm

        sites = tqdm(sites, desc=f"reference {kind}", leave=False)
    for t, w, l, l0, l1 in sites:
        restore = {module_name(model, _MODULE_KIND[kind], j): [t] for j in range(l0, l1)}
        out[w][t, l] = reference_run(model, fact, noise, restore)[1]
    return TraceArrays(p_clean, p_corrupt, out)


# ---------- fast path: every architecture (helpers.tracing_fast) ----------------------------------------------


def fast_path_supported(model: nn.Module) -> bool:
    """True for every architecture of :data:`helpers.models.ARCHITECTURES` (the fast path runs the model's own
    decoder layers; see :mod:`helpers.tracing_fast`)."""
    try:
        arch_of(model)
    except ValueError:
        return False
    return True


@torch.no_grad()
def fast_trace(
    model: nn.Module,
    fact: Fact,
    kind: str,
    windows: Sequence[int],
    noise: torch.Tensor,
    max_rows: int = 4096,
    progress: bool = False,
    tokens: Sequence[int] | None = None,
    span: int | None = None,
) -> TraceArrays:
    """Exact causal tracing that recomputes only what a restoration can change (:mod:`helpers.tracing_fast`):
    the corrupted pass once; per token t, its sites batched from their window start at positions >= t,
    attending to the cached keys/values of positions < t. ``max_rows`` bounds sites x N x suffix length per
    batch; ``span`` bounds how far apart the window starts of one batch may be (default L // 6)."""
    from . import tracing_fast

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    L = n_layers(model)
    sites = _site_list(fact, windows, L, tokens)
    c, result = tracing_fast.fast_p_restored(model, fact, kind, [(t, l0, l1) for t, _, _, l0, l1 in sites],
                                             noise, _add_noise, max_rows=max_rows, span=span, progress=progress)
    return TraceArrays(c.p_clean, c.p_corrupt, tracing_fast.as_arrays(c, result, sites, windows, fact.prompt_len, L))


# ---------- representation zeroing (§4.5) ---------------------------------------------------------------------


@torch.no_grad()
def zero_fact(model: nn.Module, fact: Fact, window: int = 5) -> tuple[float, np.ndarray]:
    """(p_clean, p_zeroed (L,)): clean pass with the MLP outputs at **all** subject positions set to zero over
    W(l, window), for each central layer l (the paper's App. B version). One pass of L rows, one per l."""
    L = n_layers(model)
    names = [module_name(model, "mlp", j) for j in range(L)]
    dev = device_of(model)
    rows_of = {names[j]: torch.tensor([l for l in range(L) if j in window_layers(l, window, L)], dtype=torch.long,
                                      device=dev) for j in range(L)}

    def edit(out: torch.Tensor, name: str):
        new = out.clone()
        new[rows_of[name], fact.b : fact.e] = 0
        return new

    p = _probs(model, _repeat(fact.batch, L), edit, names)
    return clean_prob(model, fact), p.numpy().astype(np.float64)
