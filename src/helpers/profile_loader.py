"""Profiles (YAML, ``src/helpers/profiles/``): their defaults, loading and validation, and what a profile resolves
to: the project, cache and results folders, the model and the CounterFact data it studies."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent

# Default sections; a profile overrides what it names.
DEFAULTS: dict[str, Any] = {
    "description": "",
    "model": "world",  # "world"; a named model (smollm2-135m, gemma3-270m); a .gguf file; a hub name; a folder
    "world": "default",  # world preset when model == "world"
    "data": "world",  # "world"; "known" = ROME's known facts as CounterFact records; "official"; or a path
    "n_records": 2000,  # candidate records: the first N (SCIENCE.md §1.3)
    "max_facts": None,  # cap on kept (correct) facts used downstream; None = all
    "correctness_filter": True,  # keep only facts the model completes correctly (SCIENCE.md §1.3)
    "seed": 0,
    "device": "cpu",
    "tracing": {"windows": [1, 3, 5, 10], "kinds": ["mlp"], "samples": 10, "noise": "auto", "illustrative": 3},
    "editing": {
        "methods": ["ft1", "ft5", "rome", "memit"],
        "problems": ["ei", "tr", "fe", "fa", "ff"],
        "layers": "all",  # "all" or a list of 0-based central layers
        "facts": 100,  # first N kept facts are edited (None = all)
        "hparams": None,  # hparams family (src/helpers/hparams/<name>.yaml); None = from the model
        "corpus": None,  # text file for second moments; None = the world corpus
        "stats_tokens": 20000,  # keys sampled per layer for the second moments
        "batch_size": 8,  # facts edited together per layer (results equal one-at-a-time editing)
        "exact": False,  # True: bitwise one-at-a-time results (~1.8x slower); False: equal up to float rounding
    },
    "analysis": {"window": 5, "n_boot": 200},
    # second moments and unrelated sentences of a real model: "wikitext" (the shared WikiText-2 train split
    # where present, else the vendored slice), "wikitext-slice", or a text file (one document per line)
    "stats": {"corpus": None, "tokens": None},
    # how tracing and the editing sweep run (helpers.scaleout): "local" (this process) or "ray" (a pool of actors,
    # on a local Ray cluster when address is None, else on the running cluster at address)
    "executor": {"kind": "local", "address": None, "workers": 2, "threads_per_worker": 1, "gpus_per_worker": 0,
                 "facts_per_unit": None, "layers_per_unit": None, "retries": 1},
    "stages": None,  # None = every notebook; else the stage-name prefixes to run, e.g. [01_data, 02_tracing]
}


@dataclass
class Profile:
    """A parsed profile. ``raw`` is the merged dict; the attributes are its top-level keys."""

    name: str
    path: Path
    raw: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        raw = self.__dict__.get("raw", {})
        if key in raw:
            return raw[key]
        raise AttributeError(key)

    @property
    def uses_world(self) -> bool:
        return self.raw["model"] == "world"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def profiles_dir() -> Path:
    return PACKAGE_DIR / "profiles"


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a profile by name (``src/helpers/profiles/<name>.yaml``) or by path to a YAML file."""
    p = Path(name_or_path)
    path = p if p.suffix in (".yaml", ".yml") and p.exists() else profiles_dir() / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no profile {name_or_path!r}; known profiles: {', '.join(list_profiles())}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - set(DEFAULTS) - {"name"}
    if unknown:
        raise ValueError(f"profile {path}: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    for section, sub in raw.items():
        if isinstance(DEFAULTS.get(section), dict) and isinstance(sub, dict):
            bad = set(sub) - set(DEFAULTS[section])
            if bad:
                raise ValueError(f"profile {path}: unknown keys {sorted(bad)} in section {section!r}; "
                                 f"known: {sorted(DEFAULTS[section])}")
    merged = _merge(DEFAULTS, raw)
    from .scaleout import ExecutorConfig

    ExecutorConfig.from_dict(merged["executor"], where=f"profile {path}: executor")  # bad values fail here
    return Profile(name=raw.get("name", path.stem), path=path.resolve(), raw=merged)


def project_root() -> Path:
    """The checkout holding ``notebooks/`` (HELPERS_ROOT, else the cwd, else the source tree)."""
    env = os.environ.get("HELPERS_ROOT")
    if env:
        return Path(env).resolve()
    for cand in (Path.cwd(), PACKAGE_DIR.parent.parent):
        if (cand / "notebooks").is_dir():
            return cand.resolve()
    return Path.cwd().resolve()


def cache_dir() -> Path:
    """Where models, statistics and downloads are cached (HELPERS_CACHE, else ``<root>/.cache``)."""
    return Path(os.environ.get("HELPERS_CACHE", project_root() / ".cache")).resolve()


def results_dir(profile: Profile, results_root: Path | None = None) -> Path:
    """``<results_root>/<profile>`` (default ``<root>/results``; env HELPERS_RESULTS overrides)."""
    base = results_root or Path(os.environ.get("HELPERS_RESULTS", project_root() / "results"))
    return (Path(base) / profile.name).resolve()


def resolve_model(profile: Profile) -> str:
    """The model folder or hub name the profile studies (training the world model if needed)."""
    if profile.uses_world:
        from .world import ensure_world_model

        return str(ensure_world_model(profile.raw["world"], cache_dir()))
    from .checkpoints import resolve_model_source

    return resolve_model_source(str(profile.raw["model"]), cache_dir())


def known_data(seed: int = 0, cache: Path | None = None) -> Path:
    """ROME's known facts as CounterFact-schema records (:mod:`helpers.known`), written once into the cache;
    unrelated sentences for the paraphrase prompts come from the WikiText-2 corpus."""
    from .corpus import corpus_for, unrelated_sentences
    from .known import KNOWN_SHA256, write_known_counterfact

    dest = (cache or cache_dir()) / "data" / f"known_counterfact_{KNOWN_SHA256[:12]}_s{seed}.json"
    if not dest.exists():
        sentences = unrelated_sentences(corpus_for("wikitext-slice"), 400, seed)
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_known_counterfact(dest, seed=seed, corpus_sentences=sentences)
    return dest


def resolve_data(profile: Profile) -> str:
    """Path (or "official") of the CounterFact file the profile uses."""
    if profile.raw["data"] == "known":
        return str(known_data(int(profile.raw["seed"])))
    if profile.raw["data"] == "world":
        if not profile.uses_world:
            raise ValueError(f"profile {profile.name}: data 'world' needs model 'world'")
        return str(Path(resolve_model(profile)) / "counterfact.json")
    return str(profile.raw["data"])
