"""Hyperparameter grid on one model, loaded once (App. A's tuning: first passing facts, one layer, per problem).

Each ``--point`` is a method and its overrides of the family's hparams; every point edits the same facts at the
same layers through the production path (``editing.batched.edit_many``) and prints the quality bar's means
(rewrite, paraphrase, neighborhood score and accuracy; :mod:`edit_quality`), one line per point and layer:

    python benchmarks/tune_hparams.py --model smollm2-135m --data known --corpus wikitext --facts 20 --layers 6 \\
        --point "rome:kl_factor=0.0625" --point "rome:kl_factor=0.0625,v_num_grad_steps=30" \\
        --point "memit:mom2_update_weight=1500"

``--out`` appends every edit's row (with the point's text) to a CSV file, after each point and layer.

``--profile NAME`` tunes any of the five problems instead (App. A tunes each one): the facts are the profile's
kept facts (its ``01_data`` stage must have run; Fact Erasure keeps those with p(o_true) > .02), σ is the
profile's, and every point runs the production sweep (``helpers.sweep.run_cell``: the problem's target,
direction and input noise, its metrics) without essence texts, into ``results/<NAME>/tuning/<problem>/`` (a
re-run resumes each point where it stopped):

    python benchmarks/tune_hparams.py --profile smollm2 --problem fa --facts 100 --layers 6 \\
        --point "ft1:norm_constraint=1e-3" --point "ft1:norm_constraint=1e-2"

Every line prints the means of RS, PS, NS and S = their harmonic mean (ROME's CounterFact score; App. A's
choice here) and the seconds per edit (edit and evaluation).
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import edit_quality as Q  # noqa: E402

from helpers import editing as E  # noqa: E402
from helpers import models  # noqa: E402
from helpers.editing.batched import edit_many  # noqa: E402


#: --out's columns (a failed edit's row leaves the scores empty)
COLUMNS = ["point", "layer", "case_id", "status", "rewrite", "paraphrase", "paraphrase_first", "neighborhood",
           "neighborhood_acc", "neighborhood_acc_pre", "p_new_post", "seconds"]


def parse_point(text: str) -> tuple[str, dict]:
    """"rome:kl_factor=0.0625,v_num_grad_steps=30" -> ("rome", {...}) (values as YAML scalars)."""
    method, _, rest = text.partition(":")
    over = {}
    for item in filter(None, rest.split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--point {text!r}: expected METHOD:KEY=VALUE,...")
        val = yaml.safe_load(v)
        if isinstance(val, str):  # YAML 1.1 reads "1e-3" as text
            try:
                val = float(val)
            except ValueError:
                pass
        over[k.strip()] = val
    return method.strip(), over


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--profile", default=None, help="tune on this profile's facts, σ and sweep (any problem)")
    ap.add_argument("--results", default="results")
    ap.add_argument("--data", default="known")
    ap.add_argument("--corpus", default="wikitext")
    ap.add_argument("--n-tokens", type=int, default=100000)
    ap.add_argument("--hparams", default=None, help="family (default: the named model's)")
    ap.add_argument("--problem", default="error_injection")
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--skip", type=int, default=0, help="skip the first N passing facts")
    ap.add_argument("--layers", default="6")
    ap.add_argument("--point", action="append", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=".cache")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.profile:
        return tune_profile(args)
    if not args.model:
        ap.error("give --model (Error Injection on its passing facts) or --profile (any problem)")
    if args.problem not in ("error_injection", "ei"):
        ap.error("--model tunes Error Injection only; use --profile for the other problems")
    from helpers.corpus import corpus_for

    model, tok = models.load_model(args.model)
    family = args.hparams or args.model
    layers = [int(x) for x in args.layers.split(",")]
    facts = Q.correct_facts(model, tok, Q.load_records(Path("."), args.data), args.skip + args.facts)[args.skip:]
    points = [parse_point(p) for p in args.point]
    stats = E.SecondMoments(model, tok, corpus_for(args.corpus), n_tokens=args.n_tokens, cache_dir=args.cache)
    stats.precompute(sorted({l for m, _ in points for c in layers
                             for l in (models.window(c, 5, models.n_layers(model)) if m in ("memit", "ft5") else [c])}))
    templates = E.context_templates(model, tok, cache_dir=args.cache)
    pre = [Q.probs(model, tok, r) for r in facts]
    print(f"{args.model}: {len(facts)} passing facts (after {args.skip}), layers {layers}, problem {args.problem}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'point':55s} {'layer':>5s} {'RS':>6s} {'PS':>6s} {'NS':>6s} {'NA':>6s} {'s/edit':>7s}", flush=True)
    out = Path(args.out) if args.out else None
    for text, (method, over) in zip(args.point, points):
        hp = E.load_hparams(family, method, args.problem)
        hp.update(over)
        for layer in layers:
            reqs = [E.EditRequest(r["requested_rewrite"]["prompt"], r["requested_rewrite"]["subject"],
                                  r["requested_rewrite"]["target_new"]["str"], case_id=r["case_id"]) for r in facts]
            t = time.perf_counter()
            edits = edit_many(model, tok, reqs, method, layer, hp, stats=stats, templates=templates,
                              chunk_size=args.batch, on_error="return", exact=False)
            sec = (time.perf_counter() - t) / len(reqs)
            sub = []
            for rec, a, e in zip(facts, pre, edits):
                if isinstance(e, E.EditError):
                    sub.append({"point": text, "layer": layer, "case_id": rec["case_id"], "status": str(e)})
                    continue
                with E.applied(model, e):
                    b = Q.probs(model, tok, rec)
                sub.append({"point": text, "layer": layer, "case_id": rec["case_id"], "status": "ok",
                            **Q.scores(a, b), "seconds": sec})
            df = pd.DataFrame(sub)
            ok = df[df["status"] == "ok"]
            print(f"{text:55s} {layer:5d} {ok['rewrite'].mean():6.3f} {ok['paraphrase'].mean():6.3f} "
                  f"{ok['neighborhood'].mean():6.3f} {ok['neighborhood_acc'].mean():6.3f} {sec:7.2f}"
                  + (f"  ({len(df) - len(ok)} failed)" if len(ok) < len(df) else ""), flush=True)
            if out:  # after every (point, layer): an interrupted grid keeps what it measured
                df.reindex(columns=COLUMNS).to_csv(out, mode="a", header=not out.exists(), index=False)
    return 0


def tune_profile(args) -> int:
    """``--profile``: every point is one sweep cell (``helpers.sweep.run_cell``) on the profile's kept facts."""
    from helpers import sweep
    from helpers.data import erasure_filter
    from helpers.problems import get_problem
    from helpers.study import Study

    prob = get_problem(args.problem)
    results = Path(args.results) / args.profile
    if not (results / "facts.parquet").exists():
        raise SystemExit(f"--profile {args.profile}: no {results / 'facts.parquet'}; run its data stage first: "
                         f"python -m helpers run --profile {args.profile} --only 00 01")
    study = Study.open(args.profile, results, args.cache)
    facts = study.facts.iloc[args.skip : args.skip + args.facts]
    if prob.key == "fe":
        facts = erasure_filter(facts)
    layers = [int(x) for x in args.layers.split(",")]
    folder = results / "tuning" / prob.key
    print(f"{args.profile}: {len(facts)} kept facts (after {args.skip}), layers {layers}, problem {prob.name}, "
          f"sigma {study.sigma:.4g}, {torch.get_num_threads()} threads")
    print(f"{'point':55s} {'layer':>5s} {'RS':>6s} {'PS':>6s} {'NS':>6s} {'S':>6s} {'s/edit':>7s}", flush=True)
    for text in args.point:
        method, over = parse_point(text)
        cfg = study.cell_config(method, prob.key)
        cfg.layers, cfg.essence_samples, cfg.batch_size = layers, 0, args.batch
        cfg.hparams = {**cfg.hparams, **over}
        slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", text)
        keyed = method in ("rome", "memit")  # the methods that read second moments and context templates
        table = sweep.run_cell(study.model, study.tok, facts, cfg, folder / f"{slug}.parquet", folder,
                               stats=study.stats if keyed else None, templates=study.templates if keyed else None)
        scored = sweep.scored(table)
        for layer in layers:
            ok = scored[scored["central_layer"] == layer]
            n_bad = int((table["central_layer"] == layer).sum()) - len(ok)
            rs, ps, ns = (float(ok[c].mean()) for c in ("rewrite", "paraphrase", "neighborhood"))
            sec = float(table.loc[table["central_layer"] == layer, "seconds"].mean())
            # S: 0 when any mean score is 0 or below (statistics.harmonic_mean refuses negative values)
            s = statistics.harmonic_mean([max(x, 0.0) for x in (rs, ps, ns)])
            print(f"{text:55s} {layer:5d} {rs:6.3f} {ps:6.3f} {ns:6.3f} {s:6.3f} {sec:7.2f}"
                  + (f"  ({n_bad} failed)" if n_bad else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
