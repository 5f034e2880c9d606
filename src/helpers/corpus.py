"""Real text for the second-moment statistics of ROME/MEMIT and for "unrelated" prefixes: WikiText-2.

Source: the tokenized WikiText-2 splits (Merity et al. 2016, from English Wikipedia, CC BY-SA 3.0), read
from ``<project root>/../shared/data/wikitext-2/`` when that folder exists (each file is checked against
its sha256 from the shared data README), else from the vendored slice
``helpers/vendor/wikitext2_slice.txt.gz`` (the start of ``train.txt``, de-tokenized here; see
``vendor/LICENSE-wikitext.txt``).

Documents: one per paragraph (non-blank, non-heading line), headings (`` = Title = ``, `` = = Sub = = ``)
dropped, de-tokenized by :func:`detokenize`.

``<unk>`` rule: WikiText replaces rare words by ``<unk>``; a sentence holding one is not natural text, and
filling the hole would invent words. :func:`clean_paragraph` therefore **drops every sentence that contains
``<unk>``** (sentences are split on the tokenized form, where a sentence-final ``.``, ``!`` or ``?`` is a
token of its own and abbreviations keep their point, e.g. ``U.S.``), and drops a paragraph when no sentence
survives. On ``train.txt`` this keeps 52% of the paragraph words (1,044,399 of 2,007,146 WikiText tokens;
895,776 whitespace words once de-tokenized), 60% of the sentences (44,033 of 73,789) and 84% of the
paragraphs (14,718 of 17,556); on valid/test, whose rare words are ``<unk>`` by the train vocabulary, only
~25% of the words survive (:func:`survival` measures it).
:func:`detokenize` itself leaves ``<unk>`` untouched.
"""

from __future__ import annotations

import gzip
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .checksums import sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SHA256 = {  # from shared/data/README.md (pytorch/examples word_language_model/data/wikitext-2)
    "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = PROJECT_ROOT.parent / "shared" / "data" / "wikitext-2"
SLICE_PATH = Path(__file__).resolve().parent / "vendor" / "wikitext2_slice.txt.gz"
SLICE_WORDS = 200_000  # whitespace words of de-tokenized text the vendored slice holds (at least)
CORPUS_NAMES = ("wikitext", "wikitext-slice")
UNK = "<unk>"
_TOKEN_ABBREV = {"lit", "c", "ca", "cf", "approx", "i.e", "e.g"}  # abbreviations WikiText split off their point

# ----------------------------------------------------------------------------------------- de-tokenizing
_HEADING = re.compile(r"^(=+) .* \1$")
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r" @([-,.])@ "), r"\1"),  # in-word hyphen, comma, point
    (re.compile(r" (n't|['’](?:s|t|re|ve|ll|d|m))\b"), r"\1"),  # contractions, possessive 's
    (re.compile(r" ’ (s|t|re|ve|ll|d|m)\b"), r"’\1"),  # the curly form is split on both sides: father ’ s
    (re.compile(r"\b([ODL]) ['’] ?([A-Z])"), r"\1'\2"),  # O'Brien, D'Arcy, L'Orange
    (re.compile(r"(s) ' "), r"\1' "),  # plural possessive: the nations ' -> the nations'
    (re.compile(r" ([,.;:!?)\]%”])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[“]) "), r"\1"),  # no space after opening brackets
    (re.compile(r"([$£€]) (?=\d)"), r"\1"),  # $ 14 -> $14
    (re.compile(r" {2,}"), " "),
]


def is_heading(line: str) -> bool:
    """True for a WikiText heading line (`` = Title = ``, `` = = Sub = = ``)."""
    return bool(_HEADING.match(line.strip()))


def _join_quotes(s: str) -> str:
    """Attach straight double quotes to their text: odd ones open (space before), even ones close."""
    parts = s.split('"')
    out = parts[0]
    for i, p in enumerate(parts[1:]):
        if i % 2 == 0:
            out = (out.rstrip() + ' "' if out.strip() else '"') + p.lstrip()
        else:
            out = out.rstrip() + '" ' + p.lstrip()
    return out


