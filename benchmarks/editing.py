"""Editing throughput: the sweep's cell work (edit + post-edit evaluation) one fact at a time vs batched.

For every method and problem, the same (fact, central layer) cells are run both ways in one process:

- one-fact: ``editing.edit`` then ``evaluation.measure`` under ``editing.applied`` (what ``sweep.run_cell`` does);
- batched: ``batched.edit_many`` over all facts of a layer (chunks of ``--chunk``, the facts in the sweep's order:
  by the positions their rows need, so that a chunk pads little), then ``batched.measure_many`` with per-example
  edits.

Prints edits/s both ways, their ratio, the largest relative difference of the post-edit probabilities between
the two ways (fast mode, what the sweep runs: float rounding, ~1e-5; ``--exact``: 0 up to the evaluation's own
float rounding), and peak memory (max RSS after each
phase; the one-fact phase runs first). Setup (statistics, templates, tasks, essence texts) is not timed.

    OMP_NUM_THREADS=1 python benchmarks/editing.py                      # default world (if cached) else smoke
    OMP_NUM_THREADS=1 python benchmarks/editing.py --model PATH --facts 32 --layers 3 --methods rome,ft1
    python benchmarks/editing.py --model smollm2-135m --data known --corpus wikitext --no-loop --threads 2

Distance to the limit: for the batched phase, the seconds per edit of the edit alone (``edit_many``; the
evaluation is timed apart) are printed beside a lower bound for the same work (:mod:`edit_bound`: the
floating-point operations of the matrix products the spec's steps need, at this machine's float32 GEMM
throughput measured in the same run on products of the same shapes) and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import edit_bound  # noqa: E402
from tracing import cpu_model as cpu_name, print_device  # noqa: E402  (benchmarks/tracing.py)

from helpers import data, editing, evaluation, models, pipeline
from helpers.checkpoints import NAMED_MODELS
from helpers.tracing_noise import noise_sigma
from helpers.editing import batched
from helpers.problems import get_problem, make_task


def sync(model) -> None:
    """Wait for the model's device (asynchronous GPU kernels) before a clock is read."""
    if models.device_of(model).type == "cuda":
        torch.cuda.synchronize(models.device_of(model))


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def pick_model(args) -> Path | str:
    if args.model:
        return args.model if args.model in NAMED_MODELS else Path(args.model)
    from helpers.world import ensure_world_model, world_folder

    cache = pipeline.cache_dir()
    default = world_folder("default", cache)
    if (default / "world.json").exists():
        return Path(ensure_world_model("default", cache))
    print(f"default world not cached at {default}; using the smoke world (trained if missing)")
    return Path(ensure_world_model("smoke", cache))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder with counterfact.json and corpus.txt")
    ap.add_argument("--facts", type=int, default=32)
    ap.add_argument("--layers", default="mid", help="comma-separated central layers, 'mid' or 'all'")
    ap.add_argument("--methods", default="rome,memit,ft1,ft5")
    ap.add_argument("--problems", default="ei", help="comma-separated problem keys (ei,tr,fe,fa,ff)")
    ap.add_argument("--hparams", default=None, help="hparams family (default: world, or the named model's)")
    ap.add_argument("--data", default=None, help="records: the model folder's counterfact.json (default), 'known' "
                    "(ROME's known facts) or a CounterFact-schema JSON file")
    ap.add_argument("--corpus", default=None, help="second-moment corpus: the folder's corpus.txt (default), "
                    "'wikitext', 'wikitext-slice' or a text file")
    ap.add_argument("--no-loop", action="store_true", help="skip the one-fact phase (batched phase and bound only)")
    ap.add_argument("--chunk", type=int, default=8, help="facts per edit_many call (the sweep's batch_size: 8)")
    ap.add_argument("--exact", action="store_true",
                    help="edit_many(exact=True): bitwise the one-fact path (default: fast mode, as the sweep: one "
                         "padded pass per step, ROME/MEMIT recompute only suffixes; float-level parity)")
    ap.add_argument("--essence", type=int, default=5, help="essence texts per fact (0: none)")
    ap.add_argument("--n-tokens", type=int, default=20000)
    ap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda): a profile's `device`; on a GPU "
                    "the bound's matrix-product rates are measured on it")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attn", default=None, choices=["sdpa", "eager"],
                    help="transformers' attention function (default: its default, sdpa; eager is faster for short "
                         "passes on a CPU but not thread-count invariant)")
    ap.add_argument("--loop-reuse", action="store_true",
                    help="let the one-fact path reuse the layers below the edit too (default: off, the naive path)")
    ap.add_argument("--bf16", action="store_true",
                    help="also run the batched phase under torch.autocast(bfloat16) (AMX/AVX-512 matrix products) "
                         "and print its speed and its difference from float32")
    ap.add_argument("--no-batched-reuse", action="store_true",
                    help="batched path without reusing the layers below the edit (to isolate batching)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    folder = pick_model(args)
    model, tok = models.load_model(folder, attn_implementation=args.attn)
    model.to(args.device)
    if args.hparams is None:
        args.hparams = args.model if args.model in NAMED_MODELS else "world"
    L = models.n_layers(model)
    layers = ([L // 2] if args.layers == "mid" else list(range(L)) if args.layers == "all"
              else [int(x) for x in args.layers.split(",")])
    source = pipeline.known_data() if args.data == "known" else (args.data or folder)
    facts = data.to_frame(data.load_counterfact(source, args.facts))
    fact_rows = [row for _, row in facts.iterrows()]
    methods, problems = args.methods.split(","), args.problems.split(",")
    cache = pipeline.cache_dir()
    if args.corpus is None:
        corpus = Path(folder) / "corpus.txt"
    else:
        from helpers.corpus import corpus_for

        corpus = corpus_for(args.corpus)
    stats = editing.SecondMoments(model, tok, corpus, n_tokens=args.n_tokens, cache_dir=cache,
                                  progress=False)
    stats.precompute(sorted({l for c in layers for l in models.window(c, 5, L)}))  # what ROME/MEMIT/FT read
    templates = editing.context_templates(model, tok, cache_dir=cache)
    sigma = 0.1 if args.data is None else noise_sigma(model, tok, list(facts["subject"]))
    print(f"model {folder} ({L} layers, d_model/d_ff {models.dims(model)}); {len(fact_rows)} facts x layers "
          f"{layers}; methods {methods}; problems {problems}; chunk {args.chunk}; "
          f"mode {'exact' if args.exact else 'fast'}; attention {model.config._attn_implementation}; "
          f"threads {torch.get_num_threads()}; reuse below the edit: "
          f"one-fact {'on' if args.loop_reuse else 'off'}, batched {'off' if args.no_batched_reuse else 'on'}")

    cells = {}  # (problem, method) -> tasks, hparams
    essences = (evaluation.essence_texts_many(model, tok, [f["subject"] for f in fact_rows],
                                              [int(f["case_id"]) for f in fact_rows], n=args.essence)
                if args.essence else [None] * len(fact_rows))
    for pr in problems:
        tasks = [make_task(model, tok, f, pr, sigma) for f in fact_rows]
        for m in methods:
            cells[(pr, m)] = (tasks, editing.load_hparams(args.hparams, m, get_problem(pr).key))
    # One-time work per (statistics, layer), shared by every fact a study edits there: C^-1 (ROME) and the LU
    # factors of lambda C (MEMIT). Done here, timed and printed, so that seconds per edit are the steady state.
    from helpers.editing.batched_rome_memit import _lam_c_lu

    t_setup = time.perf_counter()
    for (pr, m), (_, hp) in cells.items():
        for c in layers:
            for l in editing.edit_layers(model, m, c, hp):
                if m == "rome" and getattr(editing.hparams_for(m, hp), "mom2_adjustment", False):
                    stats.inverse(l)
                elif m == "memit":
                    _lam_c_lu(stats, l, editing.hparams_for(m, hp).mom2_update_weight)
    print(f"one-time per-layer setup (C^-1 for ROME, LU of lambda C for MEMIT; amortised over every fact a study "
          f"edits at a layer, so not counted per edit): {time.perf_counter() - t_setup:.1f} s")
    rss0 = maxrss_mb()

    results = {}
    from helpers import hooks

    hooks.REUSE_BELOW = args.loop_reuse
    for (pr, m), (tasks, hp) in cells.items():  # one fact at a time
        if args.no_loop:
            continue
        t0 = time.perf_counter()
        out = []
        for layer in layers:
            for t, f, es in zip(tasks, fact_rows, essences):
                e = editing.edit(model, tok, t.request, m, layer, hp, stats=stats, templates=templates)
                with editing.applied(model, e):
                    out.append(evaluation.measure(model, tok, t, f, es))
        results[(pr, m, "loop")] = (time.perf_counter() - t0, out)
    rss_loop = maxrss_mb()
    hooks.REUSE_BELOW = not args.no_batched_reuse
    edit_time: dict = {}  # (problem, method) -> seconds in edit_many alone
    made: dict = {}  # (problem, method) -> [(layer, task, edit)]

    def run_batched(tasks, m, hp, key=None):
        # chunks as the sweep cuts them (helpers.sweep.in_batch_order): facts ordered by the positions their rows
        # need, so that a chunk's passes pad little; results handed back in the facts' own order
        order = batched.batch_order(tok, [t.request for t in tasks], m)
        tasks_o, rows_o, ess_o = ([xs[k] for k in order] for xs in (tasks, fact_rows, essences))
        out = []
        for layer in layers:
            sync(model)
            t = time.perf_counter()
            edits = batched.edit_many(model, tok, [t.request for t in tasks_o], m, layer, hp, stats=stats,
                                      templates=templates, chunk_size=args.chunk, exact=args.exact)
            sync(model)
            if key is not None:
                edit_time[key] = edit_time.get(key, 0.0) + time.perf_counter() - t
                made.setdefault(key, []).extend((layer, tk, e) for tk, e in zip(tasks_o, edits))
            got = []
            for i in range(0, len(tasks_o), args.chunk):
                sl = slice(i, i + args.chunk)
                got += batched.measure_many(model, tok, tasks_o[sl], rows_o[sl], edits[sl], ess_o[sl])
            back = [None] * len(got)
            for j, k in enumerate(order):
                back[k] = got[j]
            out += back
        return out

    for (pr, m), (tasks, hp) in cells.items():  # batched
        t0 = time.perf_counter()
        out = run_batched(tasks, m, hp, key=(pr, m))
        results[(pr, m, "batched")] = (time.perf_counter() - t0, out)
    rss_batched = maxrss_mb()
    if args.bf16:
        for (pr, m), (tasks, hp) in cells.items():  # batched, bfloat16 matrix products
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = run_batched(tasks, m, hp)
            results[(pr, m, "bf16")] = (time.perf_counter() - t0, out)

    n = len(fact_rows) * len(layers)
    print_bound(model, tok, cells, made, edit_time, results, templates, n, len(fact_rows), args.chunk)
    if args.no_loop:
        print(f"\npeak RSS: setup {rss0:.0f} MB, after the batched phase {rss_batched:.0f} MB; "
              f"CPU {cpu_name()}, {torch.get_num_threads()} threads")
        print_device(model)
        return 0
    print(f"\n{'problem':8s} {'method':6s} {'edits':>5s} {'loop e/s':>9s} {'batched e/s':>11s} {'ratio':>6s} "
          f"{'max rel diff p_post':>19s}")
    ratios = []
    for (pr, m) in cells:
        t1, o1 = results[(pr, m, "loop")]
        t2, o2 = results[(pr, m, "batched")]
        diff = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for a, b in zip(o2, o1) for k in ("rewrite", "rewrite_base"))
        diff = max(diff, max((abs(x - y) / max(abs(y), 1e-30) for a, b in zip(o2, o1)
                             for x, y in zip(a["paraphrase"] + a["neighborhood"], b["paraphrase"] + b["neighborhood"])),
                            default=0.0))
        ratios.append(t1 / t2)
        print(f"{pr:8s} {m:6s} {n:5d} {n / t1:9.2f} {n / t2:11.2f} {t1 / t2:6.2f} {diff:19.2e}")
    t_loop = sum(v[0] for k, v in results.items() if k[2] == "loop")
    t_b = sum(v[0] for k, v in results.items() if k[2] == "batched")
    N = n * len(cells)
    print(f"{'all':8s} {'':6s} {N:5d} {N / t_loop:9.2f} {N / t_b:11.2f} {t_loop / t_b:6.2f}")
    if args.bf16:
        print(f"\nbatched under bfloat16 autocast vs float32 (same cells):\n{'problem':8s} {'method':6s} "
              f"{'fp32 e/s':>9s} {'bf16 e/s':>9s} {'ratio':>6s} {'max |p_post diff|':>17s}")
        for (pr, m) in cells:
            t2, o2 = results[(pr, m, "batched")]
            t3, o3 = results[(pr, m, "bf16")]
            d = max(abs(a["rewrite"] - b["rewrite"]) for a, b in zip(o3, o2))
            print(f"{pr:8s} {m:6s} {n / t2:9.2f} {n / t3:9.2f} {t2 / t3:6.2f} {d:17.2e}")
    print(f"\npeak RSS: setup {rss0:.0f} MB, after the one-fact phase {rss_loop:.0f} MB, "
          f"after the batched phase {rss_batched:.0f} MB")
    print(f"geometric-mean speed-up {float(np.exp(np.mean(np.log(ratios)))):.2f}x")
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads")
    print_device(model)
    return 0


def print_bound(model, tok, cells, made, edit_time, results, templates, n, facts_per_layer, chunk) -> None:
    """Seconds per edit of ``edit_many`` against the matrix-product lower bound (:mod:`edit_bound`)."""
    works = {}
    for (pr, m), (_, hp) in cells.items():
        n_t = len(templates.rome) if m == "rome" else sum(len(g) for g in templates.memit)
        works[(pr, m)] = [edit_bound.edit_flops(
            model, tok, tk.request, m, layer, hp, n_templates=n_t,
            updates=int(e.info.get("updates", 0)) if isinstance(e, editing.Edit) else 0,
            noised=tk.request.noise is not None and tk.request.noise.sigma != 0,
            facts_per_layer=facts_per_layer,
            context=templates.flat(m)) for layer, tk, e in made[(pr, m)]]
    # The products of one optimisation pass have (rows of one fact's pass) x (facts in a chunk) rows; each cell's
    # bound uses this machine's GEMM speed at its own median row count (small products run below peak, and
    # that is part of the bound: the spec's steps cannot make them larger).
    def rows_per_chunk(field: str) -> dict:  # per cell: the median of one edit's rows x chunk
        return {k: int(np.median([getattr(w, field) for w in ws])) * chunk for k, ws in works.items()}

    cell_rows = rows_per_chunk("pass_rows")
    dev = models.device_of(model)
    unemb = edit_bound.unembed_shape(model)
    block_shapes = set(edit_bound.linear_shapes(models.module(model, "block", 0)))
    # the blocks' products (the unembedding, unless a block has its shape, is timed at its own rows below)
    shapes = sorted({s for ws in works.values() for w in ws for s in w.rows if s != unemb or s in block_shapes})
    L = models.n_layers(model)
    rates = {r: edit_bound.matmul_rate(shapes, max(r, 1), device=dev) for r in sorted(set(cell_rows.values()))}
    streams = {r: edit_bound.matmul_rate(shapes, max(r, 1), repeats=5, device=dev, distinct=L) for r in rates}
    print("\nfloat32 GEMM throughput on the edits' shapes (GFLOP/s; rows = median rows of one pass x chunk "
          f"{chunk}), one weight in cache / cycling through {L} weights of the shape as a pass does:")
    for r, rate in rates.items():
        print(f"  {r:6d} rows: " + ", ".join(f"{i}x{o} {v / 1e9:.0f} / {streams[r][(i, o)] / 1e9:.0f}"
                                            for (i, o), v in rate.items()))
    # The unembedding at its own rows (the read positions of a chunk's pass), unless a block has its shape
    own = {k: {} for k in cell_rows}  # per cell: the unembedding's rate at its own rows (one weight: both bounds)
    if unemb not in block_shapes:
        u_rows = rows_per_chunk("unembed_rows")
        u_rates = {r: edit_bound.matmul_rate([unemb], max(r, 1), device=dev)[unemb] for r in sorted(set(u_rows.values()))}
        print(f"  unembedding {unemb[0]}x{unemb[1]} at its own rows (read positions x chunk {chunk}): "
              + ", ".join(f"{r} rows {v / 1e9:.0f}" for r, v in u_rates.items()))
        own = {k: {unemb: u_rates[u_rows[k]]} for k in cell_rows}
    cell_rates = {k: {**rates[r], **own[k]} for k, r in cell_rows.items()}
    cell_streams = {k: {**streams[r], **own[k]} for k, r in cell_rows.items()}
    print("bound: the products' flops at the in-cache rate; stream bound: at the cycling rate (the unembedding, one "
          "weight, at its own rate in both)")
    print(f"{'problem':8s} {'method':6s} {'edits':>5s} {'s/edit':>8s} {'bound s':>8s} {'ratio':>6s} "
          f"{'stream s':>8s} {'ratio':>6s} {'GFLOP/edit':>10s} {'eval s/edit':>11s}")
    for (pr, m) in cells:
        ws = works[(pr, m)]
        bound = sum(edit_bound.bound_seconds(w, cell_rates[(pr, m)]) for w in ws) / len(ws)
        stream = sum(edit_bound.bound_seconds(w, cell_streams[(pr, m)]) for w in ws) / len(ws)
        gflop = sum(w.flops for w in ws) / len(ws) / 1e9
        te = edit_time[(pr, m)] / n
        tv = (results[(pr, m, "batched")][0] - edit_time[(pr, m)]) / n
        print(f"{pr:8s} {m:6s} {n:5d} {te:8.3f} {bound:8.3f} {te / bound:6.2f} {stream:8.3f} {te / stream:6.2f} "
              f"{gflop:10.2f} {tv:11.3f}")


if __name__ == "__main__":
    sys.exit(main())
