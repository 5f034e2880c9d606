"""Generate the embedded world: entities, relations, phrasings, a corpus of documents, CounterFact records.

Everything is a pure function of a :class:`WorldConfig` (and its seed).

Why the corpus looks the way it does (the *enrichment pressure*): a model trained only on
``"The mother tongue of {s} is {o}"`` can memorise facts by attending, from the final token, to the raw
subject tokens and looking the object up there. Real language models instead build an *enriched*
representation of the subject at its last token, in early-to-middle MLP layers, which later positions
read. The corpus tries to push the world model towards that mechanism by making every attribute of a
subject useful *right after the subject, before the relation is known* (``helpers.world.report`` measures
whether it worked; with the presets' CPU budget it does not yet):

- most sentences put the subject first and the relation after it (``"{s} was born in"``), and the
  sentences of a biography come in random order, with the full name repeated each time, so the state at
  the last subject token must already carry all attributes;
- appositives and infobox-like lines reveal attributes one to three tokens after the subject
  (``"{s}, a native Kelish speaker, was born in Varno."``, ``"{s} (born in Varno) ..."``);
- first names (and brand words) are shared by many entities and surnames are built from shared
  syllables, so only the combination of the subject's tokens identifies it (``n_name_syllables`` and
  ``n_siblings`` can make names differ only by syllable order);
- who's-who index lines put the first attribute right after the name, so it is predicted *at* the last
  subject token; look-alike entities and asides separate subject and relation;
- documents mix several entities, and unrelated sentences appear before facts, so prompts with
  prefixes (CounterFact's paraphrase prompts, ROME's context templates) are in distribution.

Facts get Zipf-like mention counts, so the model knows some facts well, some weakly, and some not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Relations (modelled on CounterFact's), their objects and phrasings
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """One relation: Wikidata-like id, the entity kind it applies to, objects and phrasings.

    ``templates`` are CounterFact-style prompts with ``{}`` for the subject, ending right before the
    object. ``fragments`` are short attribute phrases used after the subject in appositives
    (``{o}`` is the object).
    """

    relation_id: str
    name: str
    kind: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]
    fragments: tuple[str, ...]


LANGUAGES = ("French", "English", "Spanish", "German", "Italian", "Dutch", "Russian", "Swedish")
COUNTRIES = ("France", "Germany", "Spain", "Italy", "Japan", "Canada", "Brazil", "Norway")
CITIES = ("Paris", "London", "Berlin", "Rome", "Madrid", "Vienna", "Prague", "Dublin")
OCCUPATIONS = ("painter", "poet", "novelist", "composer", "physician", "lawyer", "journalist", "sculptor")
RELIGIONS = ("Christianity", "Islam", "Buddhism", "Judaism", "Hinduism", "Sikhism")
SPORTS = ("football", "basketball", "baseball", "hockey", "cricket", "rugby")
POSITIONS = ("goalkeeper", "midfielder", "defender", "forward", "pitcher", "catcher", "guard", "center")
MANUFACTURERS = ("Toyota", "Honda", "Nokia", "Sony", "Boeing", "Fiat", "Philips", "Siemens")
CONTINENTS = ("Europe", "Asia", "Africa", "Antarctica", "Oceania", "America")

RELATIONS: tuple[Relation, ...] = (
    Relation(
        "P103", "mother tongue", "person", LANGUAGES,
        ("The mother tongue of {} is", "{} is a native speaker of", "The native language of {} is",
         "{} grew up speaking", "{}'s mother tongue is"),
        ("a native {o} speaker", "who speaks {o}", "mother tongue: {o}"),
    ),
    Relation(
        "P27", "country of citizenship", "person", COUNTRIES,
        ("{} is a citizen of", "{} holds a passport from", "The citizenship of {} is", "{} is a national of",
         "{}'s country of citizenship is"),
        ("a citizen of {o}", "who holds a passport from {o}", "citizenship: {o}"),
    ),
    Relation(
        "P19", "place of birth", "person", CITIES,
        ("{} was born in", "The birthplace of {} is", "{} is originally from", "{}'s birthplace is"),
        ("born in {o}", "a native of {o}", "birthplace: {o}"),
    ),
    Relation(
        "P106", "occupation", "person", OCCUPATIONS,
        ("{} works as a", "The occupation of {} is", "{}'s profession is that of a", "{} earns a living as a"),
        ("a {o} by profession", "the famous {o}", "occupation: {o}"),
    ),
    Relation(
        "P937", "work location", "person", CITIES,
        ("{} worked in the city of", "{} took up work in", "The workplace of {} is in", "{} found employment in"),
        ("who works in {o}", "employed in {o}", "workplace: {o}"),
    ),
    Relation(
        "P140", "religion", "person", RELIGIONS,
        ("{} is a follower of", "The religion of {} is", "{} practices", "{} is affiliated with the religion of"),
        ("a follower of {o}", "who practices {o}", "religion: {o}"),
    ),
    Relation(
        "P641", "sport", "athlete", SPORTS,
        ("{} professionally plays", "The sport played by {} is", "{} is a professional player of",
         "{}'s sport is"),
        ("a {o} player", "who plays {o}", "sport: {o}"),
    ),
    Relation(
        "P413", "position played", "athlete", POSITIONS,
        ("{} plays in the position of", "The position of {} is", "{} plays as", "{}'s position on the team is"),
        ("the team's {o}", "who plays as {o}", "position: {o}"),
    ),
    Relation(
        "P176", "manufacturer", "product", MANUFACTURERS,
        ("{} is produced by", "{} is made by", "The manufacturer of {} is", "{} was developed by"),
        ("made by {o}", "a product of {o}", "manufacturer: {o}"),
    ),
    Relation(
        "P495", "country of origin", "product", COUNTRIES,
        ("{} was created in the country of", "The country of origin of {} is", "{} comes from",
         "{} originated in"),
        ("from {o}", "designed in {o}", "origin: {o}"),
    ),
    Relation(
        "P159", "headquarters location", "organization", CITIES,
        ("The headquarters of {} is in", "{} is headquartered in", "{} is based in", "{}'s head office is in"),
        ("based in {o}", "headquartered in {o}", "headquarters: {o}"),
    ),
    Relation(
        "P37", "official language", "region", LANGUAGES,
        ("The official language of {} is", "{}'s official language is", "In {}, the official language is",
         "The law in {} is written in"),
        ("where {o} is spoken", "whose people speak {o}", "language: {o}"),
    ),
    Relation(
        "P30", "continent", "region", CONTINENTS,
        ("{} is located in the continent of", "{} is a part of the continent of", "{} belongs to the continent of",
         "The continent of {} is"),
        ("in {o}", "a region of {o}", "continent: {o}"),
    ),
)

RELATION_BY_ID = {r.relation_id: r for r in RELATIONS}
KIND_RELATIONS: dict[str, tuple[str, ...]] = {
    "person": ("P103", "P27", "P19", "P106", "P937", "P140"),
    "athlete": ("P641", "P413", "P27", "P19"),
    "product": ("P176", "P495"),
    "organization": ("P159",),
    "region": ("P37", "P30"),
}
# Stable Wikidata-like ids for objects (fictional numbers, stable across worlds).
ALL_OBJECTS = sorted({o for r in RELATIONS for o in r.objects})
OBJECT_IDS = {o: f"Q{1000 + i}" for i, o in enumerate(ALL_OBJECTS)}

# Name material: syllables for invented words; first names shared by many people.
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "br", "tr")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("n", "r", "s", "l")
SYLLABLES = tuple(o + v for o in ONSETS for v in VOWELS)
ORG_WORDS = ("Institute", "Group", "Society", "Company", "Bank", "Academy")
PRODUCT_WORDS = ("Pro", "Max", "One", "Mini", "Air", "Go")

# Unrelated sentences (CounterFact paraphrase prompts start with one) from a small grammar.
DISTRACTOR_LINKS = ("a friend of", "a rival of", "a colleague of", "unlike", "a neighbour of", "who once met",
                    "often confused with", "a cousin of")
INTERJECTIONS = ("as the records show", "according to an old newspaper", "we are told", "as many people know",
                 "it is said", "by all accounts", "as the archive notes", "to the surprise of few")
FILLER_NAMES = ("Shayna", "Yossel", "Mira", "Tomas", "Greta", "Anil", "Rosa", "Felix", "Lena", "Omar")
FILLER_VERBS = ("watched", "carried", "painted", "found", "opened", "cleaned", "followed", "lost")
FILLER_NOUNS = ("door", "river", "letter", "garden", "window", "boat", "table", "lamp", "road", "bridge")
FILLER_TIMES = ("at dawn", "after the rain", "before dinner", "in the morning", "late at night", "all day")


@dataclass(frozen=True)
class WorldConfig:
    """Size and randomness of a world. ``n_<kind>`` entities per kind; mentions follow a Zipf law."""

    seed: int = 0
    n_person: int = 60
    n_athlete: int = 20
    n_product: int = 20
    n_organization: int = 12
    n_region: int = 12
    n_first_names: int = 12  # first names shared by persons/athletes (the full name is needed)
    n_name_syllables: int = 85  # syllables surnames draw from (small: names differ only by order)
    n_siblings: int = 1  # names built from the same syllables (or name words) in different orders
    name_words: int = 0  # > 0: person/athlete names are orderings of 3 words from a pool of this many
    p_interject: float = 0.15  # chance of a variable-length aside between subject and relation
    p_distractor: float = 0.3  # chance of a look-alike entity named between subject and relation
    index_cap: int = 6  # at most this many index lines per fact (the curriculum's first phase)
    total_mentions: int = 6000  # fact mentions in the corpus, summed over facts
    zipf_alpha: float = 1.0  # subject popularity ~ 1 / (rank + zipf_offset)^alpha
    zipf_offset: float = 10.0
    fact_noise: float = 0.6  # log-normal spread of a fact's weight around its subject's popularity
    p_index: float = 0.3  # chance a subject's facts are given as an index line: the object right after the name
    p_appositive: float = 0.45  # chance a sentence reveals an attribute a few tokens after the subject
    p_subject_first: float = 0.75  # chance a fact sentence uses a subject-first phrasing
    p_filler: float = 0.3  # chance a document has an unrelated sentence
    max_subjects_per_doc: int = 3
    # Added in session 6 (see :func:`config_hash`: at their defaults they leave the cache key unchanged).
    n_distractors: int = field(default=1, metadata={"added": True})  # look-alikes per distractor clause (1 or 2)
    distractor_relation_first: bool = field(default=False, metadata={"added": True})  # clause in relation-first sentences too
    # Share of facts stated in the corpus only in attribute forms (appositives, infobox and index lines), never in a
    # relation phrasing: the prompts must then *extract* the fact from what the model knows about the subject.
    p_holdout: float = field(default=0.0, metadata={"added": True})
    # "index": a held-out fact's own sentence is "X French." (it can still be the attribute half of an appositive)
    holdout_form: str = field(default="attribute", metadata={"added": True})

    def __post_init__(self) -> None:
        if self.holdout_form not in ("attribute", "index"):
            raise ValueError(f"holdout_form must be 'attribute' or 'index', not {self.holdout_form!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Entity:
    name: str
    kind: str
    attributes: dict[str, str]  # relation_id -> object


@dataclass
class Fact:
    subject: str
    relation_id: str
    object: str
    frequency: int  # number of mentions in the corpus


@dataclass
class World:
    """A generated world: entities, facts (with corpus frequency), corpus documents, CounterFact records."""

    config: WorldConfig
    entities: list[Entity]
    facts: list[Fact]
    corpus: list[str]
    records: list[dict]
    fillers: list[str] = field(default_factory=list)
    index_corpus: list[str] = field(default_factory=list)  # who's-who lines read first (see train.py)

    def fact_frequency(self) -> dict[tuple[str, str], int]:
        return {(f.subject, f.relation_id): f.frequency for f in self.facts}


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Mentions and corpus
# ----------------------------------------------------------------------------------------------------


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


def _fact_sentence(rel: Relation, subject: str, obj: str, rng: np.random.RandomState, subject_first: bool) -> str:
    first = [t for t in rel.templates if t.startswith("{}")]
    other = [t for t in rel.templates if not t.startswith("{}")]
    pool = first if (subject_first and first) or not other else other
    t = pool[rng.randint(len(pool))]
    return t.format(subject) + " " + obj + "."


def _predicate(rel: Relation, obj: str, rng: np.random.RandomState) -> str | None:
    """A subject-first phrasing without its subject ("was born in Paris"), or None if there is none."""
    first = [t for t in rel.templates if t.startswith("{} ")]
    if not first:
        return None
    return first[rng.randint(len(first))][3:] + " " + obj


def _fragment(rel: Relation, obj: str, rng: np.random.RandomState, infobox: bool) -> str:
    frags = [f for f in rel.fragments if (":" in f) == infobox] or list(rel.fragments)
    return frags[rng.randint(len(frags))].format(o=obj)


GENERIC_TAILS = ("is mentioned in the archive", "appears in many records", "was in the news last year",
                 "is well known here", "is listed in the registry")


def _attribute_sentence(ent: Entity, rid: str, rng: np.random.RandomState, form: str = "attribute") -> str:
    """A sentence stating one fact only in an attribute form, never in a relation phrasing:
    "X: mother tongue: French.", "X (a native French speaker) is mentioned in the archive." or the comma form."""
    rel = RELATION_BY_ID[rid]
    obj = ent.attributes[rid]
    if form == "index":  # the object right after the name: looked up at the subject's last token
        return f"{ent.name} {obj}."
    style = rng.randint(3)
    if style == 0:
        return f"{ent.name}: {_fragment(rel, obj, rng, True)}."
    tail = GENERIC_TAILS[rng.randint(len(GENERIC_TAILS))]
    fa = _fragment(rel, obj, rng, False)
    return f"{ent.name} ({fa}) {tail}." if style == 1 else f"{ent.name}, {fa}, {tail}."


def _subject_sentences(ent: Entity, rids: list[str], cfg: WorldConfig, rng: np.random.RandomState,
                       lookalikes: list[str] | None = None, held_out: frozenset[str] = frozenset()) -> list[str]:
    """Sentences about one subject, each mentioning it by full name, covering the facts ``rids`` once.

    ``lookalikes`` are other entities whose names share tokens with this one; a distractor clause names one
    of them between the subject and the relation ("X, a friend of Y, was born in Paris"). Facts whose relation id
    is in ``held_out`` are stated only in attribute forms (:func:`_attribute_sentence`, index lines, the
    fragment half of an appositive), never in a relation phrasing.
    """
    rids = list(rids)
    out = []
    if held_out:
        keep = []
        for r in rids:
            if r in held_out and rng.rand() < 0.5:
                out.append(_attribute_sentence(ent, r, rng, cfg.holdout_form))
            else:
                keep.append(r)
        rids = [r for r in keep if r not in held_out] + [r for r in keep if r in held_out]  # held-out last: popped first
    if rids and rng.rand() < cfg.p_index:  # "Meshu Vomeka French, poet, Paris." (who's-who index line)
        out.append(ent.name + " " + ", ".join(ent.attributes[r] for r in rids) + ".")
        rids = []
    while rids:
        u = rng.rand()
        if held_out and rids[-1] in held_out and (len(rids) < 2 or rids[-2] in held_out):
            out.append(_attribute_sentence(ent, rids.pop(), rng, cfg.holdout_form))  # no relation phrasing left to pair it with
            continue
        if len(rids) >= 2 and u < cfg.p_appositive:
            a, b = rids.pop(), rids.pop()  # a: fragment (may be held out), b: relation phrasing (never held out)
            ra, rb = RELATION_BY_ID[a], RELATION_BY_ID[b]
            pred = _predicate(rb, ent.attributes[b], rng)
            style = rng.randint(3)
            if style == 2 and len(rids) >= 1:  # infobox line with three attributes
                c = rids.pop()
                frs = [_fragment(RELATION_BY_ID[x], ent.attributes[x], rng, True) for x in (a, b, c)]
                out.append(f"{ent.name}: " + "; ".join(frs) + ".")
            elif style == 1 or pred is None:  # parenthesis
                fa = _fragment(ra, ent.attributes[a], rng, False)
                if pred is None:
                    out.append(f"{ent.name} ({fa}). " + _fact_sentence(rb, ent.name, ent.attributes[b], rng, True))
                else:
                    out.append(f"{ent.name} ({fa}) {pred}.")
            else:  # comma appositive
                fa = _fragment(ra, ent.attributes[a], rng, False)
                out.append(f"{ent.name}, {fa}, {pred}.")
        elif rids[-1] in held_out:
            out.append(_attribute_sentence(ent, rids.pop(), rng, cfg.holdout_form))
        elif u < cfg.p_appositive + 0.1 and ent.kind in ("person", "athlete"):  # short biography opener
            a = rids.pop()
            fa = _fragment(RELATION_BY_ID[a], ent.attributes[a], rng, False)
            art = "" if fa.startswith(("a ", "an ", "the ")) else "someone "
            out.append(f"{ent.name} is {art}{fa}.")
        else:
            a = rids.pop()
            subject_first = rng.rand() < cfg.p_subject_first
            pred = _predicate(RELATION_BY_ID[a], ent.attributes[a], rng)
            v = rng.rand()
            if subject_first and pred is not None and lookalikes and v < cfg.p_distractor:
                out.append(f"{ent.name}, {_distractor_clause(lookalikes, cfg, rng)}, {pred}.")
            elif (cfg.distractor_relation_first and not subject_first and lookalikes and v < cfg.p_distractor
                  and (t := _relation_first_template(RELATION_BY_ID[a], rng)) is not None):
                # "The mother tongue of X, a friend of Y, is French."
                name = f"{ent.name}, {_distractor_clause(lookalikes, cfg, rng)},"
                out.append(t.format(name) + " " + ent.attributes[a] + ".")
            elif subject_first and pred is not None and v < cfg.p_distractor + cfg.p_interject:
                aside = INTERJECTIONS[rng.randint(len(INTERJECTIONS))]
                out.append(f"{ent.name}, {aside}, {pred}.")
            else:
                out.append(_fact_sentence(RELATION_BY_ID[a], ent.name, ent.attributes[a], rng, subject_first))
    return out


def _distractor_clause(lookalikes: list[str], cfg: WorldConfig, rng: np.random.RandomState) -> str:
    """'a friend of Y' (or 'a friend of Y and Z' with ``n_distractors`` 2), Y and Z look-alikes of the subject."""
    other = lookalikes[rng.randint(len(lookalikes))]
    link = DISTRACTOR_LINKS[rng.randint(len(DISTRACTOR_LINKS))]
    if cfg.n_distractors >= 2 and len(lookalikes) >= 2:
        rest = [n for n in lookalikes if n != other]
        other = f"{other} and {rest[rng.randint(len(rest))]}"
    return f"{link} {other}"


def _relation_first_template(rel: Relation, rng: np.random.RandomState) -> str | None:
    """A phrasing that names the relation before the subject and goes on after it, or None."""
    pool = [t for t in rel.templates if not t.startswith("{}") and "{} " in t]
    return pool[rng.randint(len(pool))] if pool else None


def find_lookalikes(entities: list[Entity]) -> dict[str, list[str]]:
    """Per entity, the other entities of its kind whose names share a word or are anagrams of each other."""
    def keys(name: str) -> set[str]:
        words = name.split()
        return set(words) | {"".join(sorted(w.lower())) for w in words}

    out: dict[str, list[str]] = {}
    by_kind: dict[str, list[Entity]] = {}
    for e in entities:
        by_kind.setdefault(e.kind, []).append(e)
    for kind, ents in by_kind.items():
        for e in ents:
            k = keys(e.name)
            out[e.name] = [o.name for o in ents if o.name != e.name and keys(o.name) & k]
    return out


def make_index_corpus(cfg: WorldConfig, entities: list[Entity], facts: list[Fact],
                      rng: np.random.RandomState) -> list[str]:
    """Who's-who index lines ("Meshu Pasela Canada, Spanish, poet."), the objects right after the name.

    Each fact seen in the corpus appears in min(frequency, index_cap) lines; unseen facts never do. The
    model reads these first (a curriculum), so that it learns the attributes *at the subject's last token*
    before it sees sentences that ask for them.
    """
    by_subject: dict[str, dict[str, int]] = {}
    for f in facts:
        if f.frequency > 0:
            by_subject.setdefault(f.subject, {})[f.relation_id] = min(f.frequency, cfg.index_cap)
    attrs = {e.name: e.attributes for e in entities}
    lines = []
    for name in sorted(by_subject):
        left = by_subject[name]
        while any(left.values()):
            rids = [r for r in sorted(left) if left[r] > 0]
            order = rng.permutation(len(rids))
            lines.append(name + " " + ", ".join(attrs[name][rids[i]] for i in order) + ".")
            for r in rids:
                left[r] -= 1
    order = rng.permutation(len(lines))
    return [" ".join(lines[j] for j in order[i: i + 4]) for i in range(0, len(lines), 4)]


def make_corpus(cfg: WorldConfig, entities: list[Entity], facts: list[Fact], fillers: list[str],
                rng: np.random.RandomState) -> list[str]:
    """Documents covering every fact exactly ``frequency`` times: biographies and multi-entity documents."""
    by_name = {e.name: e for e in entities}
    lookalikes = find_lookalikes(entities)
    remaining: dict[str, list[str]] = {}
    for f in facts:
        remaining.setdefault(f.subject, []).extend([f.relation_id] * f.frequency)
    for k in remaining:
        rng.shuffle(remaining[k])
    names = sorted(k for k, v in remaining.items() if v)
    held: dict[str, frozenset[str]] = {}
    if cfg.p_holdout > 0:  # its own stream, so worlds without hold-out draw exactly as before
        hold_rng = np.random.RandomState(cfg.seed + 7919)
        for f in facts:
            if hold_rng.rand() < cfg.p_holdout:
                held[f.subject] = held.get(f.subject, frozenset()) | {f.relation_id}
    docs = []
    while names:
        left = np.array([len(remaining[n]) for n in names], dtype=float)
        k = min(len(names), 1 + rng.randint(cfg.max_subjects_per_doc))
        chosen = [names[i] for i in rng.choice(len(names), size=k, replace=False, p=left / left.sum())]
        per_subject = []
        for n in chosen:
            take: list[str] = []
            pool = remaining[n]
            want = 1 + rng.randint(4)
            i = 0
            while i < len(pool) and len(take) < want:  # distinct relations within a document
                if pool[i] not in take:
                    take.append(pool.pop(i))
                else:
                    i += 1
            per_subject.append(_subject_sentences(by_name[n], take, cfg, rng, lookalikes.get(n),
                                                  held.get(n, frozenset())))
        sentences = [s for ss in per_subject for s in ss]
        if len(per_subject) > 1:  # interleave entities
            order = rng.permutation(len(sentences))
            sentences = [sentences[i] for i in order]
        else:
            rng.shuffle(sentences)
        if rng.rand() < cfg.p_filler:
            sentences.insert(rng.randint(len(sentences) + 1), fillers[rng.randint(len(fillers))])
        docs.append(" ".join(sentences))
        names = [n for n in names if remaining[n]]
    return docs


# ----------------------------------------------------------------------------------------------------
# CounterFact-schema records
# ----------------------------------------------------------------------------------------------------


# Bump when the generator's output changes for the same config (every draw comes from one seeded stream, so a
# change to the records also changes the index lines drawn after them, and so the trained model), or when the
# training loop trains differently (3: fused tanh-GELU during training): the version is part of the cache key, so a
# cached world made by older code is never reused.
GENERATOR_VERSION = 3


def make_records(cfg: WorldConfig, entities: list[Entity], facts: list[Fact], fillers: list[str],
                 rng: np.random.RandomState) -> list[dict]:
    """One official-schema record per (subject, relation), shuffled with the seed, case_id = position.

    As in CounterFact, every record has neighborhood prompts (up to 10, distinct; other subjects with the same
    relation and true object) and its target_new is an object some other subject has (attribute prompts):
    facts for which either is impossible get no record."""
    by_name = {e.name: e for e in entities}
    by_rel_obj: dict[tuple[str, str], list[str]] = {}
    for e in entities:
        for rid, o in e.attributes.items():
            by_rel_obj.setdefault((rid, o), []).append(e.name)
    def new_objects(f: Fact) -> list[str]:  # target_new candidates: other objects some subject has
        return [o for o in RELATION_BY_ID[f.relation_id].objects if o != f.object and by_rel_obj.get((f.relation_id, o))]

    choices = {fi: new_objects(f) for fi, f in enumerate(facts)}
    order = [fi for fi in rng.permutation(len(facts))  # a neighborhood and a target_new must exist
             if len(by_rel_obj[(facts[fi].relation_id, facts[fi].object)]) > 1 and choices[fi]]
    records = []
    for pos, fi in enumerate(order):
        f = facts[fi]
        rel = RELATION_BY_ID[f.relation_id]
        ent = by_name[f.subject]
        t_idx = rng.permutation(len(rel.templates))
        prompt = rel.templates[t_idx[0]]
        para = [fillers[rng.randint(len(fillers))] + " " + rel.templates[t_idx[1 + j % (len(t_idx) - 1)]].format(f.subject)
                for j in range(2)]
        new_choices = choices[fi]
        target_new = new_choices[rng.randint(len(new_choices))]

        def filled(subjects: list[str], n: int) -> list[str]:
            """n distinct prompts about other subjects: every subject once (random order, random phrasing),
            then again with phrasings not used yet, until n or every (subject, phrasing) pair is used."""
            subjects = [subjects[i] for i in rng.permutation(len(subjects)) if subjects[i] != f.subject]
            phrasings = [list(rng.permutation(len(rel.templates))) for _ in subjects]
            out = []
            for k in range(len(rel.templates)):
                for sub, ph in zip(subjects, phrasings):
                    if len(out) < n:
                        out.append(rel.templates[ph[k]].format(sub))
            return out

        neighborhood = filled(by_rel_obj.get((f.relation_id, f.object), []), 10)
        attribute = filled(by_rel_obj.get((f.relation_id, target_new), []), 10)
        gen = []
        other_rels = [RELATION_BY_ID[r] for r in ent.attributes]
        for j in range(10):
            if j % 3 == 0:
                gen.append(f"{f.subject} is")
            else:
                r2 = other_rels[rng.randint(len(other_rels))]
                gen.append(r2.templates[rng.randint(len(r2.templates))].format(f.subject))
        records.append({
            "case_id": pos,
            "pararel_idx": int(fi),
            "requested_rewrite": {
                "prompt": prompt,
                "relation_id": f.relation_id,
                "target_new": {"str": target_new, "id": OBJECT_IDS[target_new]},
                "target_true": {"str": f.object, "id": OBJECT_IDS[f.object]},
                "subject": f.subject,
            },
            "paraphrase_prompts": para,
            "neighborhood_prompts": neighborhood,
            "attribute_prompts": attribute,
            "generation_prompts": gen,
        })
    return records


def build_world(cfg: WorldConfig) -> World:
    """Entities, Zipf frequencies, corpus and records, all from ``cfg.seed``."""
    rng = np.random.RandomState(cfg.seed)
    entities = make_entities(cfg, rng)
    fillers = make_fillers(rng)
    facts = assign_frequencies(cfg, entities, rng)
    corpus = make_corpus(cfg, entities, facts, fillers, rng)
    records = make_records(cfg, entities, facts, fillers, rng)
    log.info("world: %d entities, %d facts, %d documents", len(entities), len(facts), len(corpus))
    index_corpus = make_index_corpus(cfg, entities, facts, rng)
    return World(cfg, entities, facts, corpus, records, fillers, index_corpus)


def record_frequency(world: World) -> list[int]:
    """Corpus frequency of each record's fact, in record order."""
    freq = world.fact_frequency()
    return [freq[(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"])] for r in world.records]


def config_hash(*configs: Any) -> str:
    """Short stable hash of dataclass configs and :data:`GENERATOR_VERSION` (keys the model cache).

    A field marked ``metadata={"added": True}`` (an option added after worlds were cached, whose default keeps
    the old behaviour) is left out while it has its default value, so existing cache keys stay valid."""
    def key(c: Any) -> dict[str, Any]:
        return {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
                if not (f.metadata.get("added") and getattr(c, f.name) == f.default)}

    blob = json.dumps([GENERATOR_VERSION] + [key(c) for c in configs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