def detokenize(line: str) -> str:
    """Undo WikiText tokenization of one line (``<unk>`` kept as is; see the module docstring)."""
    s = _join_quotes(" " + line.strip() + " ")
    for pat, rep in _RULES:
        s = pat.sub(rep, s)
    return s.strip()


def split_tokenized_sentences(line: str) -> list[list[str]]:
    """Sentences of a tokenized WikiText line as token lists.

    A sentence ends at a ``.``/``!``/``?`` token that is followed by the end of the line, a capitalised
    word or a quote, is not inside an open bracket (``( Japanese : ... , lit . Valkyria ... )``) and does not
    follow a split abbreviation (``lit .``, ``c .``); a closing ``"`` right after the end belongs to the
    sentence when it closes a quote opened in it."""
    toks = line.split()
    out: list[list[str]] = []
    cur: list[str] = []
    i = 0
    while i < len(toks):
        cur.append(toks[i])
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        starts = nxt is None or nxt[:1].isupper() or nxt[:1] in "\"“"
        closed = cur.count("(") <= cur.count(")") and cur.count("[") <= cur.count("]")
        abbrev = len(cur) > 1 and cur[-2] in _TOKEN_ABBREV
        if toks[i] in (".", "!", "?") and starts and closed and not abbrev:
            if nxt == '"' and cur.count('"') % 2 == 1:
                cur.append(nxt)
                i += 1
            out.append(cur)
            cur = []
        i += 1
    if cur:
        out.append(cur)
    return out


def clean_paragraph(line: str) -> str | None:
    """A tokenized paragraph de-tokenized with its ``<unk>`` sentences dropped; None if nothing is left."""
    if not line.strip() or is_heading(line):
        return None
    kept = [" ".join(s) for s in split_tokenized_sentences(line) if UNK not in s]
    return detokenize(" ".join(kept)) if kept else None


@dataclass(frozen=True)
class Survival:
    """How much of a tokenized split survives the ``<unk>`` rule (words = WikiText tokens)."""

    paragraphs: int
    paragraphs_kept: int
    sentences: int
    sentences_kept: int
    words: int
    words_kept: int

    @property
    def word_fraction(self) -> float:
        return self.words_kept / max(self.words, 1)


def survival(lines: Sequence[str]) -> Survival:
    """Count paragraphs, sentences and words before and after dropping ``<unk>`` sentences."""
    p = pk = s = sk = w = wk = 0
    for line in lines:
        if not line.strip() or is_heading(line):
            continue
        sents = split_tokenized_sentences(line)
        kept = [x for x in sents if UNK not in x]
        p, pk = p + 1, pk + bool(kept)
        s, sk = s + len(sents), sk + len(kept)
        w, wk = w + sum(map(len, sents)), wk + sum(map(len, kept))
    return Survival(p, pk, s, sk, w, wk)


# ----------------------------------------------------------------------------------------- loading
def read_split_lines(split: str = "train", source: str | Path | None = None) -> list[str]:
    """Raw tokenized lines of a split from ``source`` (or the shared folder, sha256-checked)."""
    if split not in SPLITS:
        raise ValueError(f"unknown WikiText-2 split {split!r}; options: {', '.join(SPLITS)}")
    folder = Path(source) if source is not None else SHARED_DIR
    path = folder / f"{split}.txt"
    if not path.exists():
        raise FileNotFoundError(f"WikiText-2 split file not found: {path}")
    digest = sha256_file(path)
    if digest != SHA256[split]:
        msg = f"{path}: sha256 {digest} differs from the expected {SHA256[split]} (shared/data/README.md)"
        if source is None:
            raise ValueError(msg)
        log.warning("%s; using it anyway (explicit source)", msg)
    return path.read_text(encoding="utf-8").splitlines()


def shared_available() -> bool:
    """Whether the shared WikiText-2 folder (with train.txt) exists next to the project."""
    return (SHARED_DIR / "train.txt").exists()


