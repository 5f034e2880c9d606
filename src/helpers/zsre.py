"""zsRE evaluation records (``zsre_mend_eval.json``) in the CounterFact schema (SCIENCE.md §1.4).

The official file (MEND's format, as read by ROME's code; URL in SCIENCE.md §1.1) is a JSON list of
objects with ``subject``, ``src`` (the question, containing the subject), ``rephrase`` (a paraphrased
question), ``answers`` (list of str), ``loc`` (a Natural Questions question, ``"nq question: ..."``),
``loc_ans`` and MEND's ``alt``, ``pred``, ``cond`` (not used here). :func:`load_zsre` validates every
record, reports all bad ones at once, and returns :class:`ZsreRecord` objects; each wraps a
:class:`helpers.data.Record` (built through :func:`helpers.data.parse_record`, so the CounterFact type
validates it) and keeps the NQ neighbour's own answer beside it.

The recipe (SCIENCE.md §1.4)
----------------------------
- ``case_id`` = the record's 0-based position in the file (as in CounterFact).
- ``prompt`` = ``"Question: {src} Answer:"`` with the first occurrence of the subject in the stripped
  ``src`` replaced by ``{}``; a subject not found in ``src`` (case-sensitive) makes the record bad, and so
  does a brace in ``src`` (the prompt is a ``str.format`` template).
- ``target_true`` = ``answers[0]`` (stripped). ``target_new`` (o_false) = the ``answers[0]`` of another
  record, drawn as described below.
- ``paraphrase_prompts`` = ``("Question: {rephrase} Answer:",)`` (one paraphrase).
- Neighbourhood: ``loc`` with a leading ``"nq question: "`` (any case) removed and its first letter
  upper-cased (the rest is kept as is; no ``?`` is added), written ``"Question: {q} Answer:"``. This is
  ``ZsreRecord.loc_prompt`` and the record's only neighborhood prompt, so the CounterFact pipeline scores
  its neighborhood target on it, which is what SCIENCE.md §1.4 says the eval does ("scores the target on
  it"). The NQ question's own answer ``loc_ans`` cannot live in a Record; it is ``ZsreRecord.loc_answer``,
  for a MEND/ROME-style neighbourhood score (p(loc_answer | loc_prompt), pre vs post edit).
- ``relation_id`` = ``"zsRE"`` (the file has no Wikidata property), target ids ``""``, ``pararel_idx`` -1.

The o_false draw (global seed, numpy)
-------------------------------------
``rng = np.random.RandomState(seed)``; records are visited in file order, i = 0, 1, ...; for record i,
``j = rng.randint(N - 1)`` with ``j += 1`` if ``j >= i`` (uniform over the N - 1 other records of the
whole file), redrawn while ``answers[0]`` of j equals o_true of i after ``strip().casefold()``; o_false =
``answers[0]`` of j (stripped) and ``ZsreRecord.o_false_from`` = j. The draws of record i depend only on
the seed and the file, never on ``n``: the first n records are the same whatever ``n``.

Checking a copy: :data:`ZSRE_GIT_BLOB` is git's blob hash of the official file (``../shared/data/README.md``);
:func:`git_blob_sha1` computes it for a user's copy (``git hash-object FILE`` gives the same).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import data
from .data import Record, RecordError

log = logging.getLogger(__name__)

ZSRE_GIT_BLOB = "8546c90abc10b77ebc9fd69de178cf7837ff86dc"
RELATION_ID = "zsRE"
NQ_PREFIX = "nq question:"
MAX_PROBLEM_LINES = 20
MAX_REDRAWS = 10_000
REQUIRED_STR = ("subject", "src", "rephrase", "loc", "loc_ans")


@dataclass(frozen=True)
class Problem:
    """One validation problem: which record (0-based position in the file), which field, what is wrong."""

    index: int
    field: str
    problem: str

    def __str__(self) -> str:
        return f"record {self.index}: field {self.field!r}: {self.problem}"


class ZsreDataError(ValueError):
    """Bad zsRE records; ``problems`` lists all of them, the message the first :data:`MAX_PROBLEM_LINES`."""

    def __init__(self, path: Path | str, problems: Sequence[Problem]):
        self.path, self.problems = path, list(problems)
        lines = [f"  {p}" for p in self.problems[:MAX_PROBLEM_LINES]]
        if len(self.problems) > MAX_PROBLEM_LINES:
            lines.append(f"  and {len(self.problems) - MAX_PROBLEM_LINES} more")
        n_bad = len({p.index for p in self.problems})
        super().__init__(
            f"{path}: {len(self.problems)} problem(s) in {n_bad} zsRE record(s):\n" + "\n".join(lines)
        )


@dataclass(frozen=True)
class ZsreRecord:
    """A zsRE record: the CounterFact-schema :class:`Record` plus the NQ neighbour's own answer.

    ``record.neighborhood_prompts == (loc_prompt,)``; ``o_false_from`` is the case_id whose ``answers[0]``
    became ``record``'s ``target_new``.
    """

    record: Record
    loc_prompt: str
    loc_answer: str
    o_false_from: int

    def __post_init__(self) -> None:
        if self.record.neighborhood_prompts != (self.loc_prompt,):
            raise RecordError(self.case_id, "neighborhood_prompts", "must be exactly (loc_prompt,)")

    @property
    def case_id(self) -> int:
        return self.record.case_id

    def to_json(self) -> dict:
        """The record's official-schema JSON plus ``loc_prompt``, ``loc_answer``, ``o_false_from``
        (extra keys, which :func:`helpers.data.parse_record` ignores)."""
        return dict(self.record.to_json(), loc_prompt=self.loc_prompt, loc_answer=self.loc_answer,
                    o_false_from=self.o_false_from)


def git_blob_sha1(path: Path | str) -> str:
    """Git's blob hash of a file: sha1 of ``b"blob <size>\\0"`` + content (= ``git hash-object FILE``)."""
    p = Path(path)
    h = hashlib.sha1(f"blob {p.stat().st_size}\0".encode())
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def question_prompt(question: str) -> str:
    """``"Question: {question} Answer:"`` (the question stripped)."""
    return f"Question: {question.strip()} Answer:"


