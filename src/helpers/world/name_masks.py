"""Training-side pressures towards subject enrichment (:mod:`.train`): the token spans of name mentions, the
name mask (later text cannot attend to a name's non-last tokens) and the attention penalty on those tokens."""

from __future__ import annotations

import re

import numpy as np
import torch


def subject_spans(tok, docs: list[str], names: list[str]) -> list[list[tuple[int, int]]]:
    """Token spans [b, e) of every mention of a name in each document (fast-tokenizer offsets)."""
    pattern = re.compile(r"(?<![A-Za-z])(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
                         + r")(?![A-Za-z])")
    out = []
    for d in docs:
        offs = tok(d, return_offsets_mapping=True)["offset_mapping"]
        spans = []
        for m in pattern.finditer(d):
            toks = [i for i, (a, b) in enumerate(offs) if b > m.start() and a < m.end()]
            if len(toks) >= 2:
                spans.append((toks[0], toks[-1] + 1))
        out.append(spans)
    return out


def _name_keys(block_spans: list[list[tuple[int, int]]], seq_len: int, p: float = 1.0,
               rng: np.random.RandomState | None = None) -> torch.Tensor:
    """(batch, 1, T, T) bool: True where a query position after a name mention meets a key among the mention's
    tokens before its last one, for every mention (``rng`` None) or a share ``p`` of them."""
    m = torch.zeros(len(block_spans), 1, seq_len, seq_len, dtype=torch.bool)
    for k, spans in enumerate(block_spans):
        for b, e in spans:
            if rng is None or rng.rand() < p:
                m[k, 0, e:, b: e - 1] = True
    return m


def name_mask(block_spans: list[list[tuple[int, int]]], seq_len: int, p: float,
              rng: np.random.RandomState) -> torch.Tensor:
    """(batch, 1, T, T) causal mask in which, for a share ``p`` of subject mentions, the tokens after the
    mention cannot attend to the mention's tokens before its last one: what later text knows about the
    subject must come from the last subject token (a name-reading bottleneck, training only)."""
    causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
    return causal & ~_name_keys(block_spans, seq_len, p, rng)


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean (batch, 1, T, T) attention mask (True: may attend) as the additive float mask that eager
    attention expects (0 where allowed, the float minimum elsewhere). Eager attention *adds* a 4-D mask to
    the scores, so a boolean one would be added as 0/1 and leave the future visible; sdpa takes either."""
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


def name_key_mask(block_spans: list[list[tuple[int, int]]], seq_len: int) -> torch.Tensor:
    """(batch, 1, T, T) float: 1 where a query position after a name mention meets a key among the mention's
    tokens before its last one (what :func:`attention_penalty` discourages)."""
    return _name_keys(block_spans, seq_len).float()


def attention_penalty(attentions: tuple[torch.Tensor, ...], key_mask: torch.Tensor) -> torch.Tensor:
    """Mean attention mass, over layers, heads and the query positions concerned, that text after a name
    puts on the name's non-last tokens. attentions: per layer (B, H, T, T); key_mask from name_key_mask."""
    rows = key_mask.amax(-1)  # (B, 1, T): query positions with any penalised key
    n = rows.sum() * attentions[0].shape[1] * len(attentions)
    if n == 0:
        return torch.zeros(())
    return sum((a * key_mask).sum() for a in attentions) / n
