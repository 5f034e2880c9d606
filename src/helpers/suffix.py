"""Recompute only each row's suffix: positions >= ``cut[i]``, attending to cached keys/values of the prefix.

ROME's v* and MEMIT's z optimisation add a vector δ at one position p_i of every row (the last subject
token) and run the same batch ~20 times. Positions before p_i cannot see δ (causal attention), so their
keys and values at every layer are the same at every step: record them once, then run only positions
>= p_i. With context templates of 5-10 tokens before the prompt, most of a row is prefix. Under Fact Forcing's
input noise, drawn afresh at every step on each row's subject tokens, the cut is the subject's first token
instead: the positions before it see neither noise nor δ.

    full = model(**batch.model_inputs(), use_cache=True)           # step 0: records every layer's K/V
    sp = SuffixPass(batch, cut=positions, cache=cache_of(full))
    logits = model(**sp.model_inputs()).logits                      # (B, S-1, V): columns = positions cut[i]..
    lps = scoring.target_token_logprobs(logits, sp.batch)           # unchanged call: sp.batch is shifted

Padding: rows are packed into a common past of P = max(cut) columns, row i's prefix in columns < cut[i]
(the rest masked), and its suffix in columns P.. with position ids cut[i], cut[i]+1, ... Works for any
model whose attention takes a transformers ``DynamicCache`` and explicit position ids (GPT-2, GPT-J,
GPT-NeoX, Llama). Results equal the full pass up to float rounding (different matmul shapes), not bitwise.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

import torch
from torch import nn

from .scoring import Batch, cache_kwarg


def _layers_kv(past) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(past, "layers"):  # transformers >= 4.56 Cache objects
        return [(lay.keys, lay.values) for lay in past.layers]
    return [(k, v) for k, v in past]  # legacy tuple of (k, v)


@dataclass
class SuffixPass:
    """The inputs of a suffix-only pass over ``batch`` (B rows, right- or left-padded) from ``cut`` (B,): tensors on
    the batch's device, ``cut`` too (``cuts``: the same as a list).

    ``cache`` is the key/value cache of a full pass over ``batch``; only copies of its first max(cut) columns
    are kept. ``batch`` (after construction) is the suffix view: ``input_ids`` (B, S) and ``start[i] =
    start_i - cut_i`` so that :func:`helpers.scoring.target_token_logprobs` reads the right columns, as long
    as every row's target starts after its cut (``cut[i] <= last prompt position``). The pass itself
    (:meth:`model_inputs`, ``cols``, ``valid``) runs S - 1 columns: each row without its last token, whose
    logits nothing reads (the longest suffixes here are 5-9 tokens: 11-20% of the pass).
    """

    full: Batch
    cut: torch.Tensor
    cache: InitVar[object]

    def __post_init__(self, cache: object) -> None:
        b, dev = self.full, self.full.device
        B, T = b.input_ids.shape
        # the bookkeeping in Python (one copy of the cut to the CPU), the index tensors on the batch's device
        cuts = torch.as_tensor(self.cut, dtype=torch.long).tolist()
        ends = [s + p + t for s, p, t in zip(b.start, b.prompt_len, b.target_len)]
        for i, (c, s, p) in enumerate(zip(cuts, b.start, b.prompt_len)):
            if not s <= c <= s + p - 1:
                raise ValueError(f"row {i}: cut {c} is outside its prompt [{s}, {s + p - 1}]")
        cut = torch.tensor(cuts, dtype=torch.long, device=dev)
        self.cut, self.cuts = cut, cuts
        self.P = max(cuts)
        # A row's last token is read (as the last target id) but never run: no logit after it is scored.
        S = max(e - c for e, c in zip(ends, cuts))
        cols = cut[:, None] + torch.arange(S, device=dev)[None]  # (B, S) original column of each suffix column
        end_t = torch.tensor(ends, device=dev)[:, None]
        valid = cols < end_t
        cols = cols.clamp(max=T - 1)
        ids = torch.where(valid, b.input_ids.gather(1, cols), torch.zeros_like(cols))
        pos = torch.where(valid, b.position_ids.gather(1, cols), torch.zeros_like(cols))
        S_run = S - 1
        self.cols = cols[:, :S_run]
        self.valid = (cols < end_t - 1)[:, :S_run]
        past_mask = (torch.arange(self.P, device=dev)[None] < cut[:, None]) & (b.attention_mask[:, : self.P] > 0)
        self.attention_mask = torch.cat([past_mask, self.valid], 1).long()
        self.input_ids, self.position_ids = ids[:, :S_run], pos[:, :S_run]
        # copies of the P prefix columns only (the full pass's cache and its graph can then be freed)
        self.kv = [(k[:, :, : self.P].detach().clone(), v[:, :, : self.P].detach().clone())
                   for k, v in _layers_kv(cache)]
        # the scoring view: every suffix token (the target ids are read from it), one column wider than the pass
        self.batch = Batch(ids, valid.long(), pos, list(b.prompt_len), list(b.target_len),
                           [s - c for s, c in zip(b.start, cuts)])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) per-position tensor of the full batch -> (B, S, ...) at the suffix columns."""
        idx = self.cols.reshape(*self.cols.shape, *([1] * (x.dim() - 2))).expand(*self.cols.shape, *x.shape[2:])
        return x.gather(1, idx)

    def model_inputs(self, model: nn.Module) -> dict:
        """Keyword arguments of the suffix pass, with a fresh cache holding the prefix keys/values."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(self.kv):
            cache.update(k, v, layer)
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "use_cache": True, cache_kwarg(model): cache}
