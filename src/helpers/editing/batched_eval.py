"""Batched post-edit evaluation (:func:`measure_many`): ``evaluation.measure`` of K edited models in a few
passes, each fact's edit applied to its own rows."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .. import metrics, models, scoring
from .base import Edit, NoiseSpec
from .batched_input_noise import batched_noise
from .batched_rows import _Targets
from .per_example import applied_per_example


def _chunks(sizes: Sequence[int], max_rows: int) -> list[list[int]]:
    """Greedy groups of consecutive items whose sizes sum to <= max_rows (at least one item per group)."""
    groups, cur, n = [], [], 0
    for i, s in enumerate(sizes):
        if cur and n + s > max_rows:
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += s
    if cur:
        groups.append(cur)
    return groups


def _probs_many(model, tok, prompts: Sequence[Sequence[str]], targets: Sequence[Sequence[str]],
                subjects: Sequence[str], sigmas: Sequence[float | None], edits: Sequence[Edit | None] | None,
                max_rows: int) -> list[list[float]]:
    """Per fact k, p(targets[k][i] | prompts[k][i]) as :func:`helpers.evaluation.probs` computes it (one pass
    per fact, fresh seed-1 noise per fact), with fact k's edit applied to its rows."""
    from ..evaluation import EVAL_NOISE_SEED, _ranges

    out: list[list[float]] = [[] for _ in prompts]
    for group in _chunks([len(p) for p in prompts], max_rows):
        texts = [p for k in group for p in prompts[k]]
        tgts = [t for k in group for t in targets[k]]
        if not texts:
            continue
        specs = [NoiseSpec(sigma=sigmas[k], n_samples=1, seed=EVAL_NOISE_SEED, positions="subject")
                 if sigmas[k] is not None else None for k in group]
        counts = [len(prompts[k]) for k in group]
        batch = scoring.make_batch(tok, texts, tgts, device=models.device_of(model))
        sub_edits = [edits[k] for k in group] if edits is not None else [None] * len(group)
        with torch.no_grad(), batched_noise(model, specs) as noise, \
                applied_per_example(model, sub_edits, counts):
            noise.set_rows([(j, _ranges(tok, prompts[k], subjects[k])) for j, k in enumerate(group)])
            tg = _Targets.of(batch)
            if scoring.SELECT_LOGITS:  # the unembedding only at the target positions
                with scoring.unembed_at(model, tg.rows, tg.cols):
                    lg = model(**batch.model_inputs()).logits[0].reshape(*tg.cols.shape, -1)
                logp = tg.sums_selected(lg)
            else:
                logp = tg.sums(model(**batch.model_inputs()).logits)
        p = logp.exp().tolist()
        r = 0
        for k, n in zip(group, counts):
            out[k] = p[r : r + n]
            r += n
    return out


def _essence_many(model, tok, texts: Sequence[Sequence[str]], subjects: Sequence[str],
                  sigmas: Sequence[float | None], edits: Sequence[Edit | None] | None, max_rows: int,
                  max_tokens: int = 100) -> list[float]:
    """Per fact, :func:`helpers.evaluation.essence_ppl` of its texts, with its edit applied to its rows."""
    from ..evaluation import EVAL_NOISE_SEED, _ranges

    out = [float("nan")] * len(texts)
    for group in _chunks([len(t) for t in texts], max_rows):
        group = [k for k in group if texts[k]]
        if not group:
            continue
        ids = [scoring.encode(tok, t)[:max_tokens] for k in group for t in texts[k]]
        counts = [len(texts[k]) for k in group]
        x, mask = scoring.pad_right(tok, ids, models.device_of(model))
        specs = [NoiseSpec(sigma=sigmas[k], n_samples=1, seed=EVAL_NOISE_SEED, positions="subject")
                 if sigmas[k] is not None else None for k in group]
        sub_edits = [edits[k] for k in group] if edits is not None else [None] * len(group)
        with torch.no_grad(), batched_noise(model, specs) as noise, \
                applied_per_example(model, sub_edits, counts):
            noise.set_rows([(j, _ranges(tok, texts[k], subjects[k])) for j, k in enumerate(group)])
            logits = model(input_ids=x, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        lps = scoring.next_token_logprobs(torch.log_softmax(logits.float(), -1), x, [len(i) for i in ids])  # CPU
        r = 0
        for k, n in zip(group, counts):
            out[k] = metrics.essence_ppl([lp.numpy() for lp in lps[r : r + n]])
            r += n
    return out


def measure_many(
    model: nn.Module,
    tok,
    tasks: Sequence,
    facts: Sequence[Mapping],
    edits: Sequence[Edit | None] | None = None,
    essences: Sequence[Sequence[str] | None] | None = None,
    max_rows: int = 256,
) -> list[dict]:
    """``[evaluation.measure(model_k, tok, tasks[k], facts[k], essences[k])]`` where model_k is the model
    with ``edits[k]`` applied (None / no ``edits``: the unedited model), computed in a few batched passes
    with per-example edits. ``max_rows`` bounds the rows of one pass (facts are never split across passes).
    """
    from ..evaluation import Prompts

    K = len(tasks)
    P = [Prompts.of(f) for f in facts]
    subj = [f["subject"] for f in facts]
    sig = [t.eval_sigma for t in tasks]
    own = [[p.rewrite, *p.paraphrases] for p in P]
    nb = [list(p.neighborhood) for p in P]
    prompts = [own[k] + nb[k] for k in range(K)]
    tgt = [[tasks[k].target] * len(own[k]) + [tasks[k].neighborhood_target] * len(nb[k]) for k in range(K)]
    base = [[tasks[k].baseline] * len(own[k]) + [facts[k]["target_true"]] * len(nb[k]) for k in range(K)]
    p_t = _probs_many(model, tok, prompts, tgt, subj, sig, edits, max_rows)
    p_b = _probs_many(model, tok, prompts, base, subj, sig, edits, max_rows)
    ess = [list(e) if e else [] for e in (essences or [None] * K)]
    ppl = _essence_many(model, tok, ess, subj, sig, edits, max(1, max_rows // 4))
    out = []
    for k in range(K):
        n = len(own[k])
        out.append({
            "rewrite": p_t[k][0], "paraphrase": p_t[k][1:n], "neighborhood": p_t[k][n:],
            "rewrite_base": p_b[k][0], "paraphrase_base": p_b[k][1:n], "neighborhood_base": p_b[k][n:],
            "essence_ppl": ppl[k] if ess[k] else float("nan"),
        })
    return out
