"""CounterFact-schema records built from ROME's ``known_1000.json`` ("real facts", profile ``data: known``).

``known_1000.json`` (Meng et al. 2022; MIT, (c) 2022 Kevin Meng) holds 1,209 facts that GPT-2 XL
completes correctly: ``known_id``, ``subject``, ``attribute`` (the true object), ``template`` (with ``{}``
for the subject), ``prompt`` (the filled template, sometimes extended by a few words), ``prediction`` and
``relation_id`` (33 Wikidata relations). A byte-identical copy is vendored as
``helpers/vendor/known_1000.json`` (licence: ``vendor/LICENSE-known_1000.txt``). :func:`load_known`
checks its sha256 and validates every fact; :func:`known_records` turns the facts into records of the
official CounterFact schema (SCIENCE.md §1.2) following CounterFact's recipe, and
:func:`write_known_counterfact` writes them where :func:`helpers.data.load_counterfact` reads them.

Documented decisions
--------------------
- ``requested_rewrite.prompt`` is the fact's ``template`` (as in CounterFact), not its longer ``prompt``.
- Facts without a neighbour. 237 of the 1,209 facts share their (relation, true object) with no other
  fact of the file. Their records keep an **empty** ``neighborhood_prompts`` list: no other subject is
  substituted, because the neighborhood score measures whether p(o_true) > p(o_new) survives on subjects
  that *share* o_true. Such facts have no neighborhood score (NaN, see :mod:`helpers.metrics`) and drop
  out of neighborhood means and regressions.
- Facts with no possible counterfactual. A fact whose relation has no other true object in the file
  (relation P190, one fact) cannot get a ``target_new`` drawn within its relation; it is left out, with
  a log message. The vendored file gives 1,208 records, 236 of them with no neighbour.
- Object ids are synthetic (known_1000 has no Wikidata Q-ids): ``"known:<relation_id>:<object>"``.
- ``pararel_idx`` is -1 (these facts do not come from ParaRel); an extra key ``known_id`` keeps the
  source fact (``helpers.data.parse_record`` ignores unknown keys).
- Every random choice of a record comes from a generator seeded by ``(seed, known_id)``, so the output
  is a function of the seed alone and a fact's record does not depend on the other facts' draws.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .checksums import sha256_file

log = logging.getLogger(__name__)

KNOWN_SHA256 = "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a"
KNOWN_FACTS = 1209
VENDORED_PATH = Path(__file__).resolve().parent / "vendor" / "known_1000.json"
SHARED_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "known_1000.json"
MAX_PROBLEM_LINES = 20
N_PARAPHRASES = 2
MAX_NEIGHBOURS = 10
MAX_ATTRIBUTE = 10
REQUIRED_STR = ("subject", "attribute", "template", "relation_id")
OPTIONAL_STR = ("prompt", "prediction")

# Extra phrasings for relations with fewer than 3 distinct templates in the file (and P937, where the
# template "{} worked in" is a prefix of "{} worked in the city of" and cannot paraphrase it).
RELATION_PHRASINGS: dict[str, list[str]] = {
    "P103": ["The mother tongue of {} is", "{}'s first language is", "{} grew up speaking"],
    "P17": ["{} is situated in the country of", "{} can be found in the country of", "{}'s country is"],
    "P190": ["{} is twinned with", "The sister city of {} is", "{} has a partnership with the city of"],
    "P37": ["The language spoken in {} is", "People in {} speak", "The main language of {} is"],
    "P413": ["{}'s position on the field is", "The playing position of {} is", "{} is a professional"],
    "P641": ["The sport played by {} is", "{} competes in the sport of", "{}'s sport is"],
    "P937": ["{} found employment in", "The workplace of {} was in"],
}

# Generic free-generation prompts about the subject (CounterFact's generation_prompts are unused in the paper).
GENERATION_TEMPLATES: tuple[str, ...] = ("{} is", "{} is known for", "The most important thing about {} is")

# Unrelated lead-in sentences for paraphrase prompts when no corpus is given (written for this project).
BUILTIN_SENTENCES: tuple[str, ...] = (
    "The rain had stopped by the time we reached the station.",
    "She folded the letter twice and put it back in the drawer.",
    "Nobody noticed that the clock in the hall was running late.",
    "The bread was still warm when he cut the first slice.",
    "A light wind moved the curtains in the empty room.",
    "They waited at the corner until the lights turned green.",
    "The old bridge creaked under the weight of the cart.",
    "He wrote the numbers on the back of an envelope.",
    "The children laughed at the dog chasing its own tail.",
    "It took three hours to clear the snow from the path.",
    "The kettle whistled just as the phone began to ring.",
    "We found the keys under a pile of newspapers.",
    "The garden smelled of cut grass and wet soil.",
    "Her shoes were muddy after the long walk home.",
    "The meeting ended earlier than anyone expected.",
    "A single candle lit the corner of the table.",
    "The train was crowded, so he stood by the door.",
    "They painted the fence white over the weekend.",
    "The cat slept on the warm roof of the car.",
    "He forgot his umbrella for the third time this week.",
    "The soup needed more salt, but nobody said so.",
    "A stack of old magazines leaned against the wall.",
    "The music from the next room was barely audible.",
    "She counted the coins twice before paying.",
    "The lamp flickered and then went out.",
    "They argued about the route for most of the trip.",
    "The window was open, and the room felt cold.",
    "He tied the boat to the post and climbed onto the dock.",
    "The queue at the bakery reached the end of the street.",
    "Somebody had left a bicycle leaning against the gate.",
)


class KnownDataError(ValueError):
    """known_1000 data that fails the checksum or the validation (the message lists every problem)."""


@dataclass(frozen=True)
class Problem:
    """One validation problem: which fact, which field, what is wrong."""

    known_id: Any
    field: str
    problem: str

    def __str__(self) -> str:
        return f"known_id={self.known_id}: field {self.field!r}: {self.problem}"


@dataclass(frozen=True)
class Fact:
    """One validated known_1000 fact."""

    known_id: int
    subject: str
    relation_id: str
    target: str
    template: str

    @classmethod
    def of(cls, d: dict) -> "Fact":
        return cls(d["known_id"], d["subject"], d["relation_id"], d["attribute"], d["template"])

    @property
    def filled(self) -> str:
        """The template with the subject filled in."""
        return self.template.format(self.subject)


def known_path() -> Path:
    """The vendored known_1000.json (default); the shared data folder only if the vendored copy is missing."""
    for p in (VENDORED_PATH, SHARED_PATH):
        if p.exists():
            return p
    raise FileNotFoundError(f"known_1000.json not found at {VENDORED_PATH} (vendored) nor at {SHARED_PATH}")


def _template_problem(template: str) -> str | None:
    if template.count("{}") != 1:
        return f"must contain exactly one '{{}}': {template!r}"
    if "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
        return f"stray brace besides '{{}}': {template!r}"
    return None


def _fact_problems(obj: Any, position: int) -> list[Problem]:
    """Problems of one fact (an empty list when it is valid)."""
    if not isinstance(obj, dict):
        return [Problem(f"<position {position}>", "<record>", f"expected a JSON object, got {type(obj).__name__}")]
    kid = obj.get("known_id", f"<position {position}>")
    out: list[Problem] = []
    if not isinstance(obj.get("known_id"), int) or isinstance(obj.get("known_id"), bool):
        out.append(Problem(kid, "known_id", "missing" if "known_id" not in obj else "expected int"))
    for name in REQUIRED_STR:
        if name not in obj:
            out.append(Problem(kid, name, "missing"))
        elif not isinstance(obj[name], str):
            out.append(Problem(kid, name, f"expected str, got {type(obj[name]).__name__}"))
        elif not obj[name].strip():
            out.append(Problem(kid, name, "empty"))
    for name in OPTIONAL_STR:
        if name in obj and not isinstance(obj[name], str):
            out.append(Problem(kid, name, f"expected str, got {type(obj[name]).__name__}"))
    rel = obj.get("relation_id")
    if isinstance(rel, str) and rel.strip() and not re.fullmatch(r"P\d+", rel):
        out.append(Problem(kid, "relation_id", f"not a Wikidata property id: {rel!r}"))
    tpl = obj.get("template")
    if isinstance(tpl, str) and tpl.strip() and (msg := _template_problem(tpl)):
        out.append(Problem(kid, "template", msg))
    return out


def validate_known(data: Any) -> list[Problem]:
    """Every problem of a parsed known_1000 file (a list of facts); an empty list when it is valid."""
    if not isinstance(data, list) or not data:
        return [Problem("<file>", "<top level>", "expected a non-empty JSON list of facts")]
    problems = [p for i, obj in enumerate(data) for p in _fact_problems(obj, i)]
    seen: set[int] = set()
    for obj in data:
        kid = obj.get("known_id") if isinstance(obj, dict) else None
        if isinstance(kid, int):
            if kid in seen:
                problems.append(Problem(kid, "known_id", "duplicate"))
            seen.add(kid)
    return problems


def _report(path: Path, problems: Sequence[Problem]) -> str:
    lines = [f"  {p}" for p in problems[:MAX_PROBLEM_LINES]]
    if len(problems) > MAX_PROBLEM_LINES:
        lines.append(f"  and {len(problems) - MAX_PROBLEM_LINES} more")
    return f"{path}: {len(problems)} problem(s) in known_1000 facts:\n" + "\n".join(lines)


def load_known(path: Path | str | None = None, sha256: str | None = KNOWN_SHA256) -> list[dict]:
    """Read and validate known_1000.json (default :func:`known_path`); returns the facts as dicts.

    The file's sha256 must equal ``sha256`` (pass None to skip the check for another file). Every fact
    is validated and all problems are reported at once in one :class:`KnownDataError` (a ValueError).
    """
    p = Path(path) if path is not None else known_path()
    if not p.exists():
        raise FileNotFoundError(f"no known_1000 file at {p}")
    if sha256 is not None and (got := sha256_file(p)) != sha256:
        raise KnownDataError(f"{p}: sha256 mismatch: expected {sha256}, got {got} (not the known_1000.json of ROME)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KnownDataError(f"{p} is not valid JSON: {err}") from err
    problems = validate_known(data)
    if problems:
        raise KnownDataError(_report(p, problems))
    log.info("loaded %d known_1000 facts from %s", len(data), p)
    return data


# --------------------------------------------------------------------------- building records


@dataclass(frozen=True)
class _Index:
    """Facts grouped by relation and by (relation, true object), each group sorted by known_id."""

    by_relation: dict[str, list[Fact]]
    by_object: dict[tuple[str, str], list[Fact]]
    phrasings: dict[str, list[str]]

    @classmethod
    def build(cls, facts: Sequence[Fact]) -> "_Index":
        by_rel: dict[str, list[Fact]] = defaultdict(list)
        by_obj: dict[tuple[str, str], list[Fact]] = defaultdict(list)
        for f in sorted(facts, key=lambda f: f.known_id):
            by_rel[f.relation_id].append(f)
            by_obj[(f.relation_id, f.target)].append(f)
        phr = {r: sorted({f.template for f in fs} | set(RELATION_PHRASINGS.get(r, []))) for r, fs in by_rel.items()}
        return cls(dict(by_rel), dict(by_obj), phr)


def _target_id(relation_id: str, obj: str) -> str:
    return f"known:{relation_id}:{obj}"


def _same(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def _paraphrase_templates(fact: Fact, index: _Index) -> list[str]:
    """Phrasings of the fact's relation usable as paraphrases: not its own template, nor one whose
    filled text contains the fact's own filled prompt."""
    return [t for t in index.phrasings[fact.relation_id]
            if t != fact.template and fact.filled not in t.format(fact.subject)]


