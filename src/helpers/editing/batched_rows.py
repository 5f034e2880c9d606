"""Row bookkeeping for batched passes (:mod:`.batched`): which rows of a batch belong to which fact, gather
indices of the target tokens, and sub-batches of chosen rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import scoring

Segments = list[tuple[int, int, int]]  # (edit index k, first row, one past the last row), in row order


def segments_from(rows_per_edit: Sequence[int] | torch.Tensor) -> Segments:
    """Contiguous (k, start, end) runs from counts per edit (blocks in edit order) or a (B,) row->edit index
    tensor (-1 = no edit)."""
    if isinstance(rows_per_edit, torch.Tensor):
        idx = rows_per_edit.tolist()
        segs: Segments = []
        start = 0
        for i in range(1, len(idx) + 1):
            if i == len(idx) or idx[i] != idx[start]:
                if idx[start] >= 0:
                    segs.append((int(idx[start]), start, i))
                start = i
        return segs
    segs, r = [], 0
    for k, n in enumerate(rows_per_edit):
        if n:
            segs.append((k, r, r + int(n)))
        r += int(n)
    return segs


def _row_index(segs: Segments, n_rows: int, device: torch.device | None = None) -> torch.Tensor:
    """(n_rows,) row -> edit index (-1: no edit), built on the CPU and moved to ``device`` in one copy."""
    idx = torch.full((n_rows,), -1, dtype=torch.long)
    for k, s, e in segs:
        idx[s:e] = k
    return idx.to(device) if device is not None else idx


@dataclass
class _Targets:
    """Gather indices of the target tokens of a prompt‖target batch: log p per target token, vectorised. Built on
    the CPU, moved to the batch's device in one copy per tensor."""

    rows: torch.Tensor  # (B, t) row index
    cols: torch.Tensor  # (B, t) logit column scoring each target token
    ids: torch.Tensor  # (B, t) target token ids
    mask: torch.Tensor  # (B, t) float 1 for real target tokens
    lens: torch.Tensor  # (B,) number of target tokens

    @classmethod
    def of(cls, batch: scoring.Batch) -> "_Targets":
        B, t = len(batch.target_len), max(batch.target_len)
        cols = torch.zeros((B, t), dtype=torch.long)
        mask = torch.zeros((B, t))
        for i in range(B):
            c0 = batch.start[i] + batch.prompt_len[i] - 1
            n = batch.target_len[i]
            cols[i, :n] = torch.arange(c0, c0 + n)
            cols[i, n:] = c0
            mask[i, :n] = 1
        dev = batch.device
        rows = torch.arange(B, device=dev)[:, None].expand(B, t)
        cols, mask = cols.to(dev), mask.to(dev)
        ids = batch.input_ids[rows, cols + 1]
        return cls(rows, cols, ids, mask, torch.tensor(batch.target_len, dtype=torch.float32, device=dev))

    def token_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, t) log p of each target token (0 beyond a row's target)."""
        lg = logits[self.rows, self.cols]
        lp = scoring.log_probs(lg)
        return lp.gather(-1, self.ids[..., None])[..., 0] * self.mask

    def sums(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) summed log p(target | prompt)."""
        return self.token_logprobs(logits).sum(-1)

    def sums_selected(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) summed log p(target | prompt) from logits (B, t, V) taken at (rows, cols) only."""
        lp = scoring.log_probs(logits)
        return (lp.gather(-1, self.ids[..., None])[..., 0] * self.mask).sum(-1)


def _sub_batch(batch: scoring.Batch, rows: Sequence[int]) -> scoring.Batch:
    r = torch.as_tensor(list(rows), dtype=torch.long, device=batch.device)
    return scoring.Batch(batch.input_ids[r], batch.attention_mask[r], batch.position_ids[r],
                         [batch.prompt_len[i] for i in rows], [batch.target_len[i] for i in rows],
                         [batch.start[i] for i in rows])
