"""CounterFact records: the type, loading (official file or the embedded world), validation, filters.

The schema is the official one (SCIENCE.md §1.2). Records flatten to *fact rows* (one row per record),
the table every later stage starts from::

    case_id, pararel_idx, subject, prompt (template with "{}"), relation_id,
    target_true, target_true_id, target_new, target_new_id,
    paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts (lists of str)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from .checksums import sha256_file

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
OFFICIAL_RECORDS = 21919
# Third-party, unverified (SCIENCE.md §1.1): checked only when the user passes it (or sets it here).
OFFICIAL_SHA256: str | None = None


class RecordError(ValueError):
    """A malformed CounterFact record; the message names the case_id and the field."""

    def __init__(self, case_id: Any, field_name: str, problem: str):
        self.case_id, self.field, self.problem = case_id, field_name, problem
        super().__init__(f"CounterFact record {self.line}")

    def __reduce__(self):  # picklable with its fields (it travels back from Ray workers)
        return type(self), (self.case_id, self.field, self.problem)

    @property
    def line(self) -> str:
        """``case_id=X: field 'F': problem``."""
        return f"case_id={self.case_id}: field {self.field!r}: {self.problem}"


MAX_ERROR_LINES = 20


class RecordErrors(RecordError):
    """Every problem found in a set of records, in one error (``.errors``, in file order).

    A :class:`RecordError` whose ``case_id``/``field``/``problem`` are the first problem's; with one problem its
    message is that problem's own message. Otherwise one line per problem, at most ``MAX_ERROR_LINES``.
    """

    def __init__(self, errors: Sequence[RecordError], max_lines: int = MAX_ERROR_LINES):
        flat = [e for err in errors for e in (err.errors if isinstance(err, RecordErrors) else [err])]
        if not flat:
            raise ValueError("RecordErrors needs at least one RecordError")
        self.errors = flat
        first = flat[0]
        self.case_id, self.field, self.problem = first.case_id, first.field, first.problem
        ValueError.__init__(self, str(first) if len(flat) == 1 else _summary(flat, max_lines))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _summary(errors: Sequence[RecordError], max_lines: int) -> str:
    """Header, one line per problem (at most ``max_lines``), and what was left out."""
    records = list(dict.fromkeys(str(e.case_id) for e in errors))
    lines = [f"{_plural(len(records), 'bad CounterFact record')} ({_plural(len(errors), 'problem')}):"]
    lines += [f"  {e.line}" for e in errors[:max_lines]]
    hidden = errors[max_lines:]
    if hidden:
        shown = {str(e.case_id) for e in errors[:max_lines]}
        unseen = len([r for r in records if r not in shown])
        lines.append(f"  ... and {_plural(unseen, 'more bad record')} ({_plural(len(hidden), 'more problem')} "
                     f"not listed)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    str: str
    id: str


@dataclass(frozen=True)
class RequestedRewrite:
    prompt: str
    subject: str
    relation_id: str
    target_true: Target
    target_new: Target

    @property
    def filled(self) -> str:
        """The full prompt P = prompt.format(subject)."""
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class Record:
    """One CounterFact record (official schema)."""

    case_id: int
    pararel_idx: int
    requested_rewrite: RequestedRewrite
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
            d[k] = list(d[k])
        return d


def _get(obj: dict, key: str, case_id: Any, path: str, kind: type | tuple[type, ...]):
    if not isinstance(obj, dict) or key not in obj:
        raise RecordError(case_id, path, "missing")
    val = obj[key]
    if not isinstance(val, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RecordError(case_id, path, f"expected {names}, got {type(val).__name__}")
    return val


def _str_list(obj: dict, key: str, case_id: Any, required: bool = True) -> tuple[str, ...]:
    """A list of non-empty strings; every bad item is reported."""
    if key not in obj and not required:
        return ()
    items = _get(obj, key, case_id, key, list)
    bad = [RecordError(case_id, f"{key}[{i}]", "expected a non-empty string")
           for i, s in enumerate(items) if not isinstance(s, str) or not s.strip()]
    if bad:
        raise RecordErrors(bad)
    return tuple(items)


def _target(rr: dict, key: str, case_id: Any) -> Target:
    t = _get(rr, key, case_id, f"requested_rewrite.{key}", dict)
    s = _get(t, "str", case_id, f"requested_rewrite.{key}.str", str)
    if not s.strip():
        raise RecordError(case_id, f"requested_rewrite.{key}.str", "empty target")
    tid = t.get("id", "")
    return Target(s, str(tid))


def _prompt(rr: dict, case_id: Any) -> str:
    prompt = _get(rr, "prompt", case_id, "requested_rewrite.prompt", str)
    if prompt.count("{}") != 1:
        raise RecordError(case_id, "requested_rewrite.prompt", f"must contain exactly one '{{}}': {prompt!r}")
    return prompt


def _subject(rr: dict, case_id: Any) -> str:
    subject = _get(rr, "subject", case_id, "requested_rewrite.subject", str)
    if not subject.strip():
        raise RecordError(case_id, "requested_rewrite.subject", "empty subject")
    return subject


def _pararel_idx(obj: dict, case_id: Any) -> int:
    val = obj.get("pararel_idx", -1)
    try:
        return int(val)
    except (TypeError, ValueError):
        raise RecordError(case_id, "pararel_idx", f"expected int, got {type(val).__name__}") from None


class _Problems:
    """Collects record errors: ``take(fn, *args)`` is ``fn(*args)``, or None after noting its error."""

    def __init__(self) -> None:
        self.errors: list[RecordError] = []

    def take(self, fn, *args):
        try:
            return fn(*args)
        except RecordError as err:
            self.errors.append(err)
            return None


def parse_record(obj: dict, position: int | None = None) -> Record:
    """Validate one JSON object in the official schema and return a :class:`Record`.

    Every problem of the record is reported at once: a :class:`RecordErrors` (a :class:`RecordError`) naming
    the case_id (or the list position) and the field of each.
    """
    case_id: Any = obj.get("case_id", f"<position {position}>") if isinstance(obj, dict) else position
    if not isinstance(obj, dict):
        raise RecordError(case_id, "<record>", f"expected a JSON object, got {type(obj).__name__}")
    found = _Problems()
    cid = found.take(_get, obj, "case_id", case_id, "case_id", int)
    label = case_id if cid is None else cid
    rewrite = None
    rr = found.take(_get, obj, "requested_rewrite", label, "requested_rewrite", dict)
    if rr is not None:
        prompt, subject = found.take(_prompt, rr, label), found.take(_subject, rr, label)
        relation = found.take(_get, rr, "relation_id", label, "requested_rewrite.relation_id", str)
        t_true, t_new = found.take(_target, rr, "target_true", label), found.take(_target, rr, "target_new", label)
        if t_true is not None and t_new is not None and t_true.str.strip() == t_new.str.strip():
            found.errors.append(
                RecordError(label, "requested_rewrite.target_new", f"equals target_true ({t_true.str!r})"))
        rewrite = RequestedRewrite(prompt, subject, relation, t_true, t_new)
    lists = {key: found.take(_str_list, obj, key, label, required) for key, required in (
        ("paraphrase_prompts", True), ("neighborhood_prompts", True),
        ("attribute_prompts", False), ("generation_prompts", False))}
    pararel_idx = found.take(_pararel_idx, obj, label)
    if found.errors:
        raise RecordErrors(found.errors)
    return Record(case_id=cid, pararel_idx=pararel_idx, requested_rewrite=rewrite, **lists)


def validate_tokens(records: Iterable[Record], tok) -> None:
    """Check that every subject and target tokenizes to at least one token (needs the model's tokenizer).

    Every problem is reported at once in one :class:`RecordErrors`.
    """
    errors = []
    for r in records:
        rr = r.requested_rewrite
        for fld, text in (
            ("requested_rewrite.subject", rr.subject),
            ("requested_rewrite.target_true.str", " " + rr.target_true.str.lstrip()),
            ("requested_rewrite.target_new.str", " " + rr.target_new.str.lstrip()),
        ):
            if not tok(text.strip() if fld.endswith("subject") else text, add_special_tokens=False)["input_ids"]:
                errors.append(RecordError(r.case_id, fld, f"tokenizes to nothing: {text!r}"))
    if errors:
        raise RecordErrors(errors)


def parse_records(data: Sequence[dict], n: int | None = None) -> list[Record]:
    """Parse the first ``n`` records of a list (all when None).

    All of them are validated; every problem is reported at once in one :class:`RecordErrors` (one line per
    problem, at most ``MAX_ERROR_LINES``).
    """
    if not isinstance(data, list):
        raise ValueError(f"CounterFact data must be a JSON list of records, got {type(data).__name__}")
    items = data if n is None else data[:n]
    records, errors = [], []
    for i, obj in enumerate(items):
        try:
            records.append(parse_record(obj, i))
        except RecordError as err:
            errors.append(err)
    if errors:
        raise RecordErrors(errors)
    return records


def fetch_official(cache_dir: Path | str, url: str = OFFICIAL_URL, sha256: str | None = OFFICIAL_SHA256) -> Path:
    """Download the official counterfact.json into ``cache_dir`` (atomically) unless already there.

    Offline, this raises an error telling the user how to supply the file by hand.
    """
    dest = Path(cache_dir) / "data" / "counterfact.json"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, tempfile.NamedTemporaryFile(
            dir=dest.parent, delete=False
        ) as tmp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                tmp.write(chunk)
    except OSError as err:
        raise OSError(
            f"cannot download CounterFact from {url} ({err}). Download counterfact.json on a machine with "
            f"internet access and pass its path as the profile's `data:` (or copy it to {dest})."
        ) from err
    if sha256 and sha256_file(tmp.name) != sha256:
        os.unlink(tmp.name)
        raise OSError(f"{url}: sha256 mismatch (expected {sha256}); file not kept")
    os.replace(tmp.name, dest)
    return dest


#: A profile's ``data: zsre:<path>`` names a zsRE evaluation file (App. B, Table 8).
ZSRE_PREFIX = "zsre:"


def zsre_path(source: str | Path) -> str | None:
    """The file a ``zsre:<path>`` data source names; None for any other source."""
    s = str(source)
    return s[len(ZSRE_PREFIX):] if s.startswith(ZSRE_PREFIX) else None


def load_counterfact(source: str | Path, n: int | None = None, cache_dir: Path | str = ".cache") -> list[Record]:
    """Load records from a local JSON file, a folder holding counterfact.json, "official" (download), or
    ``"zsre:<path>"``: a file in the schema of zsRE's ``zsre_mend_eval.json`` (:func:`helpers.zsre.load_zsre`),
    each question made a CounterFact record (SCIENCE.md §1.4)."""
    if zsre_path(source) is not None:
        from .zsre import load_zsre

        records = [z.record for z in load_zsre(zsre_path(source), n=n)]
        log.info("loaded %d zsRE records as CounterFact records", len(records))
        return records
    if str(source) == "official":
        path = fetch_official(cache_dir)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "counterfact.json"
    if not path.exists():
        raise FileNotFoundError(f"no CounterFact file at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    records = parse_records(data, n)
    log.info("loaded %d CounterFact records from %s", len(records), path)
    return records


def to_frame(records: Sequence[Record]) -> pd.DataFrame:
    """Flatten records into fact rows (see the module docstring)."""
    rows = []
    for r in records:
        rr = r.requested_rewrite
        rows.append(
            dict(
                case_id=r.case_id,
                pararel_idx=r.pararel_idx,
                subject=rr.subject,
                prompt=rr.prompt,
                relation_id=rr.relation_id,
                target_true=rr.target_true.str,
                target_true_id=rr.target_true.id,
                target_new=rr.target_new.str,
                target_new_id=rr.target_new.id,
                paraphrase_prompts=list(r.paraphrase_prompts),
                neighborhood_prompts=list(r.neighborhood_prompts),
                attribute_prompts=list(r.attribute_prompts),
                generation_prompts=list(r.generation_prompts),
            )
        )
    return pd.DataFrame(rows)


def correctness(
    model,
    tok,
    facts: pd.DataFrame,
    max_new_tokens: int = 36,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Add ``continuation``, ``is_correct`` and ``p_true`` columns (SCIENCE.md §1.3).

    Greedy decoding of ``max_new_tokens`` tokens from the filled prompt; correct iff lower(o_true) is a
    substring of the lower-cased continuation. ``p_true`` = p(o_true | P) over all target tokens.
    """
    from . import generation, scoring
    from .progress import tqdm

    prompts = [p.format(s) for p, s in zip(facts["prompt"], facts["subject"])]
    conts = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="correctness filter", leave=False):
        conts += generation.generate(model, tok, prompts[i : i + batch_size], max_new_tokens=max_new_tokens)
    out = facts.copy()
    out["continuation"] = conts
    out["is_correct"] = [generation.is_correct(c, t) for c, t in zip(conts, facts["target_true"])]
    out["p_true"] = scoring.target_probs(model, tok, prompts, list(facts["target_true"])).numpy()  # CPU tensor
    return out


def erasure_filter(facts: pd.DataFrame, threshold: float = 0.02) -> pd.DataFrame:
    """Facts for Fact Erasure: correct and p(o_true|P) > threshold (strict, SCIENCE.md §1.3)."""
    return facts[facts["is_correct"] & (facts["p_true"] > threshold)]
