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

The work is split by job: :mod:`.batched_rows` (row bookkeeping), :mod:`.batched_input_noise` (per-fact input
noise), :mod:`.per_example` (per-example edits), :mod:`.batched_deltas`, :mod:`.batched_rome_memit` and
:mod:`.batched_ft` (the methods), :mod:`.batched_eval` (:func:`measure_many`); this module holds
:func:`edit_many` and re-exports the public names.
"""

from __future__ import annotations

import time
from typing import Sequence

from torch import nn

from .base import Edit, EditError, EditRequest, subject_ranges, subject_token_range  # noqa: F401 (re-export)
from .batched_eval import measure_many
from .batched_ft import _ft_many
from .batched_input_noise import batched_noise
from .batched_rome_memit import _memit_many, _rome_many
from .batched_rows import Segments, segments_from  # noqa: F401 (re-export)
from .finetune import LOSS_FLOOR  # read at call time by edit_many: tests patch ``batched.LOSS_FLOOR``
from .per_example import applied_per_example
from .stats import SecondMoments
from .templates import ContextTemplates

__all__ = [
    "edit_many", "batch_order", "applied_per_example", "measure_many", "batched_noise", "Segments",
]


def batch_order(tok, requests: Sequence[EditRequest], method: str) -> list[int]:
    """Indices of ``requests`` in the order to cut them into chunks for :func:`edit_many`: by the positions one
    of their rows needs in each optimisation pass (ROME/MEMIT: from the last subject token, or the first under
    subject noise, to the end of the target; FT: the whole row), ties by index. A chunk's passes are padded to
    its longest row: on 400 known facts of SmolLM2, chunks of 8 in the file's order pad ROME's passes to 1.36x
    the positions needed, in this order 1.01x."""
    from .base import fill
    from .batched_deltas import _pass_length, cut_kind

    def key(k: int) -> int:
        req = requests[k]
        (b, e), = subject_ranges(tok, [req.template], req.subject)
        facts = ([fill(req.template, req.subject)], [req.target], [e - 1], [(b, e)])
        return _pass_length(tok, facts, "none" if method.startswith("ft") else cut_kind(req.noise))

    keys = [key(k) for k in range(len(requests))]
    return sorted(range(len(requests)), key=lambda k: (keys[k], k))


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
            res = _ft_many(model, tok, requests, layers, hp, noise, failed, method, exact, loss_floor=LOSS_FLOOR)
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
