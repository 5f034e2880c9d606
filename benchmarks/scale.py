"""Scale-out: the same editing cells in this process and on Ray, measured side by side in one run.

Runs each cell (method x Error Injection, the first ``--facts`` kept facts of the profile x ``--layers``) three ways,
each into a fresh results folder so nothing is reused between them:

- local, 1 thread: ``sweep.run_cell`` in this process (the default executor);
- Ray, 1 worker x 1 thread;
- Ray, ``--workers`` workers x 1 thread.

It prints edits/s of each, the speed-up of the pool over one Ray worker (target 1.7x or more on 2 cores), the
overhead of the Ray path over the local one with one worker (time ratio), the pool's start-up time (Ray and the
actors loading the model; not in the edits/s), and the largest difference between the tables' post-edit
probabilities (float rounding only). Pre-edit quantities, statistics and templates are computed once beforehand.

    python benchmarks/scale.py                                  # SmolLM2 profile (needs results/smollm2/facts.parquet)
    python benchmarks/scale.py --profile smoke --facts 8 --methods ft1,rome
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tracing import cpu_model  # noqa: E402  (benchmarks/tracing.py)

from helpers import editing, pipeline, scaleout, sweep  # noqa: E402
from helpers.scaleout import ExecutorConfig, WorkerSpec  # noqa: E402
from helpers.study import Study  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smollm2")
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--layers", default="6,12")
    ap.add_argument("--methods", default="ft1,rome")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="facts per unit (the cells' batch_size)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    prof = pipeline.load_profile(args.profile)
    facts_file = pipeline.results_dir(prof) / "facts.parquet"
    if not facts_file.exists():
        sys.exit(f"{facts_file} is missing: run `python -m helpers run --profile {args.profile} --only 01_data` first")
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    try:
        base = work / "base"
        base.mkdir()
        shutil.copy(facts_file, base / "facts.parquet")
        for side in facts_file.parent.glob(".facts.parquet.*"):  # its integrity record
            shutil.copy(side, base)
        study = Study.open(args.profile, base, pipeline.cache_dir())
        facts = study.facts.head(args.facts)
        layers = [int(x) for x in args.layers.split(",")]
        methods = args.methods.split(",")
        print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; profile {args.profile}; {len(facts)} facts x layers "
              f"{layers}; Error Injection; {args.batch} fact(s) per unit")
        cells = []
        for m in methods:
            hp = study.hparams(m, "ei")
            needs = m in ("rome", "memit")
            if needs:
                study.stats.precompute(sorted({l for c in layers for l in editing.edit_layers(study.model, m, c, hp)}))
                _ = study.templates
            cells.append((m, sweep.CellConfig(m, "ei", layers, hp, sigma=study.sigma, batch_size=args.batch), needs))
        sweep.pre_edit(study.model, study.tok, facts, "ei", study.sigma, base)  # once, shared, not timed

        def run(label: str, executor) -> tuple[float, list]:
            out = work / label
            shutil.copytree(base / "pre", out / "pre")
            t0, tabs = time.perf_counter(), []
            for m, cfg, needs in cells:
                tabs.append(sweep.run_cell(study.model, study.tok, facts, cfg, out / f"{m}.parquet", out,
                                           stats=study.stats if needs else None,
                                           templates=study.templates if needs else None, executor=executor))
            return time.perf_counter() - t0, tabs

        n_edits = len(facts) * len(layers) * len(cells)
        results = {}
        t_local, tabs_local = run("local", None)
        results["local, 1 thread"] = (t_local, 0.0)
        ref = _probs(tabs_local)
        diffs = []
        for label, workers in (("Ray, 1 worker", 1), (f"Ray, {args.workers} workers", args.workers)):
            folder = f"ray{workers}"
            cfg = ExecutorConfig(kind="ray", workers=workers, threads_per_worker=1, facts_per_unit=args.batch)
            ex = scaleout.RayExecutor(cfg, WorkerSpec(str(study.profile.path), str(work / folder), str(study.cache)))
            t0 = time.perf_counter()
            ex._start()
            import ray

            ray.get([a.ready.remote() for a in ex._actors])  # the actors have opened the study
            setup = time.perf_counter() - t0
            dt, tabs = run(folder, ex)
            ex.close()
            ray.shutdown()  # the next pool starts a cluster of its own size
            results[label] = (dt, setup)
            diffs.append(float(np.max(np.abs(_probs(tabs) - ref))))
        print(f"{'path':24s} {'seconds':>8s} {'edits/s':>8s} {'start-up s':>10s}")
        for label, (dt, setup) in results.items():
            print(f"{label:24s} {dt:8.1f} {n_edits / dt:8.3f} {setup:10.1f}")
        one, many = results["Ray, 1 worker"][0], results[f"Ray, {args.workers} workers"][0]
        print(f"speed-up, {args.workers} workers over 1: {one / many:.2f}x (target >= 1.7x on 2 cores)")
        print(f"overhead of the Ray path, 1 worker: {one / t_local:.3f}x the local path's time")
        print(f"max |p_post difference| against the local path: {max(diffs):.2e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _probs(tabs) -> np.ndarray:
    rows = [t.sort_values(sweep.KEY) for t in tabs]
    return np.concatenate([np.concatenate([r["rewrite_post"].to_numpy(dtype=float),
                                           np.concatenate(r["paraphrase_post"].map(list).tolist())]) for r in rows])


if __name__ == "__main__":
    main()
