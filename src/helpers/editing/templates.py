"""Context templates for ROME and MEMIT, sampled from the model once and cached (SCIENCE.md §6.1, §6.2).

- ROME: "{}" plus 20 prefixes sampled from the end-of-text token with top-k 5: 10 of ``max_out_len`` 5
  and 10 of ``max_out_len`` 10 total tokens (seed included), each followed by ". {}" -> 21 templates.
- MEMIT: two groups, ``[["{}"], [5 samples]]``, one sample from each seed "The", "Therefore",
  "Because", "I", "You" (``max_out_len`` 10, top-k 5), each followed by ". {}".

Braces in sampled text are replaced by spaces (and "\\t}" / "\\n}" removed first, as the paper's code did),
so a template has exactly one "{}". Cached in memory per model fingerprint and on disk as JSON.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from .. import generation, integrity, scoring
from ..tables import atomic_path
from .base import model_fingerprint

log = logging.getLogger(__name__)

MEMIT_SEEDS = ("The", "Therefore", "Because", "I", "You")
_MEMORY: dict[str, "ContextTemplates"] = {}


@dataclass(frozen=True)
class ContextTemplates:
    """rome: 21 templates ("{}" first); memit: 2 groups (bare, sampled). Each template has one "{}"."""

    rome: list[str]
    memit: list[list[str]]

    def flat(self, method: str) -> list[str] | None:
        """The templates ``method``'s δ optimisation runs over, "{}" first (MEMIT's groups in order), or None for a
        method without context templates."""
        return {"rome": self.rome, "memit": [t for g in self.memit for t in g]}.get(method)


def _clean(text: str) -> str:
    text = text.replace("\t}", "").replace("\n}", "")
    return text.replace("{", " ").replace("}", " ")


def sample_context_templates(
    model: nn.Module,
    tok,
    seed: int = 0,
    rome_length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10)),
    memit_length: int = 10,
) -> ContextTemplates:
    """Sample the templates (no caching). ``rome_length_params`` = ((max_out_len, n_samples), ...)."""
    # ROME samples from the end-of-text token; a model whose texts start with a BOS (its tokenizer's, or the token
    # scoring.set_bos gave it: SmolLM2's <|endoftext|>) starts from that token alone.
    start = "" if scoring.bos(tok) else tok.eos_token
    rome = ["{}"]
    for j, (length, n) in enumerate(rome_length_params):
        texts = generation.generate(model, tok, [start] * n, max_out_len=length, top_k=5, seed=seed + j)
        rome += [_clean(t) + ". {}" for t in texts]
    conts = generation.generate(model, tok, list(MEMIT_SEEDS), max_out_len=memit_length, top_k=5, seed=seed + 100)
    memit = [["{}"], [_clean(f"{s} {c}".strip()) + ". {}" for s, c in zip(MEMIT_SEEDS, conts)]]
    return ContextTemplates(rome=rome, memit=memit)


def context_templates(
    model: nn.Module,
    tok,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> ContextTemplates:
    """The model's context templates: from memory, else from ``cache_dir/templates/<fp>_seed<seed>.json``,
    else sampled (and written there)."""
    key = f"{model_fingerprint(model)}_seed{seed}"
    if key in _MEMORY:
        return _MEMORY[key]
    path = Path(cache_dir) / "templates" / f"{key}.json" if cache_dir is not None else None
    raw = None
    if path is not None and integrity.discard_if_bad(path, "context templates"):
        try:
            raw = json.loads(path.read_text())
            ct = ContextTemplates(rome=raw["rome"], memit=raw["memit"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("context templates %s are not readable (%s): sampling them again", path, err)
            integrity.remove(path)
            raw = None
    if raw is None:
        ct = sample_context_templates(model, tok, seed=seed)
        log.info("sampled %d ROME and %d MEMIT context templates", len(ct.rome), sum(map(len, ct.memit)))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(asdict(ct), indent=1))
    _MEMORY[key] = ct
    return ct
