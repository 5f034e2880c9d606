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


def _target_logprobs(model, batch) -> torch.Tensor:
    """Σ log p(target tokens | prompt) per row of ``batch`` (R,), the unembedding only where it is read."""
    tg = _Targets.of(batch)
    if scoring.SELECT_LOGITS:
        with scoring.unembed_at(model, tg.rows, tg.cols):
            lg = model(**batch.model_inputs()).logits[0].reshape(*tg.cols.shape, -1)
        return tg.sums_selected(lg)
    return tg.sums(model(**batch.model_inputs()).logits)


def _row_passes(lengths: Sequence[int], max_rows: int) -> list[list[int]]:
    """Rows (indices into ``lengths``, their padded lengths) cut into passes of similar length: the row-level
    :func:`~.batched_deltas.pass_groups` (padding against a per-pass overhead), at most ``max_rows`` rows a pass;
    rows keep their order within a pass."""
    from .batched_deltas import pass_groups

    return [g[i : i + max_rows] for g in pass_groups(lengths, 1) for i in range(0, len(g), max_rows)]


def _probs_many(model, tok, prompts: Sequence[Sequence[str]], targets: Sequence[Sequence[str]],
                subjects: Sequence[str], sigmas: Sequence[float | None], edits: Sequence[Edit | None] | None,
                max_rows: int) -> list[list[float]]:
    """Per fact k, p(targets[k][i] | prompts[k][i]) as :func:`helpers.evaluation.probs` computes it (one pass
    per fact, fresh seed-1 noise per fact), with fact k's edit applied to its rows.

    Without noise, rows of any facts share a pass by length (:func:`_row_passes`: CounterFact's paraphrases,
    behind a prefix sentence, are several times as long as the other prompts, and one padded pass per group of
    facts ran about 3x more positions than tokens). With noise (Fact Forcing) a fact's rows stay together in
    one pass, so that they draw exactly the one-fact noise."""
    from ..evaluation import EVAL_NOISE_SEED, _ranges

    out: list[list[float]] = [[] for _ in prompts]
    edits = list(edits) if edits is not None else [None] * len(prompts)
    if all(s is None for s in sigmas):
        items = [(k, i) for k in range(len(prompts)) for i in range(len(prompts[k]))]
        if not items:
            return out
        texts = [prompts[k][i] for k, i in items]
        tgts = [targets[k][i] for k, i in items]
        lengths = [int(n) for n in scoring.make_batch(tok, texts, tgts).attention_mask.sum(1)]
        p = [0.0] * len(items)
        for rows in _row_passes(lengths, max_rows):
            batch = scoring.make_batch(tok, [texts[r] for r in rows], [tgts[r] for r in rows],
                                       device=models.device_of(model))
            owner = torch.tensor([items[r][0] for r in rows], dtype=torch.long)
            with torch.no_grad(), applied_per_example(model, edits, owner):
                for r, v in zip(rows, _target_logprobs(model, batch).exp().tolist()):
                    p[r] = v
        for (k, _), v in zip(items, p):
            out[k].append(v)
        return out
    for group in _chunks([len(p) for p in prompts], max_rows):
        texts = [p for k in group for p in prompts[k]]
        tgts = [t for k in group for t in targets[k]]
        if not texts:
            continue
        specs = [NoiseSpec(sigma=sigmas[k], n_samples=1, seed=EVAL_NOISE_SEED, positions="subject")
                 if sigmas[k] is not None else None for k in group]
        counts = [len(prompts[k]) for k in group]
        batch = scoring.make_batch(tok, texts, tgts, device=models.device_of(model))
        with torch.no_grad(), batched_noise(model, specs) as noise, \
                applied_per_example(model, [edits[k] for k in group], counts):
            noise.set_rows([(j, _ranges(tok, prompts[k], subjects[k])) for j, k in enumerate(group)])
            p = _target_logprobs(model, batch).exp().tolist()
        r = 0
        for k, n in zip(group, counts):
            out[k] = p[r : r + n]
            r += n
    return out


