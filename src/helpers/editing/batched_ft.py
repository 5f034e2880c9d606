"""Batched fine-tuning (FT-1, FT-5) for :mod:`.batched`: per fact its own delta tensors and its own Adam,
stepped by the one-fact path's rules, in one pass per sequence length."""

from __future__ import annotations

import torch

from .. import hooks, models, scoring, thread_budget
from .base import Edit, EditError, subject_ranges
from .batched_input_noise import _noised
from .batched_rows import _sub_batch
from .finetune import PATIENCE, FTHparams
from .per_example import _per_example, _PerExample


def _ft_many(model, tok, requests, layers, hp: FTHparams, noise, failed, method: str,
             exact: bool, *, loss_floor: float) -> list[Edit | None]:
    """Batched :func:`.finetune.ft_edit`. Per fact its own delta tensors and its own ``torch.optim.Adam``
    (built exactly as the one-fact path builds it), stepped only when the fact's loss is >= 1e-2, so skipped
    steps leave that fact's Adam state untouched. Facts are grouped by sequence length, one pass per
    length (no padding), and the hook does one matmul per fact: each row computes bitwise what it computes
    in the one-fact pass. ``exact=False``: one padded pass per step for all facts. ``loss_floor``: the step
    floor (:data:`.finetune.LOSS_FLOOR`), as :func:`.batched.edit_many` reads it from its own module."""
    K = len(requests)
    layers = sorted(layers)
    n_rows = [r.noise.n_samples if r.noise is not None else 1 for r in requests]
    texts, targets, ranges = [], [], []
    for r, nr in zip(requests, n_rows):
        texts += [r.text] * nr
        targets += [r.target] * nr
        ranges.append(subject_ranges(tok, [r.template], r.subject) * nr)
    dev = models.device_of(model)
    full = scoring.make_batch(tok, texts, targets, device=dev)
    first = [sum(n_rows[:k]) for k in range(K)]
    T_all = full.input_ids.shape[1]
    lengths = [full.prompt_len[first[k]] + full.target_len[first[k]] if exact else T_all for k in range(K)]
    eps = float(hp.norm_constraint)
    d_model, d_ff = models.dims(model)
    has_bias = [l for l in layers if getattr(models.module(model, "down_proj", l), "bias", None) is not None]
    dw = {l: [torch.zeros(d_model, d_ff, device=dev, requires_grad=True) for _ in range(K)] for l in layers}
    db = {l: [torch.zeros(d_model, device=dev, requires_grad=True) for _ in range(K)] for l in has_bias}
    params = [[dw[l][k] for l in layers] + [db[l][k] for l in has_bias] for k in range(K)]
    opts = [torch.optim.Adam(params[k], lr=hp.lr, weight_decay=hp.weight_decay) for k in range(K)]
    infos = [{"loss": [], "max_abs_delta": [], "updates": 0} for _ in range(K)]
    below = [0] * K
    fact_below: dict[int, torch.Tensor] = {}
    active = list(range(K))
    pe = _PerExample(model, dw, db)
    pe.exact = True
    with _per_example(model, pe):
        for step in range(hp.num_steps):
            thread_budget.follow()  # the stage runner may have freed a core
            active = [k for k in active if k not in failed]
            if not active:
                break
            groups: dict[int, list[int]] = {}
            for k in active:
                groups.setdefault(lengths[k], []).append(k)
            losses = {}
            for T, ks in sorted(groups.items()):
                rows = [first[k] + j for k in ks for j in range(n_rows[k])]
                batch = _sub_batch(full, rows)
                batch.input_ids, batch.attention_mask, batch.position_ids = (
                    batch.input_ids[:, :T], batch.attention_mask[:, :T], batch.position_ids[:, :T])
                segs, r0 = [], 0
                for k in ks:
                    segs.append((k, r0, r0 + n_rows[k]))
                    r0 += n_rows[k]
                pe.set_segments(segs)
                if noise is not None:
                    noise.set_rows([(k, ranges[k]) for k in ks])
                # streams entering the first tuned block, per fact (not under fresh input noise)
                reuse = not _noised(noise, ks)
                cached = reuse and all(k in fact_below for k in ks)
                stream_in = torch.cat([fact_below[k] for k in ks]) if cached else None
                with hooks.reuse_below(model, layers[0], stream_in, record=reuse) as rb, \
                        scoring.scored_logits(model, batch) as sc:
                    sc.set(model(**batch.model_inputs()).logits)
                if rb.stream is not None:
                    for k, s, e in segs:
                        fact_below[k] = rb.stream[s:e]
                logp = torch.stack([lp.sum() for lp in sc.target_token_logprobs()])
                for k, s, e in segs:
                    lk = logp[s:e].exp().sum() if requests[k].erase else -logp[s:e].sum()
                    if not torch.isfinite(lk):
                        failed[k] = EditError(f"{requests[k].where()}: non-finite fine-tuning loss at step {step}")
                        continue
                    losses[k] = lk
            ks_ok = sorted(losses)
            for k in ks_ok:
                infos[k]["loss"].append(float(losses[k].detach()))
            stepping = [k for k in ks_ok if infos[k]["loss"][-1] >= loss_floor]
            if stepping:
                for k in stepping:
                    opts[k].zero_grad()
                # d(sum)/d(loss_k) = 1: each fact's graph gets exactly the one-fact path's gradient
                torch.stack([losses[k] for k in stepping]).sum().backward()
                for k in stepping:
                    opts[k].step()
                    infos[k]["updates"] += 1
                    with torch.no_grad():
                        for p in params[k]:
                            p.clamp_(-eps, eps)
            done = []
            for k in ks_ok:
                infos[k]["max_abs_delta"].append(max(float(p.detach().abs().max()) for p in params[k]))
                if not requests[k].erase:
                    below[k] = below[k] + 1 if infos[k]["loss"][-1] < loss_floor else 0
                    if below[k] >= PATIENCE:
                        done.append(k)
            active = [k for k in active if k not in done]
    out: list[Edit | None] = []
    for k in range(K):
        if k in failed:
            out.append(None)
            continue
        out.append(Edit(method=method, layers=list(layers),
                        deltas={l: dw[l][k].detach().clone() for l in layers},
                        bias_deltas={l: db[l][k].detach().clone() for l in has_bias}, info=infos[k]))
    return out
