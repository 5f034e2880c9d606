"""Profiles (YAML, ``src/helpers/profiles/``): their defaults, loading and validation, and what a profile resolves
to: the project, cache and results folders, the model and the CounterFact data it studies."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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
    # a token every text starts with, for a model whose tokenizer adds none: "auto" = the named model's rule
    # (SmolLM2: "<|endoftext|>", its attention sink), null = none (the paper's code), or a token of the vocabulary
    "bos_token": "auto",
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
        # one cell's own sizes, {<method>__<problem>: {facts: N, layers: [...]}}, e.g. a costly cell run smaller
        "cells": {},
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
    "label": None,  # the study's name on pages, tables and figures (None = the profile's name)
    # a *book* of several studies: {study name: profile name or path}. Each study runs the per-study stages
    # (00-03) into results/<book>/<study>/; the chapters 04-07 run once and show the studies side by side.
    "studies": None,
}

# the keys a book profile (one with ``studies``) may set; everything else belongs to its studies' profiles
BOOK_KEYS = {"name", "description", "studies"}


@dataclass
class Profile:
    """A parsed profile. ``raw`` is the merged dict; the attributes are its top-level keys."""

    name: str
    path: Path
    raw: dict[str, Any]
    studies_loaded: dict[str, "Profile"] = field(default_factory=dict, repr=False)  # a book's study profiles

    def __getattr__(self, key: str) -> Any:
        raw = self.__dict__.get("raw", {})
        if key in raw:
            return raw[key]
        raise AttributeError(key)

    @property
    def uses_world(self) -> bool:
        return self.raw["model"] == "world"

    @property
    def label(self) -> str:
        """The study's display name (``label``, else the profile's name)."""
        return str(self.raw.get("label") or self.name)

    @property
    def runs_editing(self) -> bool:
        """Whether the editing cells run: ``stages`` unset, or naming a ``03`` stage."""
        stages = self.raw.get("stages")
        return stages is None or any(str(s).startswith("03") for s in stages)

    @property
    def is_book(self) -> bool:
        """True for a profile of several studies (``studies``)."""
        return bool(self.raw.get("studies"))

    def study_profiles(self) -> dict[str, "Profile"]:
        """{study name: its profile}: the ``studies`` of a book profile, else {this profile's name: itself}."""
        return self.studies_loaded if self.is_book else {self.name: self}


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
    _check_cells(path, merged["editing"])
    studies = _load_studies(path, raw) if raw.get("studies") is not None else {}
    from .scaleout import ExecutorConfig

    ExecutorConfig.from_dict(merged["executor"], where=f"profile {path}: executor")  # bad values fail here
    return Profile(name=raw.get("name", path.stem), path=path.resolve(), raw=merged, studies_loaded=studies)


def _check_cells(path: Path, editing: dict) -> None:
    """``editing.cells`` names cells the profile runs (``<method>__<problem>``) and sets only facts and layers."""
    cells = editing.get("cells") or {}
    if not isinstance(cells, dict):
        raise ValueError(f"profile {path}: editing.cells must map <method>__<problem> to {{facts, layers}}")
    for key, sizes in cells.items():
        method, sep, problem = str(key).partition("__")
        if not sep or method not in editing["methods"] or problem not in editing["problems"]:
            raise ValueError(f"profile {path}: editing.cells.{key} is not a cell this profile runs "
                             f"(<method>__<problem> of methods {editing['methods']} x problems {editing['problems']})")
        if not isinstance(sizes, dict) or set(sizes) - {"facts", "layers"}:
            raise ValueError(f"profile {path}: editing.cells.{key} sets only facts and layers, got {sizes!r}")


def _load_studies(path: Path, raw: dict) -> dict[str, Profile]:
    """A book profile's studies, loaded: it names them (study name -> a profile name, or a YAML path next to the
    book's file) and nothing else; each study is a single-study profile."""
    studies = raw["studies"]
    if not isinstance(studies, dict) or not studies:
        raise ValueError(f"profile {path}: studies must map study names to profile names, e.g. "
                         "{smollm2: smollm2, world: world}")
    extra = set(raw) - BOOK_KEYS
    if extra:
        raise ValueError(f"profile {path}: a book of studies sets only {sorted(BOOK_KEYS)}; {sorted(extra)} belong "
                         "in its studies' profiles")
    out = {}
    for study, ref in studies.items():
        if not str(study).replace("-", "_").isidentifier():
            raise ValueError(f"profile {path}: study name {study!r} must be a word (letters, digits, - and _)")
        cand = path.parent / str(ref)
        sub = load_profile(cand if cand.suffix in (".yaml", ".yml") and cand.exists() else ref)
        if sub.is_book:
            raise ValueError(f"profile {path}: study {study!r} is itself a book of studies ({sub.path})")
        out[str(study)] = sub
    return out


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


def results_dir(profile: Profile, results_root: Path | None = None, study: str | None = None) -> Path:
    """``<results_root>/<profile>`` (default ``<root>/results``; env HELPERS_RESULTS overrides); a study of a book
    profile writes into ``<results_root>/<profile>/<study>`` (``study`` is ignored for a single-study profile)."""
    base = results_root or Path(os.environ.get("HELPERS_RESULTS", project_root() / "results"))
    out = Path(base) / profile.name
    if profile.is_book:
        if study is None:
            return out.resolve()
        if study not in profile.raw["studies"]:
            raise KeyError(f"profile {profile.name} has no study {study!r}; its studies: {list(profile.raw['studies'])}")
        out = out / study
    return out.resolve()


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
