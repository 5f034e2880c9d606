"""``python -m helpers.world --preset default --report``: build (or reuse) a world model and report on it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from .presets import WORLD_PRESETS, ensure_world_model

    ap = argparse.ArgumentParser(prog="python -m helpers.world", description=__doc__)
    ap.add_argument("--preset", default="default", choices=sorted(WORLD_PRESETS))
    ap.add_argument("--cache-dir", default=None, help="cache root (default: helpers.pipeline.cache_dir() or .cache)")
    ap.add_argument("--report", action="store_true", help="print the quality report")
    ap.add_argument("--n-probe", type=int, default=150, help="facts in the enrichment probe")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache = args.cache_dir
    if cache is None:
        try:
            from ..pipeline import cache_dir

            cache = cache_dir()
        except Exception:  # pipeline not available
            cache = Path(".cache")
    folder = ensure_world_model(args.preset, cache)
    print(folder)
    if args.report:
        from .report import evaluate_world

        print(evaluate_world(folder, n_probe=args.n_probe).text())


if __name__ == "__main__":
    main()
