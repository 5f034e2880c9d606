"""The world corpus: sentences about one subject (relation phrasings, appositives, infobox and index lines,
distractors and asides), documents covering every fact exactly ``frequency`` times, and the who's-who index
lines read first. See :mod:`helpers.world.generate` for why the corpus looks the way it does."""

from __future__ import annotations

import numpy as np

from .relations import DISTRACTOR_LINKS, INTERJECTIONS, RELATION_BY_ID, Relation
from .schema import Entity, Fact, WorldConfig


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