def nq_question(loc: str) -> str:
    """The NQ question of ``loc``: a leading ``"nq question:"`` (any case) removed, first letter upper-cased."""
    q = loc.strip()
    if q.lower().startswith(NQ_PREFIX):
        q = q[len(NQ_PREFIX):].strip()
    return q[:1].upper() + q[1:]


def _type_name(val: Any) -> str:
    return type(val).__name__


def _norm(answer: str) -> str:
    return answer.strip().casefold()


def record_problems(obj: Any, index: int) -> list[Problem]:
    """Every problem of one raw zsRE record (an empty list when it is valid)."""
    if not isinstance(obj, dict):
        return [Problem(index, "<record>", f"expected a JSON object, got {_type_name(obj)}")]
    out: list[Problem] = []
    for name in REQUIRED_STR:
        if name not in obj:
            out.append(Problem(index, name, "missing"))
        elif not isinstance(obj[name], str):
            out.append(Problem(index, name, f"expected str, got {_type_name(obj[name])}"))
        elif not obj[name].strip():
            out.append(Problem(index, name, "empty"))
    answers = obj.get("answers")
    if "answers" not in obj:
        out.append(Problem(index, "answers", "missing"))
    elif not isinstance(answers, list):
        out.append(Problem(index, "answers", f"expected a list of str, got {_type_name(answers)}"))
    elif not answers:
        out.append(Problem(index, "answers", "empty list (o_true = answers[0])"))
    elif not isinstance(answers[0], str) or not answers[0].strip():
        out.append(Problem(index, "answers[0]", "expected a non-empty string"))
    subject, src, loc = obj.get("subject"), obj.get("src"), obj.get("loc")
    if all(isinstance(v, str) and v.strip() for v in (subject, src)):
        if subject not in src:
            out.append(Problem(index, "src", f"subject {subject!r} not found in the question {src!r}"))
        elif "{" in src or "}" in src:
            out.append(Problem(index, "src", f"contains a brace (the prompt is a template): {src!r}"))
    if isinstance(loc, str) and loc.strip() and not nq_question(loc):
        out.append(Problem(index, "loc", f"no question after the {NQ_PREFIX!r} prefix: {loc!r}"))
    return out


def validate_zsre(raw: Any) -> list[Problem]:
    """Every problem of a parsed zsRE file (a JSON list of records); an empty list when it is valid."""
    if not isinstance(raw, list):
        return [Problem(-1, "<top level>", f"expected a JSON list of records, got {_type_name(raw)}")]
    problems = [p for i, obj in enumerate(raw) for p in record_problems(obj, i)]
    if not problems:
        counts = Counter(_norm(r["answers"][0]) for r in raw)
        for i, r in enumerate(raw):
            if counts[_norm(r["answers"][0])] == len(raw):
                problems.append(Problem(i, "answers[0]", "no other record has a different answer to draw "
                                                         "o_false from"))
    return problems


