"""Text generation and the paper's correctness test (SCIENCE.md §1.3, §3).

Greedy or top-k sampled continuations with the key/value cache, in left-padded batches. The unembedding runs
at the last position only (``logits_to_keep=1``): with left padding that is every row's newest token. Sampling
draws from a CPU ``torch.Generator``, so the same seed gives the same text on every device.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

from .models import device_of
from .scoring import bos, cache_kwarg, cache_of, make_batch


def _strip_special(tok, ids: list[int]) -> list[int]:
    drop = {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, *bos(tok)}
    return [i for i in ids if i not in drop]


@torch.no_grad()
def generate(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int | None = None,
    max_out_len: int | None = None,
    top_k: int | None = None,
    seed: int | Sequence[int] = 0,
    batch_size: int = 32,
) -> list[str]:
    """Continue each prompt; returns the decoded **continuations** (prompt removed, eos dropped, stripped).

    Greedy when ``top_k`` is None, else top-k multinomial sampling from a ``torch.Generator`` seeded with
    ``seed`` (so the same seed gives the same text). ``seed`` may instead give one seed per prompt: consecutive
    prompts with the same seed form a group that draws from its own generator, as a call with only that group's
    prompts and that one seed would (groups are packed whole into batches of up to ``batch_size`` rows; the
    draws match that call's wherever the model's probabilities do, which batching changes only by float
    rounding). Length: ``max_new_tokens`` new tokens, or
    ``max_out_len`` tokens in total including the prompt (ROME's sampler convention; a prompt already that
    long gets no new token). Uses the key/value cache; hooks on the model see the full prompt on the first
    pass and single tokens afterwards. The top-k probabilities are moved to the CPU for the draw (B x k numbers a
    step), so every device samples the same tokens from the same probabilities.
    """
    if (max_new_tokens is None) == (max_out_len is None):
        raise ValueError("give exactly one of max_new_tokens, max_out_len")
    groups = _seed_groups([seed] * len(prompts) if isinstance(seed, numbers.Integral) else list(seed), len(prompts))
    dev = device_of(model)
    cache_kw = cache_kwarg(model)
    texts: list[str] = []
    for batch in _pack(groups, batch_size):
        i = batch[0][1]
        chunk = list(prompts[i : batch[-1][2]])
        draws = [(g, r0 - i, r1 - i) for g, r0, r1 in batch]
        b = make_batch(tok, chunk, None, padding_side="left", device=dev)
        lens = b.prompt_len
        steps = max_new_tokens if max_new_tokens is not None else max(0, max_out_len - min(lens))
        budget = [
            max_new_tokens if max_new_tokens is not None else max(0, max_out_len - n) for n in lens
        ]
        new = torch.zeros((len(chunk), 0), dtype=torch.long, device=dev)
        ids, mask, pos = b.input_ids, b.attention_mask, b.position_ids
        past = None
        for _ in range(steps):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **{cache_kw: past})
            past = cache_of(out)
            logits = out.logits[:, -1].float()
            if top_k is None:
                nxt = logits.argmax(-1)
            else:
                vals, idx = logits.topk(top_k, dim=-1)
                probs = torch.softmax(vals, -1).cpu()
                choice = torch.cat([torch.multinomial(probs[r0:r1], 1, generator=g)[:, 0] for g, r0, r1 in draws])
                nxt = idx.gather(1, choice[:, None].to(dev))[:, 0]
            new = torch.cat([new, nxt[:, None]], 1)
            ids = nxt[:, None]
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
        new = new.cpu()
        for r in range(len(chunk)):
            toks = _strip_special(tok, new[r, : budget[r]].tolist())
            texts.append(tok.decode(toks).strip())
    return texts


def _seed_groups(seeds: list[int], n: int) -> list[tuple[torch.Generator, int, int]]:
    """(generator, start, end) per run of consecutive equal seeds: rows [start, end) draw from that generator."""
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    out: list[tuple[torch.Generator, int, int]] = []
    for i, s in enumerate(seeds):
        if out and seeds[out[-1][1]] == s:
            out[-1] = (out[-1][0], out[-1][1], i + 1)
        else:
            out.append((torch.Generator().manual_seed(int(s)), i, i + 1))
    return out


def _pack(groups: list[tuple[torch.Generator, int, int]], batch_size: int) -> list[list[tuple]]:
    """Batches of whole consecutive groups of at most ``batch_size`` rows; a longer group is cut every
    ``batch_size`` rows from its start (its generator carries over), as a call with that group alone would be."""
    pieces = [(g, a, min(a + batch_size, b)) for g, s, b in groups for a in range(s, b, batch_size)]
    batches: list[list[tuple]] = []
    for p in pieces:
        if batches and p[2] - batches[-1][0][1] <= batch_size:
            batches[-1].append(p)
        else:
            batches.append([p])
    return batches


def is_correct(continuation: str, target_true: str) -> bool:
    """The paper's correctness test: lower(strip(o_true)) is a substring of lower(strip(continuation))."""
    return target_true.strip().lower() in continuation.strip().lower()
