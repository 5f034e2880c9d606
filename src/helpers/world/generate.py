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

The work is split by job: :mod:`.relations` (vocabulary), :mod:`.schema` (config and data classes),
:mod:`.entities` (entities, fillers, mention counts), :mod:`.documents` (the corpus), :mod:`.records`
(CounterFact records); this module builds the world, keys the cache and re-exports their names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

import numpy as np

# Re-exported: the public names of this module before it was split.
from .documents import GENERIC_TAILS, find_lookalikes, make_corpus, make_index_corpus
from .entities import assign_frequencies, make_entities, make_fillers
from .records import make_records
from .relations import (
    ALL_OBJECTS,
    CITIES,
    CODAS,
    CONTINENTS,
    COUNTRIES,
    DISTRACTOR_LINKS,
    FILLER_NAMES,
    FILLER_NOUNS,
    FILLER_TIMES,
    FILLER_VERBS,
    INTERJECTIONS,
    KIND_RELATIONS,
    LANGUAGES,
    MANUFACTURERS,
    OBJECT_IDS,
    OCCUPATIONS,
    ONSETS,
    ORG_WORDS,
    POSITIONS,
    PRODUCT_WORDS,
    RELATION_BY_ID,
    RELATIONS,
    RELIGIONS,
    SPORTS,
    SYLLABLES,
    VOWELS,
    Relation,
)
from .schema import Entity, Fact, World, WorldConfig

log = logging.getLogger(__name__)


# Bump when the generator's output changes for the same config (every draw comes from one seeded stream, so a
# change to the records also changes the index lines drawn after them, and so the trained model), or when the
# training loop trains differently (3: fused tanh-GELU during training): the version is part of the cache key, so a
# cached world made by older code is never reused.
GENERATOR_VERSION = 3


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
