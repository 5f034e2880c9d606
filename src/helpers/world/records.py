"""CounterFact-schema records of the world's facts: prompts, paraphrases, neighborhood, attribute and generation
prompts, and a target_new per fact."""

from __future__ import annotations

import numpy as np

from .relations import OBJECT_IDS, RELATION_BY_ID
from .schema import Entity, Fact, WorldConfig


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