def draw_false_sources(answers: Sequence[str], n: int, seed: int = 0) -> list[int]:
    """For records 0..n-1, the index j != i whose answer is o_false (see the module docstring).

    ``answers`` holds every record's o_true (the whole file); at least one other record must differ.
    """
    rng = np.random.RandomState(seed)
    norm = [_norm(a) for a in answers]
    total = len(answers)
    out = []
    for i in range(n):
        for _ in range(MAX_REDRAWS):
            j = int(rng.randint(total - 1))
            if j >= i:
                j += 1
            if norm[j] != norm[i]:
                break
        else:
            raise RuntimeError(f"zsRE record {i}: no o_false found in {MAX_REDRAWS} draws")
        out.append(j)
    return out


def build_record(obj: dict, case_id: int, o_false: str, o_false_from: int) -> ZsreRecord:
    """One validated raw record -> :class:`ZsreRecord` (the Record built by :func:`helpers.data.parse_record`)."""
    subject = obj["subject"]
    template = question_prompt(obj["src"].replace(subject, "{}", 1))
    loc_prompt = question_prompt(nq_question(obj["loc"]))
    cf = {
        "case_id": case_id,
        "pararel_idx": -1,
        "requested_rewrite": {
            "prompt": template,
            "subject": subject,
            "relation_id": RELATION_ID,
            "target_true": {"str": obj["answers"][0].strip(), "id": ""},
            "target_new": {"str": o_false.strip(), "id": ""},
        },
        "paraphrase_prompts": [question_prompt(obj["rephrase"])],
        "neighborhood_prompts": [loc_prompt],
    }
    return ZsreRecord(data.parse_record(cf, case_id), loc_prompt, obj["loc_ans"].strip(), o_false_from)


def read_json_list(path: Path) -> list:
    """The JSON list in ``path``; clear errors naming the path for a missing file, bad JSON, a non-list."""
    if not path.is_file():
        raise FileNotFoundError(f"no zsRE file at {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of zsRE records, got {_type_name(raw)}")
    if not raw:
        raise ValueError(f"{path}: the JSON list holds no zsRE records")
    return raw


def check_blob(path: Path, expected: str = ZSRE_GIT_BLOB) -> bool:
    """Whether ``path`` is the official file; a warning (not an error) when not, since subsets are allowed."""
    blob = git_blob_sha1(path)
    if blob != expected:
        log.warning("%s: git blob %s differs from the official zsre_mend_eval.json (%s); "
                    "fine for a subset, otherwise check your copy", path, blob, expected)
        return False
    log.info("%s: official zsre_mend_eval.json (git blob %s)", path, blob)
    return True


def load_zsre(path: Path | str, n: int | None = None, seed: int = 0, check: bool = True) -> list[ZsreRecord]:
    """Load, validate and convert ``zsre_mend_eval.json`` (or any file in its schema): the first ``n`` records.

    Every record of the file is validated (also beyond ``n``) and all problems are raised at once in one
    :class:`ZsreDataError`. o_false is drawn over the whole file with ``seed`` (module docstring).
    ``check`` compares the file's git blob hash with :data:`ZSRE_GIT_BLOB` and logs a warning on mismatch.
    """
    p = Path(path)
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    raw = read_json_list(p)
    if check:
        check_blob(p)
    problems = validate_zsre(raw)
    if problems:
        raise ZsreDataError(p, problems)
    count = len(raw) if n is None else min(n, len(raw))
    answers = [r["answers"][0] for r in raw]
    sources = draw_false_sources(answers, count, seed)
    records = [build_record(raw[i], i, answers[j], j) for i, j in enumerate(sources)]
    log.info("loaded %d of %d zsRE records from %s (o_false seed %d)", len(records), len(raw), p, seed)
    return records


def to_frame(records: Sequence[ZsreRecord]) -> pd.DataFrame:
    """Fact rows as :func:`helpers.data.to_frame` gives them, plus ``loc_prompt`` and ``loc_answer``."""
    df = data.to_frame([z.record for z in records])
    df["loc_prompt"] = [z.loc_prompt for z in records]
    df["loc_answer"] = [z.loc_answer for z in records]
    return df