def _draw_sentences(rng: random.Random, pool: Sequence[str], k: int, forbidden: str) -> list[str]:
    """``k`` distinct sentences of ``pool`` (seeded) that do not contain ``forbidden``."""
    chosen: list[int] = []
    for _ in range(50 * k):
        i = rng.randrange(len(pool))
        if i not in chosen and forbidden not in pool[i]:
            chosen.append(i)
            if len(chosen) == k:
                return [pool[i] for i in chosen]
    rest = [i for i in range(len(pool)) if i not in chosen and forbidden not in pool[i]]
    chosen += rest[: k - len(chosen)]
    if not chosen:
        raise ValueError(f"no unrelated sentence that does not contain {forbidden!r}")
    return [pool[chosen[j % len(chosen)]] for j in range(k)]


def _sample_sorted(rng: random.Random, facts: Sequence[Fact], k: int) -> list[Fact]:
    """At most ``k`` of ``facts`` (seeded sample when there are more), in known_id order."""
    picked = list(facts) if len(facts) <= k else rng.sample(list(facts), k)
    return sorted(picked, key=lambda f: f.known_id)


def _record(fact: Fact, index: _Index, rng: random.Random, sentences: Sequence[str]) -> dict | None:
    """The CounterFact record of one fact (case_id left at -1), or None when no target_new exists."""
    rel_facts = index.by_relation[fact.relation_id]
    objects = sorted({f.target for f in rel_facts if not _same(f.target, fact.target)})
    if not objects:
        return None
    new = rng.choice(objects)
    templates = _paraphrase_templates(fact, index)
    if not templates:
        return None
    picked = rng.sample(templates, N_PARAPHRASES) if len(templates) >= N_PARAPHRASES else templates * N_PARAPHRASES
    leads = _draw_sentences(rng, sentences, N_PARAPHRASES, fact.filled)
    paraphrases = [f"{s.strip()} {t.format(fact.subject)}" for s, t in zip(leads, picked)]
    neighbours = [f for f in index.by_object[(fact.relation_id, fact.target)]
                  if f.known_id != fact.known_id and f.subject != fact.subject]
    attribute = [f for f in index.by_object[(fact.relation_id, new)] if f.subject != fact.subject]
    generation = list(dict.fromkeys([fact.filled, *(g.format(fact.subject) for g in GENERATION_TEMPLATES)]))
    return {
        "case_id": -1,
        "pararel_idx": -1,
        "known_id": fact.known_id,
        "requested_rewrite": {
            "prompt": fact.template,
            "subject": fact.subject,
            "relation_id": fact.relation_id,
            "target_true": {"str": fact.target, "id": _target_id(fact.relation_id, fact.target)},
            "target_new": {"str": new, "id": _target_id(fact.relation_id, new)},
        },
        "paraphrase_prompts": paraphrases,
        "neighborhood_prompts": [f.filled for f in _sample_sorted(rng, neighbours, MAX_NEIGHBOURS)],
        "attribute_prompts": [f.filled for f in _sample_sorted(rng, attribute, MAX_ATTRIBUTE)],
        "generation_prompts": generation,
    }


