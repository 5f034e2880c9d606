"""Is the second-moment sample big enough? C = E[k k^T] from half the keys against all of them (issue 19, item 4).

For each layer: the number of key vectors against the key dimension d_ff, the relative Frobenius difference of
the two estimates, and the cosine between ROME's left vector u = C^-1 k computed with either, for the keys of
real subjects (the down-projection input at the last subject token of known facts) and for random keys (a harsh
probe that weights the poorly estimated low-variance directions).

    python benchmarks/stats_stability.py --model smollm2-135m --corpus wikitext --tokens 100000 --layers 3,12
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from helpers import models
from helpers.corpus import corpus_for, stability


def subject_prompts(n: int) -> list[str]:
    """The first ``n`` known facts' prompts cut after the subject (their last token is the last subject token)."""
    from helpers.pipeline import known_data

    out = []
    for r in json.loads(known_data().read_text())[:n]:
        rw = r["requested_rewrite"]
        out.append(rw["prompt"][: rw["prompt"].index("{}")] + rw["subject"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="wikitext")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--layers", default="3,12")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random", action="store_true", help="also probe with random keys (twice the time)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model, tok = models.load_model(args.model)
    docs = corpus_for(args.corpus)
    prompts = subject_prompts(16)
    print(f"model {args.model}, corpus {args.corpus} ({len(docs)} documents), {args.tokens} keys per layer")
    for layer in [int(x) for x in args.layers.split(",")]:
        t0 = time.perf_counter()
        real = stability(model, tok, docs, layer, args.tokens, prompts=prompts)
        rand = stability(model, tok, docs, layer, args.tokens) if args.random else None
        print(f"layer {layer:2d}: {real.n_tokens} keys, d_ff {real.d_ff} ({real.tokens_per_dim:.0f} keys per "
              f"dimension); ||C_half - C_all|| / ||C_all|| = {real.rel_frobenius:.4f}; cos(u_half, u_all): subject "
              f"keys min {real.min_cosine:.4f} mean {np.mean(real.cosines):.4f}"
              + (f", random keys min {rand.min_cosine:.4f}" if rand else "")
              + f"; ridge {'yes' if real.ridge or (rand and rand.ridge) else 'no'} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
