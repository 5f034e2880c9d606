"""Causal-tracing speed: the fast path against the one-site-at-a-time reference path, side by side in one run.

    python benchmarks/tracing.py                       # the world model if helpers.world exists, else a random GPT-2
    python benchmarks/tracing.py --model PATH --facts 10 --windows 5 --kind mlp
    python benchmarks/tracing.py --model smollm2-135m --data known --facts 8 --windows 10 --repeats 1 --threads 2

--model PATH is a saved model folder (config, tokenizer, safetensors). When it does not exist, a random GPT-2
(--layers/--d-model) with a byte-level BPE tokenizer trained on synthetic sentences is saved there first.
Without --model, the embedded world model (``helpers.world.ensure_world_model("default", cache_dir)``) is used
when importable, else the random model under ``.cache/bench/tracing-gpt2-L{layers}-d{d_model}``.
Facts: --facts-file (a facts.parquet or a counterfact.json), else the model folder's counterfact.json (world
models have one), else synthetic CounterFact-like facts (subjects at the start and in the middle of prompts).

Prints facts/s of both paths, their ratio, and the largest |p_fast - p_reference| over the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers import tracing
from helpers.models import dims, load_model, n_layers

SUBJECTS = [
    "Danielle Darrieux", "Toko Yasuda", "Edwin of Northumbria", "Apple A5", "Kalvorin Destrahe", "Miro Tannenhall",
    "Ostrava Quellmark", "Brennhilde Vaskar", "Pelagio Umberfeld", "Sanvi Oruktan", "Lusandro Petrike", "Halvard Rimsey",
]
TEMPLATES = [
    ("The mother tongue of {} is", "French"),
    ("{} is a native speaker of", "Dutch"),
    ("{} was born in the city of", "Rome"),
    ("The headquarters of {} are located in", "Berlin"),
    ("{}, who is a citizen of", "Canada"),
    ("In which city did {} work? The answer is", "Tokyo"),
]


def cpu_model() -> str:
    """The CPU's model name (Linux), for the record of where the figures were measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def synthetic_facts(n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        template, target = TEMPLATES[i % len(TEMPLATES)]
        rows.append({"case_id": i, "subject": SUBJECTS[i % len(SUBJECTS)], "prompt": template, "target_true": target})
    return pd.DataFrame(rows)


def load_facts(args) -> pd.DataFrame:
    from helpers.data import load_counterfact, to_frame

    src = args.facts_file
    if src is None and args.data == "known":
        from helpers.pipeline import known_data

        src = known_data()
    if src is None and args.model is not None and (Path(args.model) / "counterfact.json").exists():
        src = args.model / "counterfact.json"
    if src is None:
        return synthetic_facts(args.facts)
    if str(src).endswith(".parquet"):
        return pd.read_parquet(src)
    return to_frame(load_counterfact(src, n=args.facts))