def _sentence_pool(corpus_sentences: Sequence[str] | None) -> list[str]:
    if corpus_sentences is None:
        return list(BUILTIN_SENTENCES)
    pool = [s.strip() for s in corpus_sentences if isinstance(s, str) and s.strip()]
    if not pool:
        raise ValueError("corpus_sentences holds no non-empty sentence")
    return pool


def known_records(
    seed: int = 0, corpus_sentences: Sequence[str] | None = None, path: Path | str | None = None
) -> list[dict]:
    """CounterFact-schema records (JSON-ready dicts) built from known_1000, deterministic in ``seed``.

    Recipe (CounterFact's): ``target_new`` is the true object of another fact of the same relation (a
    different string from ``target_true``, drawn uniformly among the relation's other distinct objects);
    ids are synthetic, ``"known:<relation_id>:<object>"`` (known_1000 has no Wikidata Q-ids). Two
    paraphrase prompts: an unrelated sentence (from ``corpus_sentences`` when given, else
    :data:`BUILTIN_SENTENCES`), a space, and another phrasing of the relation with the subject (the
    relation's other templates in the file plus :data:`RELATION_PHRASINGS`; never the fact's own
    template). Up to 10 neighborhood prompts: other subjects with the same relation and true object, each
    with its own template (possibly none, see the module docstring). Up to 10 attribute prompts: subjects
    of the same relation whose true object is ``target_new``. Generation prompts: the filled prompt and
    :data:`GENERATION_TEMPLATES`. ``case_id`` is the position in the returned list.

    How these records differ from the official CounterFact file: the facts are ones GPT-2 XL already
    completes correctly (ROME's known_1000) rather than ParaRel facts; ``target_new`` is drawn among the
    objects that occur in known_1000, not in all of Wikidata/ParaRel; paraphrases are other templates of
    the relation, not CounterFact's human-written paraphrase set; the unrelated lead-in sentences come
    from WikiText or a built-in list instead of text generated by GPT-2; and neighbours are restricted to
    known_1000, so some facts have none.
    """
    facts = [Fact.of(d) for d in load_known(path)]
    index = _Index.build(facts)
    pool = _sentence_pool(corpus_sentences)
    out: list[dict] = []
    skipped: list[int] = []
    for fact in sorted(facts, key=lambda f: f.known_id):
        rec = _record(fact, index, random.Random(f"known_records:{seed}:{fact.known_id}"), pool)
        if rec is None:
            skipped.append(fact.known_id)
            continue
        rec["case_id"] = len(out)
        out.append(rec)
    if skipped:
        log.info("known_records: left out %d fact(s) with no counterfactual object or paraphrase: known_id %s",
                 len(skipped), skipped)
    n_lonely = sum(not r["neighborhood_prompts"] for r in out)
    log.info("known_records: %d records (seed %d), %d without neighborhood prompts", len(out), seed, n_lonely)
    return out


def write_known_counterfact(dest: Path | str, seed: int = 0, corpus_sentences: Sequence[str] | None = None) -> Path:
    """Write :func:`known_records` as a CounterFact JSON file atomically; returns its path.

    ``dest`` is the file (or an existing folder, which then gets ``counterfact.json``, as
    :func:`helpers.data.load_counterfact` expects).
    """
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / "counterfact.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    records = known_records(seed=seed, corpus_sentences=corpus_sentences)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False, indent=1)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.info("wrote %d known_1000 CounterFact records to %s", len(records), dest)
    return dest
