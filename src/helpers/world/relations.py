"""The world's vocabulary: relations (modelled on CounterFact's) with their objects and phrasings, stable object
ids, and the word material names and unrelated sentences are made from."""

from __future__ import annotations

from dataclasses import dataclass


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