#: Read positions of one essence pass: its logits over the whole vocabulary are the largest tensor of an
#: evaluation (2,048 x 49,152 floats = 0.4 GB for SmolLM2; 64 texts of 100 tokens with their log-softmax took 2.5 GB).
ESSENCE_POSITIONS = 2048
#: Positions whose log-probabilities are taken at once (a (chunk, vocabulary) temporary).
LOGPROB_CHUNK = 512


def _read_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits[i])[ids[i]] for logits (R, V) and ids (R,), in chunks of :data:`LOGPROB_CHUNK` rows
    (no (R, V) log-softmax is built). float32; on the logits' device."""
    out = []
    for s in range(0, logits.shape[0], LOGPROB_CHUNK):
        lg = logits[s : s + LOGPROB_CHUNK].float()
        out.append(lg.gather(1, ids[s : s + LOGPROB_CHUNK, None])[:, 0] - torch.logsumexp(lg, -1))
    return torch.cat(out) if out else logits.new_zeros(0)


def _essence_many(model, tok, texts: Sequence[Sequence[str]], subjects: Sequence[str],
                  sigmas: Sequence[float | None], edits: Sequence[Edit | None] | None,
                  max_tokens: int = 100) -> list[float]:
    """Per fact, :func:`helpers.evaluation.essence_ppl` of its texts, with its edit applied to its rows. Passes
    hold whole facts and about :data:`ESSENCE_POSITIONS` read positions; the unembedding runs only at the
    positions read (every token but each text's last)."""
    from ..evaluation import EVAL_NOISE_SEED, _ranges

    out = [float("nan")] * len(texts)
    dev = models.device_of(model)
    ids_of = [[scoring.encode(tok, t)[:max_tokens] for t in ts] for ts in texts]
    for group in _chunks([sum(max(len(i) - 1, 0) for i in ids) for ids in ids_of], ESSENCE_POSITIONS):
        group = [k for k in group if texts[k]]
        if not group:
            continue
        ids = [i for k in group for i in ids_of[k]]
        counts = [len(texts[k]) for k in group]
        x, mask = scoring.pad_right(tok, ids, dev)
        lens = [len(i) for i in ids]
        rows, cols = scoring.next_token_positions(lens)
        specs = [NoiseSpec(sigma=sigmas[k], n_samples=1, seed=EVAL_NOISE_SEED, positions="subject")
                 if sigmas[k] is not None else None for k in group]
        sub_edits = [edits[k] for k in group] if edits is not None else [None] * len(group)
        with torch.no_grad(), batched_noise(model, specs) as noise, \
                applied_per_example(model, sub_edits, counts), scoring.unembed_at(model, rows, cols):
            noise.set_rows([(j, _ranges(tok, texts[k], subjects[k])) for j, k in enumerate(group)])
            logits = model(input_ids=x, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[0]  # (read positions, V)
            lp = _read_logprobs(logits, x[rows.to(dev), cols.to(dev) + 1]).cpu()
        del logits
        per_text = list(lp.split([max(n - 1, 0) for n in lens]))
        r = 0
        for k, n in zip(group, counts):
            out[k] = metrics.essence_ppl([t.numpy() for t in per_text[r : r + n]])
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
    with per-example edits. ``max_rows`` bounds the rows of one pass of prompts (the rows of a noised fact stay
    in one pass; see :func:`_probs_many`); essence passes hold about :data:`ESSENCE_POSITIONS` positions.
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
    ppl = _essence_many(model, tok, ess, subj, sig, edits)
    out = []
    for k in range(K):
        n = len(own[k])
        out.append({
            "rewrite": p_t[k][0], "paraphrase": p_t[k][1:n], "neighborhood": p_t[k][n:],
            "rewrite_base": p_b[k][0], "paraphrase_base": p_b[k][1:n], "neighborhood_base": p_b[k][n:],
            "essence_ppl": ppl[k] if ess[k] else float("nan"),
        })
    return out