def read_slice(path: str | Path = SLICE_PATH) -> list[str]:
    """The vendored slice: de-tokenized documents, one per line."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [l for l in f.read().splitlines() if l.strip()]


def wikitext_documents(split: str = "train", source: str | Path | None = None) -> list[str]:
    """De-tokenized WikiText-2 paragraphs (one document each, headings and ``<unk>`` sentences dropped).

    From ``source`` (a folder with ``<split>.txt``) or the shared folder; without either, the vendored
    slice (train only)."""
    if source is None and not shared_available():
        if split != "train":
            raise FileNotFoundError(
                f"WikiText-2 {split!r} needs the shared folder {SHARED_DIR} or an explicit source; "
                "only a slice of 'train' is vendored"
            )
        log.info("WikiText-2: shared folder %s not found, using the vendored slice", SHARED_DIR)
        return read_slice()
    docs = [clean_paragraph(l) for l in read_split_lines(split, source)]
    return [d for d in docs if d]


def slice_documents(n_words: int = SLICE_WORDS, source: str | Path | None = None) -> list[str]:
    """Leading documents of train.txt, whole, until they hold at least ``n_words`` words."""
    out, words = [], 0
    for line in read_split_lines("train", source):
        doc = clean_paragraph(line)
        if not doc:
            continue
        out.append(doc)
        words += len(doc.split())
        if words >= n_words:
            break
    return out


def write_slice(dest: str | Path = SLICE_PATH, n_words: int = SLICE_WORDS,
                source: str | Path | None = None) -> tuple[int, int]:
    """Regenerate the vendored slice deterministically (gzip with mtime 0); returns (words, bytes)."""
    docs = slice_documents(n_words, source)
    data = gzip.compress(("\n".join(docs) + "\n").encode("utf-8"), compresslevel=9, mtime=0)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    Path(dest).write_bytes(data)
    words = sum(len(d.split()) for d in docs)
    log.info("wrote %s: %d documents, %d words, %d bytes", dest, len(docs), words, len(data))
    return words, len(data)


def corpus_for(spec: str | Path | Mapping) -> list[str]:
    """Documents for a profile's ``stats: {corpus: ..., tokens: N}`` (the mapping or its corpus value).

    ``"wikitext"``: the full shared train split when present, else the slice; ``"wikitext-slice"``: the
    vendored slice; anything else: a text file with one document per line."""
    name = spec.get("corpus") if isinstance(spec, Mapping) else spec
    if name is None:
        raise ValueError(f"stats spec {spec!r} has no 'corpus'; options: {', '.join(CORPUS_NAMES)} or a file")
    if name == "wikitext":
        return wikitext_documents("train")
    if name == "wikitext-slice":
        return read_slice()
    path = Path(name)
    if path.is_file():
        return [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    raise ValueError(
        f"unknown corpus {str(name)!r}: not {' or '.join(repr(n) for n in CORPUS_NAMES)}, "
        "and no such text file (one document per line)"
    )


# ----------------------------------------------------------------------------------------- sentences
_ABBREV = {"Mr", "Mrs", "Ms", "Dr", "St", "No", "Op", "Jr", "Sr", "Lt", "Gen", "Col", "Capt", "Sgt", "Mt",
           "Ft", "vs", "etc", "Inc", "Co", "Ltd", "Rev", "Gov", "Sen", "Rep", "Prof", "Vol", "pp", "ca", "lit"}
_SENT_END = re.compile(r"(?<=[.!?])[\"”]?\s+(?=[\"“(]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of de-tokenized text: cut after ``.``/``!``/``?`` before an upper-case start, except
    after an initial (``J.``), a dotted abbreviation (``U.S.``) or a known abbreviation (``Dr.``)."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        head = text[start : m.start()]
        last = head.split()[-1] if head.split() else ""
        word = last.rstrip(".!?")
        if last.endswith(".") and (len(word) == 1 or "." in word or word in _ABBREV):
            continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def _natural(s: str, min_words: int, max_words: int) -> bool:
    """A whole, plain sentence: capitalised, ends with a point, no WikiText residue, balanced marks."""
    n = len(s.split())
    return (
        min_words <= n <= max_words
        and s[:1].isupper()
        and s.endswith(".")
        and not s.endswith("..")
        and UNK not in s
        and "@" not in s
        and s.count('"') % 2 == 0
        and s.count("(") == s.count(")")
        and s.count("[") == s.count("]")
        and "=" not in s
    )


def unrelated_sentences(docs: Sequence[str], n: int, seed: int, min_words: int = 6,
                        max_words: int = 25) -> list[str]:
    """``n`` distinct whole sentences of the documents, drawn deterministically from ``seed``."""
    seen: dict[str, None] = {}
    for d in docs:
        for s in split_sentences(d):
            if _natural(s, min_words, max_words):
                seen.setdefault(s, None)
    pool = list(seen)
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} suitable sentences in the documents; {n} requested")
    return random.Random(seed).sample(pool, n)


# ----------------------------------------------------------------------------------------- stability
@dataclass(frozen=True)
class Stability:
    """Is ``n_tokens`` keys enough? C from the first half of the key sample vs from all of it."""

    layer: int
    n_tokens: int  # keys in the full estimate
    n_half: int  # keys in the half estimate
    d_ff: int  # key dimension
    rel_frobenius: float  # ||C_half - C_all||_F / ||C_all||_F
    cosines: list[float]  # cos(C_half^-1 k, C_all^-1 k) per probe key
    probe: str  # "random" (seeded Gaussian keys) or "prompts" (last-token keys of the given prompts)
    ridge: bool  # whether the ridge was needed for either inverse

    @property
    def tokens_per_dim(self) -> float:
        return self.n_tokens / self.d_ff

    @property
    def min_cosine(self) -> float:
        return min(self.cosines)


def _solve(c: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """C^-1 k in float64; adds 1e-6 * trace(C)/d to the diagonal when C is (numerically) singular."""
    c = c.double()
    w = torch.linalg.eigvalsh(c)
    ridge = bool(w.min() <= 1e-10 * w.max().clamp_min(1e-300))
    if ridge:
        c = c + 1e-6 * torch.trace(c) / c.shape[0] * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.solve(c, k.double()), ridge


def _prompt_keys(model: nn.Module, tok, prompts: Sequence[str], layer: int) -> torch.Tensor:
    """(len(prompts), d_ff) down-projection inputs at each prompt's last token."""
    from . import hooks, models, scoring

    name = models.module_name(model, "down_proj", layer)
    dev = models.device_of(model)
    keys = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([scoring.encode(tok, p)], device=dev)
            with hooks.trace(model, [name], retain_output=False, retain_input=True, stop=True) as tr:
                model(input_ids=ids)
            keys.append(tr.inputs[name][0, -1].double())
    return torch.stack(keys)


