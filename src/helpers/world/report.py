"""How well the world model knows its world, and where it stores it.

- accuracy on requested-rewrite prompts by corpus frequency of the fact (teacher-forced argmax of every
  target token);
- the correctness filter (SCIENCE.md §1.3: greedy 36 new tokens, pass iff lower(target_true) is a
  substring of the lower-cased, stripped continuation);
- paraphrase-prompt accuracy on facts that pass;
- a subject-enrichment probe (a small causal trace, SCIENCE.md §4.2): noise the subject token embeddings
  (σ = 3 × std of subject-token embeddings, 10 samples, fresh ``RandomState(1)`` draws shared by every
  intervention), then restore the clean MLP outputs at the *last subject token* over a window of 5 layers
  (clipped) and measure the recovered fraction of the corrupted-to-clean gap in p(o_true).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..hooks import trace
from ..models import load_model, module_name, n_layers

log = logging.getLogger(__name__)

FREQ_EDGES = (0, 1, 3, 6, 11, 21, 51, math.inf)
FREQ_LABELS = ("0", "1-2", "3-5", "6-10", "11-20", "21-50", "51+")

BARS = {
    "top_bucket_acc": 0.90, "pass_rate_min": 0.40, "pass_rate_max": 0.90, "n_pass": 300,
    "paraphrase_acc": 0.80, "enrichment": 0.30, "n_probe": 100, "train_seconds": 360,
}


def frequency_bucket(freq: int) -> str:
    for lo, hi, lab in zip(FREQ_EDGES[:-1], FREQ_EDGES[1:], FREQ_LABELS):
        if lo <= freq < hi:
            return lab
    raise ValueError(freq)


def window(layer: int, w: int, L: int) -> list[int]:
    """W(l, w) = [max(0, l - w//2), min(L, l + ceil(w/2)))."""
    return list(range(max(0, layer - w // 2), min(L, layer + math.ceil(w / 2))))


# ----------------------------------------------------------------------------------------------------
# Scoring primitives (small local versions; helpers.scoring is the shared one)
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def target_scores(model, tok, prompts: list[str], targets: list[str], batch_size: int = 64) -> pd.DataFrame:
    """Teacher-forced p(' ' + target | prompt) (product over tokens) and argmax exact match, per pair."""
    rows = []
    for i in range(0, len(prompts), batch_size):
        xs = [tok.encode(p) for p in prompts[i: i + batch_size]]
        ys = [tok.encode(" " + t) for t in targets[i: i + batch_size]]
        m = max(len(x) + len(y) for x, y in zip(xs, ys))
        ids = torch.full((len(xs), m), tok.eos_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for j, (x, y) in enumerate(zip(xs, ys)):
            ids[j, : len(x) + len(y)] = torch.tensor(x + y)
            att[j, : len(x) + len(y)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), -1)
        for j, (x, y) in enumerate(zip(xs, ys)):
            pos = torch.arange(len(x) - 1, len(x) + len(y) - 1)
            lp = logp[j, pos, torch.tensor(y)]
            hit = bool((logp[j, pos].argmax(-1) == torch.tensor(y)).all())
            rows.append({"p": float(lp.sum().exp()), "argmax_correct": hit})
    return pd.DataFrame(rows)


@torch.no_grad()
def greedy_continuations(model, tok, prompts: list[str], n_new: int = 36, batch_size: int = 64) -> list[str]:
    """Greedy decode ``n_new`` tokens (left padding, pad = eos); return the stripped continuations."""
    out = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i: i + batch_size], return_tensors="pt", padding=True)
            gen = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                row = [t for t in row.tolist() if t != tok.eos_token_id]
                out.append(tok.decode(row).strip())
    finally:
        tok.padding_side = old_side
    return out


def passes_filter(continuation: str, target_true: str) -> bool:
    return target_true.strip().lower() in continuation.strip().lower()


def subject_range(tok, prompt: str, subject: str) -> tuple[int, int] | None:
    """Token range [b, e) of the first occurrence of ``subject`` in ``prompt`` (per-token decoding)."""
    ids = tok.encode(prompt)
    pieces = [tok.decode([t]) for t in ids]
    text = "".join(pieces)
    start = text.find(subject)
    if start < 0:
        return None
    end = start + len(subject)
    b = e = None
    pos = 0
    for k, p in enumerate(pieces):
        pos += len(p)
        if b is None and pos > start:
            b = k
        if e is None and pos >= end:
            e = k + 1
            break
    return (b, e) if b is not None and e is not None else None


# ----------------------------------------------------------------------------------------------------
# Enrichment probe
# ----------------------------------------------------------------------------------------------------


def subject_noise_sigma(model, tok, subjects: list[str]) -> float:
    """3 × std of the token-embedding entries of the subjects' tokens."""
    ids = sorted({t for s in subjects for t in tok.encode(" " + s) + tok.encode(s)})
    emb = model.get_input_embeddings().weight[ids]
    return float(3 * emb.float().std())


@torch.no_grad()
def enrichment_probe(model, tok, records: list[dict], sigma: float, n_samples: int = 10, win: int = 5) -> pd.DataFrame:
    """Restore clean MLP outputs at the last subject token, window ``win``, under subject noise.

    One forward pass per fact with batch 1 + N + L·N: row 0 clean, N corrupted rows, then N corrupted rows
    per central layer whose MLP outputs at the last subject token are overwritten by row 0's over W(l, win).
    Returns one row per (case_id, layer): p_clean, p_corrupt, p_restored, frac = recovered share of the gap.
    """
    L = n_layers(model)
    embed = module_name(model, "embed")
    mlps = [module_name(model, "mlp", l) for l in range(L)]
    rows = []
    for r in records:
        rw = r["requested_rewrite"]
        prompt = rw["prompt"].format(rw["subject"])
        rng_ = subject_range(tok, prompt, rw["subject"])
        if rng_ is None:
            continue
        b, e = rng_
        x = tok.encode(prompt)
        y = tok.encode(" " + rw["target_true"]["str"])
        ids = torch.tensor([x + y] * (1 + n_samples * (L + 1)))
        d = model.get_input_embeddings().weight.shape[1]
        noise = torch.from_numpy(np.random.RandomState(1).randn(n_samples, e - b, d)).float() * sigma
        noise = noise.repeat(L + 1, 1, 1)  # the same draws for the baseline and every intervention

        def edit(out: torch.Tensor, name: str) -> torch.Tensor:
            new = out.clone()
            if name == embed:
                new[1:, b:e] = new[1:, b:e] + noise.to(out.dtype)
                return new
            layer = mlps.index(name)
            for c in range(L):
                if layer in window(c, win, L):
                    lo = 1 + n_samples * (c + 1)
                    new[lo: lo + n_samples, e - 1] = out[0, e - 1]
            return new

        with trace(model, [embed] + mlps, edit=edit, retain_output=False):
            logits = model(input_ids=ids).logits
        logp = torch.log_softmax(logits.float(), -1)
        pos = torch.arange(len(x) - 1, len(x) + len(y) - 1)
        p = logp[:, pos, torch.tensor(y)].sum(-1).exp()
        p_clean = float(p[0])
        p_corr = float(p[1: 1 + n_samples].mean())
        for c in range(L):
            lo = 1 + n_samples * (c + 1)
            p_rest = float(p[lo: lo + n_samples].mean())
            gap = p_clean - p_corr
            rows.append({"case_id": r["case_id"], "layer": c, "p_clean": p_clean, "p_corrupt": p_corr,
                         "p_restored": p_rest, "frac": (p_rest - p_corr) / gap if gap > 0 else float("nan")})
    return pd.DataFrame(rows)


@torch.no_grad()
def where_subject_is_read(model, tok, records: list[dict], sigma: float, layer: int = 0,
                          n_samples: int = 10) -> pd.DataFrame:
    """Under subject noise, restore the clean *block output* at ``layer`` at one group of positions:
    all subject tokens, the last subject token, or all positions after the subject.

    Tells where later positions read the subject from: if restoring the positions after the subject at
    layer 0 recovers the prediction, they copied the (noised) subject tokens in the first attention layer
    and looked the object up themselves. One row per (case_id, site).
    """
    embed = module_name(model, "embed")
    block = module_name(model, "block", layer)
    rows = []
    for r in records:
        rw = r["requested_rewrite"]
        prompt = rw["prompt"].format(rw["subject"])
        sr = subject_range(tok, prompt, rw["subject"])
        if sr is None:
            continue
        b, e = sr
        x = tok.encode(prompt)
        y = tok.encode(" " + rw["target_true"]["str"])
        sites = {"none": [], "all subject tokens": list(range(b, e)), "last subject token": [e - 1],
                 "after the subject": list(range(e, len(x)))}
        d = model.get_input_embeddings().weight.shape[1]
        noise = torch.from_numpy(np.random.RandomState(1).randn(n_samples, e - b, d)).float() * sigma
        ps = {}
        for site, positions in sites.items():
            ids = torch.tensor([x + y] * (1 + n_samples))

            def edit(out: torch.Tensor, name: str) -> torch.Tensor:
                new = out.clone()
                if name == embed:
                    new[1:, b:e] = new[1:, b:e] + noise.to(out.dtype)
                elif positions:
                    new[1:, positions] = out[0, positions]
                return new

            with trace(model, [embed, block], edit=edit, retain_output=False):
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            pos = torch.arange(len(x) - 1, len(x) + len(y) - 1)
            p = logp[:, pos, torch.tensor(y)].sum(-1).exp()
            ps[site] = (float(p[0]), float(p[1:].mean()))
        p_clean, p_corr = ps["none"]
        for site, (_, p_rest) in ps.items():
            if site != "none":
                gap = p_clean - p_corr
                rows.append({"case_id": r["case_id"], "site": site, "layer": layer, "p_clean": p_clean,
                             "p_corrupt": p_corr, "p_restored": p_rest,
                             "frac": (p_rest - p_corr) / gap if gap > 0 else float("nan")})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------


@dataclass
class WorldReport:
    """Tables (one row per fact / bucket / probe cell) and the summary numbers checked against BARS."""

    facts: pd.DataFrame
    buckets: pd.DataFrame
    probe: pd.DataFrame
    probe_by_layer: pd.DataFrame
    summary: dict = field(default_factory=dict)

    def bars(self) -> dict[str, bool]:
        s = self.summary
        return {
            "top buckets >= 90%": s["top_bucket_acc"] >= BARS["top_bucket_acc"],
            "pass rate in [40%, 90%]": BARS["pass_rate_min"] <= s["pass_rate"] <= BARS["pass_rate_max"],
            ">= 300 facts pass": s["n_pass"] >= BARS["n_pass"],
            "paraphrase acc >= 80%": s["paraphrase_acc"] >= BARS["paraphrase_acc"],
            "enrichment >= 30%": s["enrichment_best"] >= BARS["enrichment"],
            "best layer in first 2/3": s["enrichment_best_layer"] < 2 * s["n_layers"] / 3,
            ">= 100 probed facts": s["n_probe"] >= BARS["n_probe"],
            "training <= 6 min": s["train_seconds"] <= BARS["train_seconds"],
        }

    def text(self) -> str:
        s = self.summary
        lines = [
            f"world model {s['folder']}",
            f"  {s['n_layers']} layers, d={s['d_model']}, {s['n_params'] / 1e6:.2f}M params, vocab {s['vocab']}; "
            f"{s['n_records']} facts; subject length {s['subject_tokens']:.2f} tokens",
            f"  training: {s['train_seconds']:.0f} s, {s['train_tokens']} tokens "
            f"(OMP_NUM_THREADS={s['omp_num_threads']}, torch threads {s['torch_threads']})",
            "accuracy on requested-rewrite prompts by corpus frequency:",
            self.buckets.to_string(index=False),
            f"correctness filter: {s['n_pass']}/{s['n_records']} pass ({s['pass_rate']:.1%})",
            f"paraphrase accuracy on passing facts: {s['paraphrase_acc']:.1%}; "
            f"neighborhood accuracy: {s['neighborhood_acc']:.1%}",
            f"enrichment probe (σ={s['sigma']:.3f}, window 5, last subject token, {s['n_probe']} facts):",
            self.probe_by_layer.to_string(index=False),
            f"  best layer {s['enrichment_best_layer']} recovers {s['enrichment_best']:.1%} of the gap on average",
            "bars: " + ", ".join(f"{k}: {'OK' if v else 'MISSED'}" for k, v in self.bars().items()),
        ]
        return "\n".join(lines)


def evaluate_world(folder: Path | str, n_probe: int = 150, max_facts: int | None = None,
                   n_neighbors: int = 2) -> WorldReport:
    """Score every record of the world in ``folder`` and run the enrichment probe on passing facts."""
    folder = Path(folder)
    model, tok = load_model(folder)
    records = json.loads((folder / "counterfact.json").read_text())
    meta = json.loads((folder / "world.json").read_text())
    freq = pd.read_csv(folder / "facts.csv").set_index("case_id")["frequency"]
    if max_facts is not None:
        records = records[:max_facts]
    rws = [r["requested_rewrite"] for r in records]
    prompts = [rw["prompt"].format(rw["subject"]) for rw in rws]
    targets = [rw["target_true"]["str"] for rw in rws]
    log.info("scoring %d facts", len(records))
    sc = target_scores(model, tok, prompts, targets)
    conts = greedy_continuations(model, tok, prompts)
    facts = pd.DataFrame({
        "case_id": [r["case_id"] for r in records], "subject": [rw["subject"] for rw in rws],
        "relation_id": [rw["relation_id"] for rw in rws], "prompt": prompts, "target_true": targets,
        "frequency": [int(freq[r["case_id"]]) for r in records],
        "p_true": sc["p"], "argmax_correct": sc["argmax_correct"], "continuation": conts,
    })
    facts["bucket"] = pd.Categorical([frequency_bucket(f) for f in facts["frequency"]], FREQ_LABELS, ordered=True)
    facts["is_correct"] = [passes_filter(c, t) for c, t in zip(conts, targets)]
    pp, pt, pid = [], [], []
    for r, t in zip(records, targets):
        for p in r["paraphrase_prompts"]:
            pp.append(p), pt.append(t), pid.append(r["case_id"])
    para = target_scores(model, tok, pp, pt).assign(case_id=pid)
    facts = facts.merge(para.groupby("case_id")["argmax_correct"].mean().rename("paraphrase_acc"),
                        left_on="case_id", right_index=True)
    npp, npt, nid = [], [], []
    for r, t in zip(records, targets):
        for p in r["neighborhood_prompts"][:n_neighbors]:
            npp.append(p), npt.append(t), nid.append(r["case_id"])
    neigh = target_scores(model, tok, npp, npt).assign(case_id=nid)
    facts = facts.merge(neigh.groupby("case_id")["argmax_correct"].mean().rename("neighborhood_acc"),
                        left_on="case_id", right_index=True, how="left")
    buckets = (facts.groupby("bucket", observed=True)
               .agg(n=("case_id", "size"), accuracy=("argmax_correct", "mean"), pass_rate=("is_correct", "mean"),
                    mean_p_true=("p_true", "mean"))
               .reset_index())
    passing = facts[facts["is_correct"]]
    sigma = subject_noise_sigma(model, tok, sorted({rw["subject"] for rw in rws}))
    probe_recs = [r for r in records if r["case_id"] in set(passing["case_id"])][:n_probe]
    log.info("enrichment probe on %d facts", len(probe_recs))
    probe = enrichment_probe(model, tok, probe_recs, sigma)
    kept = probe.dropna(subset=["frac"])
    by_layer = (kept.groupby("layer")
                .agg(mean_frac=("frac", "mean"), median_frac=("frac", "median"),
                     mean_p_restored=("p_restored", "mean"), mean_p_corrupt=("p_corrupt", "mean"),
                     mean_p_clean=("p_clean", "mean"))
                .reset_index())
    best = int(by_layer.loc[by_layer["mean_frac"].idxmax(), "layer"]) if len(by_layer) else -1
    top = [b for b in FREQ_LABELS[::-1] if (facts["bucket"] == b).sum() >= 10][:2]
    d_model = model.get_input_embeddings().weight.shape[1]
    summary = {
        "folder": str(folder), "n_layers": n_layers(model), "d_model": d_model,
        "n_params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
        "n_records": len(records),
        "subject_tokens": float(np.mean([len(tok.encode(" " + rw["subject"])) for rw in rws])),
        "train_seconds": meta["train_seconds"], "train_tokens": meta["train_tokens"],
        "omp_num_threads": meta.get("omp_num_threads"), "torch_threads": meta.get("torch_threads"),
        "accuracy": float(facts["argmax_correct"].mean()),
        "top_buckets": top,
        "top_bucket_acc": float(facts[facts["bucket"].isin(top)].groupby("bucket", observed=True)["argmax_correct"]
                                .mean().min()) if top else float("nan"),
        "n_pass": int(facts["is_correct"].sum()), "pass_rate": float(facts["is_correct"].mean()),
        "paraphrase_acc": float(passing["paraphrase_acc"].mean()),
        "neighborhood_acc": float(facts["neighborhood_acc"].mean()),
        "sigma": sigma, "n_probe": int(kept["case_id"].nunique()),
        "enrichment_best_layer": best,
        "enrichment_best": float(by_layer["mean_frac"].max()) if len(by_layer) else float("nan"),
    }
    return WorldReport(facts, buckets, probe, by_layer, summary)
