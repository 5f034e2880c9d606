"""The world's configuration (:class:`WorldConfig`) and the data classes a generated world is made of."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
