"""Who the world is about: entities with invented names and one object per relation, unrelated filler sentences,
and each fact's Zipf-like mention count."""

from __future__ import annotations

import numpy as np

from .relations import (CODAS, FILLER_NAMES, FILLER_NOUNS, FILLER_TIMES, FILLER_VERBS, KIND_RELATIONS, ORG_WORDS,
                        RELATION_BY_ID, SYLLABLES)
from .schema import Entity, Fact, WorldConfig


def _word(rng: np.random.RandomState, n_syll: int) -> str:
    """An invented word of ``n_syll`` consonant-vowel syllables, sometimes closed by a final consonant."""
    w = "".join(SYLLABLES[rng.randint(len(SYLLABLES))] for _ in range(n_syll))
    if rng.rand() < 0.15:
        w += CODAS[rng.randint(len(CODAS))]
    return w.capitalize()


def _unique_words(rng: np.random.RandomState, n: int, syll: tuple[int, int], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, rng.randint(syll[0], syll[1] + 1))
        if w not in taken and len(w) >= 4:
            taken.add(w)
            out.append(w)
    return out


def make_entities(cfg: WorldConfig, rng: np.random.RandomState) -> list[Entity]:
    """Entities with invented multi-word names and one object per relation of their kind."""
    taken: set[str] = set(FILLER_NAMES)
    first = _unique_words(rng, cfg.n_first_names, (2, 2), taken)
    brands = _unique_words(rng, max(3, cfg.n_product // 3), (2, 2), taken)
    names: dict[str, list[str]] = {}
    used: set[str] = set()

    def add(kind: str, make) -> None:
        out = []
        while len(out) < getattr(cfg, f"n_{kind}"):
            n = make()
            if n not in used:
                used.add(n)
                out.append(n)
        names[kind] = out

    # Surnames: n_siblings orderings of the same syllables from a small alphabet, so that no single token and
    # no bag of tokens identifies a person; only the ordered full name does.
    alphabet = [SYLLABLES[i] for i in rng.permutation(len(SYLLABLES))[: cfg.n_name_syllables]]
    surnames: list[str] = []
    while len(surnames) < 3 * (cfg.n_person + cfg.n_athlete):
        syl = [alphabet[i] for i in rng.choice(len(alphabet), 3, replace=False)]
        for k in range(cfg.n_siblings):
            perm = rng.permutation(3)
            surnames.append("".join(syl[i] for i in perm).capitalize())
    sur_iter = iter(surnames)
    if cfg.name_words:
        # Names are orderings of three words from a small pool ("Tami Bafu Fezo", "Fezo Tami Bafu"): siblings
        # have the same bag of tokens, so only order-aware processing of the name identifies the person.
        need = cfg.n_person + cfg.n_athlete
        if cfg.name_words < 3 or cfg.name_words * (cfg.name_words - 1) * (cfg.name_words - 2) < need:
            raise ValueError(f"name_words={cfg.name_words} cannot name {need} people (need >= 3 and enough orderings)")
        pool = _unique_words(rng, cfg.name_words, (2, 2), taken)
        ordered: list[str] = []
        seen: set[str] = set()
        perms = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
        while len(ordered) < need:  # unique names only, so ``add`` never runs out
            trio = [pool[i] for i in rng.choice(len(pool), 3, replace=False)]
            for j in rng.permutation(6)[: cfg.n_siblings]:
                name = " ".join(trio[i] for i in perms[j])
                if name not in seen:
                    seen.add(name)
                    ordered.append(name)
        name_iter = iter(ordered)
        add("person", lambda: next(name_iter))
        add("athlete", lambda: next(name_iter))
    else:
        add("person", lambda: f"{first[rng.randint(len(first))]} {next(sur_iter)}")
        add("athlete", lambda: f"{first[rng.randint(len(first))]} {next(sur_iter)}")
    add("product", lambda: f"{brands[rng.randint(len(brands))]} {_word(rng, 2)}")
    add("organization", lambda: f"{_word(rng, rng.randint(2, 3))} {ORG_WORDS[rng.randint(len(ORG_WORDS))]}")
    add("region", lambda: _word(rng, 3) + ("ia", "land", "stan", "ora")[rng.randint(4)])

    entities = []
    for kind in ("person", "athlete", "product", "organization", "region"):
        for n in names[kind]:
            attrs = {}
            for rid in KIND_RELATIONS[kind]:
                rel = RELATION_BY_ID[rid]
                attrs[rid] = rel.objects[rng.randint(len(rel.objects))]
            entities.append(Entity(n, kind, attrs))
    return entities


def make_fillers(rng: np.random.RandomState, n: int = 400) -> list[str]:
    """Unrelated everyday sentences ("Shayna opened the door at dawn.")."""
    out = set()
    while len(out) < n:
        a = FILLER_NAMES[rng.randint(len(FILLER_NAMES))]
        s = (f"{a} {FILLER_VERBS[rng.randint(len(FILLER_VERBS))]} the {FILLER_NOUNS[rng.randint(len(FILLER_NOUNS))]}"
             f" {FILLER_TIMES[rng.randint(len(FILLER_TIMES))]}.")
        out.add(s)
    return sorted(out)


def assign_frequencies(cfg: WorldConfig, entities: list[Entity], rng: np.random.RandomState) -> list[Fact]:
    """Zipf-like mention counts: subject popularity ~ 1/(rank+offset)^alpha times a log-normal fact weight."""
    ranks = rng.permutation(len(entities))
    pop = 1.0 / (ranks + 1 + cfg.zipf_offset) ** cfg.zipf_alpha
    rows = []
    for e, p in zip(entities, pop):
        for rid, obj in e.attributes.items():
            rows.append((e.name, rid, obj, p * np.exp(cfg.fact_noise * rng.randn())))
    w = np.array([r[3] for r in rows])
    expected = cfg.total_mentions * w / w.sum()
    counts = np.floor(expected + rng.rand(len(w))).astype(int)  # stochastic rounding
    return [Fact(s, rid, o, int(c)) for (s, rid, o, _), c in zip(rows, counts)]
