"""Per-fact input noise (Fact Forcing) for batched passes (:mod:`.batched`): each fact's rows get exactly the
draws ``base.input_noise`` would give them in a pass of their own."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .. import hooks, models
from .base import NoiseSpec


class _NoiseRows:
    """Per fact: its spec, its CPU generator (draws moved to the activations' device: the same noise on every
    device), and (per pass) the token ranges of its rows."""

    def __init__(self, specs: Sequence[NoiseSpec | None], code_ranges: Sequence[tuple[int, int]] | None = None):
        self.specs = list(specs)
        self.code = list(code_ranges) if code_ranges is not None else [(0, 0)] * len(self.specs)
        self.gens = [torch.Generator().manual_seed(s.seed) if s is not None and s.sigma != 0 else None
                     for s in self.specs]
        self.blocks: list[tuple[int, list[tuple[int, int]]]] = []

    def set_rows(self, blocks: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> None:
        """``blocks`` = [(fact k, subject range of each of its rows)] in row order (contiguous rows)."""
        self.blocks = [(k, list(r)) for k, r in blocks]

    def hook(self, out: torch.Tensor, _name: str) -> torch.Tensor | None:
        if out.shape[1] <= 1 or not any(self.gens[k] is not None for k, _ in self.blocks):
            return None
        if sum(len(r) for _, r in self.blocks) != out.shape[0]:
            raise RuntimeError(f"noise rows set for {sum(len(r) for _, r in self.blocks)} rows, pass has {out.shape[0]}")
        new = out.clone()
        row = 0
        for k, ranges in self.blocks:
            gen, spec = self.gens[k], self.specs[k]
            if gen is not None:
                if spec.positions == "code":
                    ranges = [self.code[k]] * len(ranges)
                # exactly base.input_noise's draws for this fact's rows
                lens = {e - b for b, e in ranges}
                if len(lens) == 1:
                    n = lens.pop()
                    noise = (torch.randn((len(ranges), n, out.shape[2]), generator=gen) * spec.sigma).to(out.device)
                    for i, (b, e) in enumerate(ranges):
                        new[row + i, b:e] = new[row + i, b:e] + noise[i].to(out.dtype)
                else:
                    for i, (b, e) in enumerate(ranges):
                        noise = (torch.randn((e - b, out.shape[2]), generator=gen) * spec.sigma).to(out.device)
                        new[row + i, b:e] = new[row + i, b:e] + noise.to(out.dtype)
            row += len(ranges)
        return new


def _noised(noise: "_NoiseRows | None", ks: Sequence[int]) -> bool:
    """True if any of the facts ``ks`` has input noise, drawn afresh on every pass (so nothing can be reused)."""
    return noise is not None and any(noise.gens[k] is not None for k in ks)


@contextlib.contextmanager
def batched_noise(
    model: nn.Module,
    specs: Sequence[NoiseSpec | None],
    code_ranges: Sequence[tuple[int, int]] | None = None,
) -> Iterator[_NoiseRows]:
    """Per-fact input noise for batched passes: fact k's rows get the noise ``base.input_noise`` would give
    them in a pass of their own (same generator, seeded per fact, same draw shapes and order). Set the rows
    of every pass with ``.set_rows([(k, ranges_of_its_rows), ...])``. A no-op when no spec has noise."""
    nr = _NoiseRows(specs, code_ranges)
    if all(g is None for g in nr.gens):
        yield nr
        return
    with hooks.trace(model, models.module_name(model, "embed"), edit=nr.hook, retain_output=False):
        yield nr


class _OneFact:
    """The ``NoisePositions``-like view of one fact of a :class:`_NoiseRows`, for the one-fact helpers."""

    def __init__(self, noise: _NoiseRows | None, k: int):
        self.noise, self.k = noise, k

    def set_rows(self, rows: Sequence[tuple[int, int]]) -> None:
        if self.noise is not None:
            self.noise.set_rows([(self.k, rows)])
