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

from .. import data, generation, scoring, tracing
from ..hooks import trace
from ..models import device_of, load_model, module_name, n_layers

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


# ----------------------------------------------------------------------------------------------------
# Scoring (on top of helpers.scoring)
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def target_scores(model, tok, prompts: list[str], targets: list[str], batch_size: int = 64) -> pd.DataFrame:
    """Per pair: teacher-forced p(' ' + target | prompt) (product over tokens) and ``argmax_correct``, whether
    every target token is the model's argmax (exact match)."""
    rows = []
    dev = device_of(model)
    for i in range(0, len(prompts), batch_size):
        batch = scoring.make_batch(tok, prompts[i : i + batch_size], targets[i : i + batch_size], device=dev)
        logits = model(**batch.model_inputs()).logits
        lps = scoring.target_token_logprobs(logits, batch)
        ps, hits = [], []
        for j, lp in enumerate(lps):
            s, p, t = batch.start[j], batch.prompt_len[j], batch.target_len[j]
            cols = torch.arange(s + p - 1, s + p - 1 + t, device=dev)
            hits.append((logits[j, cols].argmax(-1) == batch.input_ids[j, cols + 1]).all())
            ps.append(lp.sum().exp())
        for p, hit in zip(torch.stack(ps).tolist(), torch.stack(hits).tolist()):  # one copy to the CPU a batch
            rows.append({"p": p, "argmax_correct": bool(hit)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Enrichment probe (a causal trace with helpers.tracing)
# ----------------------------------------------------------------------------------------------------


def enrichment_probe(model, tok, records: list[dict], sigma: float, n_samples: int = 10, win: int = 5,
                     progress: bool = False) -> pd.DataFrame:
    """Causal tracing (:func:`helpers.tracing.trace_facts`) restricted to the last subject token: restore the
    clean MLP outputs over W(l, ``win``), and the clean block output (hidden state) at layer l.

    Returns one row per (case_id, kind, layer) with p_clean, p_corrupt, p_restored and ``frac``, the
    recovered share of the corrupted-to-clean gap (NaN when the gap is not positive). ``kind`` is "mlp"
    (window ``win``, the bar) or "hidden" (window 1: does later text read the subject from its last token?).
    """
    facts = data.to_frame(data.parse_records(records))[["case_id", "subject", "prompt", "target_true"]]
    frames = []
    for kind, w in (("mlp", win), ("hidden", 1)):
        t = tracing.trace_facts(model, tok, facts, kinds=[kind], windows=[w], sigma=sigma, n_samples=n_samples,
                                progress=progress, tokens="last_subject")
        frames.append(t[t["is_last_subject"]])
    t = pd.concat(frames, ignore_index=True)
    gap = t["p_clean"] - t["p_corrupt"]
    t["frac"] = ((t["p_restored"] - t["p_corrupt"]) / gap).where(gap > 0)
    return t[["case_id", "kind", "layer", "p_clean", "p_corrupt", "p_restored", "frac"]].reset_index(drop=True)


@torch.no_grad()
def where_subject_is_read(model, tok, records: list[dict], sigma: float, layer: int = 0,
                          n_samples: int = 10) -> pd.DataFrame:
    """Under subject noise, restore the clean *block output* at ``layer`` at one group of positions:
    all subject tokens, the last subject token, or all positions after the subject; and, as site
    "last subject token, every layer", keep the last subject token clean throughout (its embedding and every
    block output), so that only the name's other tokens are noised.

    Tells where later positions read the subject from: if restoring the positions after the subject at
    layer 0 recovers the prediction, they copied the (noised) subject tokens in the first attention layer
    and looked the object up themselves; if a clean last subject token recovers little, later text is misled
    by reading the name's other (noised) tokens directly. One row per (case_id, site).
    """
    embed = module_name(model, "embed")
    dev = device_of(model)
    block = module_name(model, "block", layer)
    blocks = [module_name(model, "block", i) for i in range(n_layers(model))]
    rows = []
    for r in records:
        rw = r["requested_rewrite"]
        prompt = rw["prompt"].format(rw["subject"])
        try:
            b, e = tracing.subject_range(tok, prompt, rw["subject"], r["case_id"])
        except tracing.SubjectNotFoundError:
            continue
        x = scoring.encode(tok, prompt)
        y = scoring.encode(tok, scoring.with_space(rw["target_true"]["str"]))
        subject = list(range(b, e))
        # site -> (positions restored, blocks restored at them, subject positions noised)
        sites = {"none": ([], [block], subject), "all subject tokens": (subject, [block], subject),
                 "last subject token": ([e - 1], [block], subject),
                 "after the subject": (list(range(e, len(x))), [block], subject),
                 "last subject token, every layer": ([e - 1], blocks, subject[:-1])}
        d = model.get_input_embeddings().weight.shape[1]
        noise = torch.from_numpy(tracing.noise_draws(n_samples, e - b, d)).float() * sigma  # column j: position b+j
        noise = noise.to(dev)  # numpy's draws, moved once
        ps = {}
        for site, (positions, restored, noised) in sites.items():
            ids = torch.tensor([x + y] * (1 + n_samples), device=dev)

            def edit(out: torch.Tensor, name: str) -> torch.Tensor:
                new = out.clone()
                if name == embed:
                    new[1:, noised] = new[1:, noised] + noise[:, : len(noised)].to(out.dtype)
                elif positions:
                    new[1:, positions] = out[0, positions]
                return new

            with trace(model, [embed] + restored, edit=edit, retain_output=False):
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            pos = torch.arange(len(x) - 1, len(x) + len(y) - 1, device=dev)
            p = logp[:, pos, torch.tensor(y, device=dev)].sum(-1).exp()
            ps[site] = tuple(torch.stack([p[0], p[1:].mean()]).tolist())
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
            f"world model {Path(s['folder']).name} (in the cache's world/ folder)",  # not the builder's disk path
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
            f"  best layer {s['enrichment_best_layer']} recovers {s['enrichment_best']:.1%} of the gap on average "
            f"(mean_frac: MLP outputs over W(l, 5); hidden_mean_frac: the block output at layer l)",
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
    conts = generation.generate(model, tok, prompts, max_new_tokens=36)
    facts = pd.DataFrame({
        "case_id": [r["case_id"] for r in records], "subject": [rw["subject"] for rw in rws],
        "relation_id": [rw["relation_id"] for rw in rws], "prompt": prompts, "target_true": targets,
        "frequency": [int(freq[r["case_id"]]) for r in records],
        "p_true": sc["p"], "argmax_correct": sc["argmax_correct"], "continuation": conts,
    })
    facts["bucket"] = pd.Categorical([frequency_bucket(f) for f in facts["frequency"]], FREQ_LABELS, ordered=True)
    facts["is_correct"] = [generation.is_correct(c, t) for c, t in zip(conts, targets)]
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
    sigma = tracing.noise_sigma(model, tok, sorted({rw["subject"] for rw in rws}))
    probe_recs = [r for r in records if r["case_id"] in set(passing["case_id"])][:n_probe]
    log.info("enrichment probe on %d facts", len(probe_recs))
    probe = enrichment_probe(model, tok, probe_recs, sigma)
    kept = probe.dropna(subset=["frac"])
    by_layer = (kept[kept["kind"] == "mlp"].groupby("layer")
                .agg(mean_frac=("frac", "mean"), median_frac=("frac", "median"),
                     mean_p_restored=("p_restored", "mean"), mean_p_corrupt=("p_corrupt", "mean"),
                     mean_p_clean=("p_clean", "mean"))
                .reset_index())
    hidden = kept[kept["kind"] == "hidden"].groupby("layer")["frac"].mean()
    by_layer["hidden_mean_frac"] = by_layer["layer"].map(hidden)
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
        "sigma": sigma, "n_probe": int(kept.loc[kept["kind"] == "mlp", "case_id"].nunique()),
        "hidden_best": float(by_layer["hidden_mean_frac"].max()) if len(by_layer) else float("nan"),
        "enrichment_best_layer": best,
        "enrichment_best": float(by_layer["mean_frac"].max()) if len(by_layer) else float("nan"),
    }
    return WorldReport(facts, buckets, probe, by_layer, summary)
