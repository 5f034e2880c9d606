"""What a stage notebook needs from a profile, in one call: ``study = Study.open(profile, results_dir, cache_dir)``.

It loads the model and the kept facts written by ``01_data``, and knows the noise σ, the edit layers, the
hyperparameter family, and (lazily) the second-moment statistics and context templates. Notebooks stay thin.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from torch import nn

from . import models, pipeline, tables

log = logging.getLogger(__name__)


if TYPE_CHECKING:
    from .sweep import CellConfig


@dataclass
class Study:
    profile: pipeline.Profile
    results: Path
    cache: Path

    @classmethod
    def open(cls, profile: str, results_dir: str | Path, cache_dir: str | Path, load: bool = True) -> "Study":
        """The study of ``profile`` writing into ``results_dir``; ``load=False`` defers loading the model to the first
        use of :attr:`model` (chapters that read only the tables)."""
        prof = pipeline.load_profile(profile)
        res = Path(results_dir)
        res.mkdir(parents=True, exist_ok=True)
        study = cls(prof, res, Path(cache_dir))
        if load:
            study.model  # noqa: B018 (load now: a missing model fails at the top of the notebook)
        return study

    @property
    def label(self) -> str:
        """The study's display name (the profile's ``label``)."""
        return self.profile.label

    @functools.cached_property
    def model_path(self) -> str:
        return pipeline.resolve_model(self.profile)

    @functools.cached_property
    def _loaded(self) -> tuple[nn.Module, object]:
        return models.load_model(self.model_path, device=self.profile.device, bos_token=self.profile.bos_token)

    @property
    def model(self) -> nn.Module:
        return self._loaded[0]

    @property
    def tok(self):
        return self._loaded[1]

    # ------------------------------------------------------------------ facts
    @functools.cached_property
    def all_facts(self) -> pd.DataFrame:
        """Every candidate record with the correctness columns (``01_data``'s table)."""
        return tables.read_table(self.results / "facts.parquet")

    @functools.cached_property
    def facts(self) -> pd.DataFrame:
        """The kept facts (correct, capped at ``max_facts``): traced, and the pool edits are drawn from."""
        f = self.all_facts
        return f[f["kept"]].reset_index(drop=True)

    def cell_sizes(self, method: str, problem: str) -> dict:
        """What ``editing.cells.<method>__<problem>`` overrides for one editing cell (``facts``, ``layers``)."""
        return dict((self.profile.editing.get("cells") or {}).get(f"{method}__{problem}") or {})

    def cell_facts(self, method: str, problem: str) -> pd.DataFrame:
        """The facts one cell edits: the first ``facts`` kept facts (the cell's own size, else ``editing.facts``;
        all when None); Fact Erasure keeps only those with p_true > 0.02."""
        from .data import erasure_filter

        n = self.cell_sizes(method, problem).get("facts", self.profile.editing.get("facts"))
        f = self.facts if n is None else self.facts.head(int(n))
        return erasure_filter(f) if problem in ("fe", "fact_erasure") else f

    # ------------------------------------------------------------------ model facts
    @property
    def n_layers(self) -> int:
        return models.n_layers(self.model)

    def _layers(self, spec) -> list[int]:
        if spec == "all":
            return list(range(self.n_layers))
        layers = [int(l) for l in spec]
        bad = [l for l in layers if not 0 <= l < self.n_layers]
        if bad:
            raise ValueError(f"profile {self.profile.name}: edit layers {bad} out of range (model has {self.n_layers})")
        return layers

    @property
    def edit_layers(self) -> list[int]:
        """The study's central edit layers (``editing.layers``)."""
        return self._layers(self.profile.editing.get("layers", "all"))

    def cell_config(self, method: str, problem: str) -> "CellConfig":
        """The sweep settings of one editing cell (its layers, hyperparameters, σ, batch size, exact mode); the
        problem options and essence samples that key the pre-edit rows are the sweep's defaults."""
        from .sweep import CellConfig

        return CellConfig(method, problem, self.cell_layers(method, problem), self.hparams(method, problem),
                          sigma=self.sigma, batch_size=int(self.profile.editing.get("batch_size", 8)),
                          exact=bool(self.profile.editing.get("exact", False)))

    def cell_layers(self, method: str, problem: str) -> list[int]:
        """One cell's central edit layers: its own ``layers``, else the study's."""
        spec = self.cell_sizes(method, problem).get("layers")
        return self.edit_layers if spec is None else self._layers(spec)

    @functools.cached_property
    def sigma(self) -> float:
        """Noise σ shared by tracing and editing (paper value, or 3 × subject-embedding std over kept facts)."""
        from .sweep import noise_sigma_for

        return noise_sigma_for(self.results, self.model, self.tok, list(self.facts["subject"]))

    @property
    def hparams_family(self) -> str:
        fam = self.profile.editing.get("hparams")
        if fam:
            return fam
        name = str(self.profile.model).lower()
        if "gpt-j" in name:
            return "gpt-j"
        if "gpt2-xl" in name:
            return "gpt2-xl"
        if "smollm2" in name:
            return "smollm2-135m"
        if "gemma-3-270m" in name or "gemma3-270m" in name:
            return "gemma3-270m"
        return "world"

    def hparams(self, method: str, problem: str) -> dict:
        from .editing import load_hparams

        return load_hparams(self.hparams_family, method, problem)

    # ------------------------------------------------------------------ where the work runs
    @functools.cached_property
    def executor(self):
        """The profile's executor for tracing and the sweep (:mod:`helpers.scaleout`): None runs them in this
        process; a Ray pool's workers open this same study (profile, results and cache folders)."""
        import os

        from .scaleout import ExecutorConfig, WorkerSpec, make_executor

        cfg = ExecutorConfig.from_dict(self.profile.raw.get("executor"), where=f"profile {self.profile.name}")
        # where the project, cache and results are (not the stage's progress, log and outputs files: the driver's)
        env = {k: os.environ[k] for k in ("HELPERS_ROOT", "HELPERS_CACHE", "HELPERS_RESULTS") if k in os.environ}
        return make_executor(cfg, WorkerSpec(str(self.profile.path), str(self.results), str(self.cache), env))

    # ------------------------------------------------------------------ editing resources
    @functools.cached_property
    def corpus(self):
        """Text corpus for second moments: the profile's ``stats.corpus`` (``wikitext``, ``wikitext-slice`` or a
        file, :func:`helpers.corpus.corpus_for`), else ``editing.corpus`` (a file), else the world corpus."""
        named = (self.profile.raw.get("stats") or {}).get("corpus")
        if named:
            from .corpus import corpus_for

            return corpus_for(named)
        spec = self.profile.editing.get("corpus")
        if spec:
            return str(spec)
        if self.profile.uses_world:
            return str(Path(self.model_path) / "corpus.txt")
        raise ValueError(
            f"profile {self.profile.name}: set editing.corpus to a text file (one document per line) for the "
            "second-moment statistics of a real model"
        )

    @functools.cached_property
    def stats(self):
        from .editing import SecondMoments

        n = int((self.profile.raw.get("stats") or {}).get("tokens") or self.profile.editing.get("stats_tokens", 20000))
        return SecondMoments(self.model, self.tok, self.corpus, n_tokens=n, cache_dir=self.cache)

    @functools.cached_property
    def templates(self):
        from .editing import context_templates

        return context_templates(self.model, self.tok, cache_dir=self.cache)


    def stats_layers(self) -> list[int]:
        """Every layer whose second moments a ROME or MEMIT cell of this study will read (its central layers and,
        for MEMIT, their windows); empty when the study runs neither."""
        from .editing import edit_layers

        ed = self.profile.editing
        out: set[int] = set()
        for method in (m for m in ed.get("methods", []) if m in ("rome", "memit")):
            for problem in ed.get("problems", []):
                hp = self.hparams(method, problem)
                out.update(l for c in self.cell_layers(method, problem) for l in edit_layers(self.model, method, c, hp))
        return sorted(out)

    def prepare_editing(self) -> dict:
        """Compute, before the editing cells, what they share, all cached on disk so that the cells, which run side
        by side on a share of the cores, only load it: the second moments of every layer in :meth:`stats_layers`
        (one corpus pass) and the context templates (ROME, MEMIT), and each problem's pre-edit measurements of
        the facts its cells edit (every method of a problem edits the same facts from the same pre-edit state).
        Returns ``{"layers": [...], "keys": keys per layer, "d_ff": key dimension, "templates": count,
        "pre": {problem: facts}}``."""
        from .sweep import pre_edit

        out = {"layers": [], "keys": 0, "d_ff": models.dims(self.model)[1], "templates": 0, "pre": {}}
        if not self.profile.runs_editing:
            return out
        layers = out["layers"] = self.stats_layers()
        if layers:
            self.stats.precompute(layers)
            out.update(keys=min(self.stats.counts[l] for l in layers), templates=len(self.templates.rome))
        ed = self.profile.editing
        for problem in ed.get("problems", []):
            methods = ed.get("methods", [])
            if not methods:
                continue
            facts = pd.concat([self.cell_facts(m, problem) for m in methods]).drop_duplicates("case_id")
            cfg = self.cell_config(methods[0], problem)  # what keys the pre-edit rows is the same for every method
            pre_edit(self.model, self.tok, facts, problem, self.sigma, self.results, cfg.options,
                     cfg.essence_samples)
            out["pre"][problem] = len(facts)
        return out


def open_studies(profile: str, results_dir: str | Path, cache_dir: str | Path,
                 studies: dict[str, dict] | None = None) -> dict[str, Study]:
    """The studies a chapter compares, by study name, in the book's order, models not loaded: ``studies`` as the
    pipeline passes it ({name: {"profile": path, "results_dir": path}}), else those of ``profile`` (a book's
    studies in ``<results_dir>/<study>``, or the one study of a single-study profile in ``results_dir``)."""
    if not studies:
        prof = pipeline.load_profile(profile)
        if prof.is_book:
            studies = {name: {"profile": str(sub.path), "results_dir": str(Path(results_dir) / name)}
                       for name, sub in prof.study_profiles().items()}
        else:
            studies = {prof.name: {"profile": profile, "results_dir": results_dir}}
    return {name: Study.open(s["profile"], s["results_dir"], cache_dir, load=False) for name, s in studies.items()}


def effects_of(study: "Study", window: int | None = None, kind: str = "mlp", denominator: str = "code") -> pd.DataFrame:
    """Per (case_id, layer) tracing effects of ``02_tracing``'s table for one window and kind."""
    from . import tracing

    window = window or int(study.profile.analysis.get("window", 5))
    table = tables.read_table(study.results / "tracing.parquet")
    eff = tracing.effects(table[(table["kind"] == kind) & (table["window"] == window)], denominator)
    if eff.empty:
        raise ValueError(f"no tracing rows for kind={kind} window={window}: trace them in 02_tracing first")
    return eff.drop(columns=["kind", "window"])
