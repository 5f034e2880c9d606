"""Where the subject is in a prompt (SCIENCE.md §4.2): its token range, with the §4.2 fallback normalisation, and
the filled prompt text. Used by :mod:`helpers.tracing`, evaluation and the problems."""

from __future__ import annotations

from .scoring import bos, encode


class SubjectNotFoundError(ValueError):
    """The subject string does not occur in the prompt, even after the §4.2 fallback normalisation."""

    def __init__(self, case_id, prompt: str, subject: str):
        self.case_id, self.prompt, self.subject = case_id, prompt, subject
        super().__init__(
            f"case_id={case_id!r}: subject {subject!r} not found in prompt {prompt!r} "
            "(also not after unidecode and removing spaces before . , !)"
        )

    def __reduce__(self):  # picklable with its fields (it travels back from Ray workers)
        return type(self), (self.case_id, self.prompt, self.subject)


def _normalise(text: str) -> tuple[str, list[int]]:
    """§4.2 fallback: unidecode each character and drop spaces before . , ! .

    Returns the normalised string and, for each of its characters, the index of the original character it came
    from (so a match can be mapped back to the tokenizer's character offsets).
    """
    from unidecode import unidecode

    chars: list[str] = []
    src: list[int] = []
    for i, c in enumerate(text):
        for u in unidecode(c):
            chars.append(u)
            src.append(i)
    keep = [not (c == " " and j + 1 < len(chars) and chars[j + 1] in ".,!") for j, c in enumerate(chars)]
    return "".join(c for c, k in zip(chars, keep) if k), [s for s, k in zip(src, keep) if k]


def _char_span(prompt: str, subject: str, case_id=None) -> tuple[int, int]:
    """[start, end) characters of the first occurrence of ``subject`` in ``prompt`` (with the §4.2 fallback)."""
    start = prompt.find(subject)
    if start >= 0 and subject:
        return start, start + len(subject)
    p_norm, p_src = _normalise(prompt)
    s_norm, _ = _normalise(subject)
    start = p_norm.find(s_norm) if s_norm else -1
    if start < 0:
        raise SubjectNotFoundError(case_id, prompt, subject)
    end = start + len(s_norm)
    return p_src[start], p_src[end - 1] + 1


def _token_offsets(tok, prompt: str) -> list[tuple[int, int]]:
    """Character [start, end) of each prompt token (fast tokenizers' offsets; else cumulative decoded lengths)."""
    if getattr(tok, "is_fast", False):
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(o) for o in enc["offset_mapping"]]
    offsets, pos = [], 0
    for i in encode(tok, prompt, bos_token=False):  # the published code's method: decode each token, concatenate
        n = len(tok.decode([i]))
        offsets.append((pos, pos + n))
        pos += n
    return offsets


def subject_range(tok, prompt: str, subject: str, case_id=None) -> tuple[int, int]:
    """Token range [b, e) of the first occurrence of ``subject`` in ``prompt``, counted in the ids of
    :func:`helpers.scoring.encode` (so a tokenizer's BOS, when it adds one, is position 0).

    b is the first token ending after the subject's first character, e is one past the last token starting
    before its end. Raises :class:`SubjectNotFoundError` (naming ``case_id``, prompt and subject) if absent.
    """
    c0, c1 = _char_span(prompt, subject, case_id)
    offsets = _token_offsets(tok, prompt)
    b = next((i for i, (_, end) in enumerate(offsets) if end > c0), None)
    e = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < c1), None)
    if b is None or e is None or e < b:
        raise SubjectNotFoundError(case_id, prompt, subject)
    shift = len(bos(tok))
    return b + shift, e + 1 + shift


def fill_prompt(prompt: str, subject: str) -> str:
    """The prompt text: a CounterFact template with ``{}`` gets the subject; a full prompt is returned as is."""
    return prompt.replace("{}", subject) if "{}" in prompt else prompt