def make_random_gpt2(path: Path, n_layer: int, d_model: int, seed: int = 0) -> None:
    """Save a random-init GPT-2 and a byte-level BPE tokenizer trained on synthetic sentences to ``path``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [t.replace("{}", s) + " " + o for s in SUBJECTS for t, o in TEMPLATES] * 5
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=2048, min_frequency=1, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=d_model, n_layer=n_layer,
                     n_head=max(1, d_model // 32), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    path.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def default_model(args) -> tuple[object, object, str]:
    from helpers.pipeline import cache_dir

    try:
        from helpers.world import ensure_world_model
    except ImportError:
        ensure_world_model = None
    if ensure_world_model is not None:
        got = ensure_world_model("default", cache_dir())
        if isinstance(got, tuple):
            return got[0], got[1], "world model (default)"
        args.model = Path(got)
        return (*load_model(got), f"world model {got}")
    path = Path(cache_dir()) / "bench" / f"tracing-gpt2-L{args.layers}-d{args.d_model}"
    return (*_load_or_make(path, args), f"random GPT-2 {path}")


def _load_or_make(path: Path, args):
    if not (path / "config.json").exists():
        make_random_gpt2(path, args.layers, args.d_model)
    return load_model(path)


def print_device(model) -> None:
    """The GPU and its peak memory, when the model ran on one."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        print(f"device {torch.cuda.get_device_name(dev)}, peak GPU memory "
              f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a named model (smollm2-135m, gemma3-270m), a hub name or a saved "
                    "model folder (a missing folder is created as a random GPT-2)")
    ap.add_argument("--data", default=None, help="'known': ROME's known facts (else --facts-file or synthetic facts)")
    ap.add_argument("--facts", type=int, default=10, help="number of facts")
    ap.add_argument("--facts-file", type=Path, default=None, help="facts.parquet to take the facts from")
    ap.add_argument("--kind", default="mlp", choices=list(tracing.KINDS))
    ap.add_argument("--windows", default="5", help="comma-separated window sizes")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each path, interleaved (fast, reference, fast, ...); medians are reported")
    ap.add_argument("--layers", type=int, default=8, help="layers of the random GPT-2 (default: the world model's)")
    ap.add_argument("--d-model", type=int, default=128, help="width of the random GPT-2 (default: the world model's)")
    ap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda): a profile's `device`")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    windows = [int(w) for w in args.windows.split(",")]

    if args.model is not None:
        from helpers.checkpoints import NAMED_MODELS

        named = args.model in NAMED_MODELS or str(args.model).endswith(".gguf")
        model, tok = load_model(args.model) if named else _load_or_make(Path(args.model), args)
        label = str(args.model)
    else:
        model, tok, label = default_model(args)
    model.to(args.device)
    facts = load_facts(args).head(args.facts)
    sigma = tracing.noise_sigma(model, tok, facts["subject"].tolist())
    kw = dict(kinds=[args.kind], windows=windows, sigma=sigma, progress=False, on_missing="skip")

    tracing.trace_facts(model, tok, facts.head(1), method="fast", **kw)  # warm-up
    # The fast path takes a few seconds, so one timing is at the mercy of the machine; time both paths
    # several times, interleaved so that both see the same conditions, and compare the medians.
    times: dict[str, list[float]] = {"fast": [], "reference": []}
    tables: dict[str, pd.DataFrame] = {}
    for _ in range(max(1, args.repeats)):
        for method in times:
            t0 = time.perf_counter()
            tables[method] = tracing.trace_facts(model, tok, facts, method=method, **kw)
            times[method].append(time.perf_counter() - t0)
    fast, ref = tables["fast"], tables["reference"]
    t_fast, t_ref = float(np.median(times["fast"])), float(np.median(times["reference"]))
    ratios = [r / f for f, r in zip(times["fast"], times["reference"])]

    n = fast["case_id"].nunique()
    per = fast.groupby("case_id").agg(T=("seq_len", "first"), b=("subj_begin", "first")).mean()
    diff = (fast["p_restored"] - ref["p_restored"]).abs().max()
    print(f"cpu: {cpu_model()}, torch threads {torch.get_num_threads()}")
    print_device(model)
    print(f"model: {label} ({n_layers(model)} layers, {dims(model)[0]} wide, {model.dtype}), threads {args.threads}")
    print(f"facts: {n}, kind {args.kind}, windows {windows}, mean prompt tokens T={per['T']:.1f}, "
          f"mean subject start b={per['b']:.1f} (work bound 4T/(T-b) ~ {4 * per['T'] / (per['T'] - per['b']):.1f})")
    print(f"fast path:      {n / t_fast:8.3f} facts/s  (median of {len(times['fast'])}: {t_fast:.2f} s)")
    print(f"reference path: {n / t_ref:8.3f} facts/s  (median of {len(times['reference'])}: {t_ref:.2f} s)")
    print(f"ratio fast/reference: {t_ref / t_fast:.1f}x (per repeat {min(ratios):.1f}-{max(ratios):.1f}x)   "
          f"max |p_fast - p_ref| = {diff:.2e}")


if __name__ == "__main__":
    main()