def stability(model: nn.Module, tok, docs: Sequence[str], layer: int, n_tokens: int, n_probe: int = 8,
              prompts: Sequence[str] | None = None, seed: int = 0, batch_size: int = 8,
              max_len: int | None = None) -> Stability:
    """Compare C from ``n_tokens // 2`` keys with C from ``n_tokens`` keys (the same seeded key stream, so
    the half is its first half): relative Frobenius difference and cosines of ROME's left vector C^-1 k
    for ``n_probe`` seeded Gaussian keys (a harsh probe: it weights the poorly estimated low-variance
    directions) or, with ``prompts``, the real keys at their last tokens."""
    from .editing.stats import compute_second_moments

    kw = dict(batch_size=batch_size, max_len=max_len, seed=seed, progress=False)
    half, n_half = compute_second_moments(model, tok, docs, [layer], n_tokens // 2, **kw)
    full, n_all = compute_second_moments(model, tok, docs, [layer], n_tokens, **kw)
    c_half, c_all = half[layer].double(), full[layer].double()
    d_ff = c_all.shape[0]
    if prompts:
        keys, probe = _prompt_keys(model, tok, prompts, layer), "prompts"
    else:
        g = torch.Generator().manual_seed(seed)  # drawn on the CPU (the same keys on every device), then moved
        keys = torch.randn(n_probe, d_ff, generator=g, dtype=torch.float64).to(c_all.device)
        probe = "random"
    u_half, r1 = _solve(c_half, keys.T)
    u_all, r2 = _solve(c_all, keys.T)
    cos = torch.nn.functional.cosine_similarity(u_half.T, u_all.T, dim=1)
    rel = float(torch.linalg.norm(c_half - c_all) / torch.linalg.norm(c_all))
    if n_all < n_tokens:
        log.warning("stability: the corpus gave %d keys, fewer than the %d requested", n_all, n_tokens)
    return Stability(layer, n_all, n_half, d_ff, rel, cos.tolist(), probe, r1 or r2)
