"""Quality bar of the editing methods (issue 5, item 7) on Error Injection.

For the first N facts the model gets right (greedy continuation contains o_true), edits each fact at every
chosen central layer with ROME, MEMIT, FT-1 and FT-5 (hyperparameters from ``helpers/hparams/<family>.yaml``)
and prints, per method and layer, the mean

- rewrite score RS = max(2e-8, (b - a)/(1 - a)) of p(o_false) on the rewrite prompt,
- paraphrase score (same formula, averaged over the paraphrase prompts; the first-prompt variant too),
- neighborhood score NS = 1 - |b - a|/(0.5 + |a - 0.5|) of p(o_false) on the neighborhood prompts, and
  neighborhood accuracy (fraction of neighborhood prompts where p(o_true) > p(o_false) after the edit),

then checks the bar: ROME at its best layer RS >= 0.95 and paraphrase >= 0.5; MEMIT at its best layer
RS >= 0.9; no NaN/inf anywhere. Exit status 1 if the bar is missed.

    OMP_NUM_THREADS=1 python benchmarks/edit_quality.py                 # the default world model
    python benchmarks/edit_quality.py --model path/to/folder --facts 20 --layers 1,3,5 --out q.csv
    python benchmarks/edit_quality.py --model smollm2-135m --data known --facts 50 --layers 0,3,6,9 --threads 2

Edits run through the production path (``editing.batched.edit_many``, facts of one layer optimised together,
``--batch`` at a time); ``--one-by-one`` runs ``editing.edit`` per fact instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers import editing as E
from helpers import generation, metrics, models, scoring
from helpers.editing.batched import edit_many

log = logging.getLogger("edit_quality")


def load_records(folder: Path, data: str | None = None, seed: int = 0) -> list[dict]:
    """The world folder's records, ROME's known facts (``known``), or a CounterFact-schema file."""
    if data in (None, "world"):
        return json.loads((folder / "counterfact.json").read_text())
    if data == "known":
        from helpers.pipeline import known_data

        return json.loads(known_data(seed).read_text())
    return json.loads(Path(data).read_text())


def correct_facts(model, tok, records: list[dict], n: int) -> list[dict]:
    """The first ``n`` records whose greedy continuation (10 tokens) contains o_true."""
    out = []
    for i in range(0, len(records), 64):
        chunk = records[i : i + 64]
        prompts = [r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"]) for r in chunk]
        conts = generation.generate(model, tok, prompts, max_new_tokens=10)
        for r, c in zip(chunk, conts):
            if generation.is_correct(c, r["requested_rewrite"]["target_true"]["str"]):
                out.append(r)
                if len(out) == n:
                    return out
    return out


def probs(model, tok, rec: dict) -> dict[str, np.ndarray]:
    """p(o_false) on rewrite, paraphrase and neighborhood prompts; p(o_true) on neighborhood prompts."""
    rw = rec["requested_rewrite"]
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    rewrite = [rw["prompt"].replace("{}", rw["subject"])]
    para, neigh = list(rec["paraphrase_prompts"]), list(rec["neighborhood_prompts"])
    prompts = rewrite + para + neigh + neigh
    targets = [new] * (1 + len(para) + len(neigh)) + [true] * len(neigh)
    p = scoring.target_probs(model, tok, prompts, targets).numpy().astype(np.float64)
    a, b = 1 + len(para), 1 + len(para) + len(neigh)
    return {"rewrite": p[:1], "para": p[1:a], "neigh_new": p[a:b], "neigh_true": p[b:]}


def scores(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """The bar's per-edit scores from :func:`probs` before (``a``) and after (``b``) an edit; neighborhood
    columns are NaN for a record without neighborhood prompts (skipped in means)."""
    nb = len(b["neigh_new"])
    return {
        "rewrite": float(metrics.rewrite_score(a["rewrite"], b["rewrite"])[0]),
        "paraphrase": float(np.mean(metrics.rewrite_score(a["para"], b["para"]))),
        "paraphrase_first": float(metrics.rewrite_score(a["para"][:1], b["para"][:1])[0]),
        "neighborhood": float(np.mean(metrics.neighborhood_score(a["neigh_new"], b["neigh_new"]))) if nb else math.nan,
        "neighborhood_acc": float(np.mean(b["neigh_true"] > b["neigh_new"])) if nb else math.nan,
        "neighborhood_acc_pre": float(np.mean(a["neigh_true"] > a["neigh_new"])) if nb else math.nan,
        "p_new_post": float(b["rewrite"][0]),
    }


def overrides(items: list[str], method: str) -> dict:
    """``--set METHOD.KEY=VALUE`` items for ``method`` as a dict (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        m, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. rome.kl_factor=0.0625")
        if m == method:
            out[name] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder with counterfact.json and corpus.txt "
                    "(default: the 'default' world model, trained if missing)")
    ap.add_argument("--world", default="default", help="world preset when --model is not given")
    ap.add_argument("--data", default=None, help="records: the world folder's (default), 'known', or a JSON file")
    ap.add_argument("--corpus", default=None, help="second-moment corpus: the world folder's corpus.txt (default), "
                    "'wikitext', 'wikitext-slice' or a text file")
    ap.add_argument("--batch", type=int, default=8, help="facts optimised together (production path)")
    ap.add_argument("--one-by-one", action="store_true", help="editing.edit per fact instead of edit_many")
    ap.add_argument("--cache", default=".cache")
    ap.add_argument("--hparams", default=None, help="hparams family (helpers/hparams/<name>.yaml) or path "
                    "(default: world, or the named model's family)")
    ap.add_argument("--problem", default="error_injection")
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--layers", default="all", help="comma-separated central layers, or 'all'")
    ap.add_argument("--methods", default="rome,memit,ft1,ft5")
    ap.add_argument("--n-tokens", type=int, default=20000, help="keys for the second moments")
    ap.add_argument("--out", default=None, help="write the per-edit table (csv)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="override one hyperparameter for this run (a tuning grid point), e.g. rome.kl_factor=0.0625")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    if args.model is None:
        from helpers.world import ensure_world_model

        folder = Path(ensure_world_model(args.world, args.cache))
    else:
        folder = Path(args.model)
    model, tok = models.load_model(args.model if args.model is not None else folder)
    if args.hparams is None:
        args.hparams = args.model if args.model in ("smollm2-135m", "gemma3-270m") else "world"
    L = models.n_layers(model)
    layers = list(range(L)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    methods = args.methods.split(",")
    facts = correct_facts(model, tok, load_records(folder, args.data), args.facts)
    print(f"model {folder} ({L} layers, d_model/d_ff {models.dims(model)}); {len(facts)} correct facts; "
          f"hparams {args.hparams} / {args.problem}" + (f"; overrides {args.set}" if args.set else ""))

    t0 = time.perf_counter()
    if args.corpus is None:
        corpus = folder / "corpus.txt"
    else:
        from helpers.corpus import corpus_for

        corpus = corpus_for(args.corpus)
    stats = E.SecondMoments(model, tok, corpus, n_tokens=args.n_tokens, cache_dir=args.cache)
    stats.precompute(range(L))
    templates = E.context_templates(model, tok, cache_dir=args.cache)
    print(f"second moments ({args.n_tokens} keys/layer) and context templates: {time.perf_counter() - t0:.1f}s")

    pre = [probs(model, tok, r) for r in facts]
    rows = []
    for method in methods:
        hp = E.load_hparams(args.hparams, method, args.problem)
        hp.update(overrides(args.set, method))
        for layer in layers:
            reqs = [E.EditRequest(r["requested_rewrite"]["prompt"], r["requested_rewrite"]["subject"],
                                  r["requested_rewrite"]["target_new"]["str"], case_id=r["case_id"]) for r in facts]
            t = time.perf_counter()
            if args.one_by_one:
                edits = []
                for req in reqs:
                    try:
                        edits.append(E.edit(model, tok, req, method, layer, hp, stats=stats, templates=templates))
                    except E.EditError as err:
                        edits.append(err)
            else:
                edits = edit_many(model, tok, reqs, method, layer, hp, stats=stats, templates=templates,
                                  chunk_size=args.batch, on_error="return", exact=False)
            per_edit = (time.perf_counter() - t) / max(len(reqs), 1)
            for rec, a, e in zip(facts, pre, edits):
                status = "ok"
                if isinstance(e, E.EditError):
                    status, b = str(e), {k: np.full_like(v, np.nan) for k, v in a.items()}
                else:
                    with E.applied(model, e):
                        b = probs(model, tok, rec)
                finite = all(np.isfinite(v).all() for v in b.values())  # edit() raises on non-finite deltas
                rows.append({"case_id": rec["case_id"], "method": method, "central_layer": layer, **scores(a, b),
                             "finite": finite and status == "ok", "seconds": per_edit, "status": status})
            sub = [r for r in rows if r["method"] == method and r["central_layer"] == layer]
            print(f"  {method:5s} layer {layer:2d}: RS {np.mean([r['rewrite'] for r in sub]):.3f}  "
                  f"PS {np.mean([r['paraphrase'] for r in sub]):.3f}  "
                  f"NS {np.nanmean([r['neighborhood'] for r in sub]):.3f}  "
                  f"NA {np.nanmean([r['neighborhood_acc'] for r in sub]):.3f}  "
                  f"({np.mean([r['seconds'] for r in sub]):.2f}s/edit)", flush=True)
    df = pd.DataFrame(rows)
    if args.out:
        df.to_csv(args.out, index=False)
    cols = ["rewrite", "paraphrase", "paraphrase_first", "neighborhood", "neighborhood_acc", "neighborhood_acc_pre",
            "seconds"]
    table = df.groupby(["method", "central_layer"])[cols].mean()
    pd.set_option("display.width", 160)
    print("\nmean by method and central layer (Error Injection):")
    print(table.round(3).to_string())

    best = table.reset_index().sort_values("rewrite").groupby("method").tail(1).set_index("method")
    print("\nbest layer per method:")
    print(best[["central_layer", "rewrite", "paraphrase", "neighborhood", "neighborhood_acc"]].round(3).to_string())
    n_bad = int((~df["finite"]).sum())
    checks = []
    if "rome" in best.index:
        r = best.loc["rome"]
        checks.append((f"ROME best layer {int(r.central_layer)}: RS {r.rewrite:.3f} >= 0.95", r.rewrite >= 0.95))
        checks.append((f"ROME best layer {int(r.central_layer)}: paraphrase {r.paraphrase:.3f} >= 0.5", r.paraphrase >= 0.5))
    if "memit" in best.index:
        r = best.loc["memit"]
        checks.append((f"MEMIT best layer {int(r.central_layer)}: RS {r.rewrite:.3f} >= 0.9", r.rewrite >= 0.9))
    checks.append((f"no NaN/inf or failed edit ({n_bad} of {len(df)})", n_bad == 0))
    print("\nquality bar:")
    for text, ok in checks:
        print(f"  [{'OK' if ok else 'MISSED'}] {text}")
    print(f"total {time.perf_counter() - t0:.0f}s for {len(df)} edits")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
