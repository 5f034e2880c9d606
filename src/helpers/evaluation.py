"""Measuring a task on a model: the probabilities every metric of SCIENCE.md §7 is computed from.

:func:`measure` returns, for one :class:`~helpers.problems.Task` on the model *as it is now* (pre- or
post-edit), p(target) on the rewrite prompt, each paraphrase and each neighborhood prompt, p(baseline) on
the same prompts (for the unscaled metrics), and the essence perplexity. Fact Forcing evaluates every prompt
that contains the subject with noise on that prompt's own subject tokens, drawn from a generator seeded
afresh on every call, so pre- and post-edit measurements see identical noise.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from . import generation, metrics, scoring
from .editing import NoiseSpec, input_noise
from .editing.base import NoisePositions
from .models import device_of
from .problems import Task
from .tracing import SubjectNotFoundError, fill_prompt, subject_range

EVAL_NOISE_SEED = 1


@dataclass(frozen=True)
class Prompts:
    """The evaluation prompts of one fact (filled, subject included)."""

    rewrite: str
    paraphrases: tuple[str, ...]
    neighborhood: tuple[str, ...]

    @classmethod
    def of(cls, fact: Mapping) -> "Prompts":
        return cls(
            fill_prompt(fact["prompt"], fact["subject"]),
            tuple(fact["paraphrase_prompts"]),
            tuple(fact["neighborhood_prompts"]),
        )


def _ranges(tok, prompts: Sequence[str], subject: str) -> list[tuple[int, int]]:
    out = []
    for p in prompts:
        try:
            out.append(subject_range(tok, p, subject))
        except SubjectNotFoundError:
            out.append((0, 0))  # no subject in this prompt: nothing noised
    return out


def _noisy(model: nn.Module, tok, prompts: Sequence[str], subject: str, sigma: float | None):
    """Context adding evaluation noise at each prompt's own subject tokens (a no-op when sigma is None)."""
    if sigma is None:
        return input_noise(model, None, NoisePositions(None, (0, 0)))
    spec = NoiseSpec(sigma=sigma, n_samples=1, seed=EVAL_NOISE_SEED, positions="subject")
    pos = NoisePositions(spec, (0, 0))
    pos.set_rows(_ranges(tok, prompts, subject))
    return input_noise(model, spec, pos)


def probs(model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], subject: str,
          sigma: float | None = None) -> list[float]:
    """p(target_i | prompt_i) in one padded batch, with evaluation noise when ``sigma`` is given."""
    with _noisy(model, tok, prompts, subject, sigma):
        return scoring.target_probs(model, tok, list(prompts), list(targets), batch_size=len(prompts)).tolist()


def essence_texts(model: nn.Module, tok, subject: str, n: int = 5, max_out_len: int = 100, seed: int = 0) -> list[str]:
    """Texts sampled from the (pre-edit) model after "{s} is a" (top-k 5, ``max_out_len`` tokens in total),
    NFKD-normalized, blank lines folded, end-of-text removed (SCIENCE.md §7.2)."""
    return essence_texts_many(model, tok, [subject], [seed], n=n, max_out_len=max_out_len)[0]


def essence_texts_many(model: nn.Module, tok, subjects: Sequence[str], seeds: Sequence[int], n: int = 5,
                       max_out_len: int = 100, facts_per_pass: int = 8) -> list[list[str]]:
    """:func:`essence_texts` of each (subject, seed), sampled for up to ``facts_per_pass`` subjects together:
    each subject's ``n`` rows draw from their own generator, so a subject gets the texts its one-subject call
    gives wherever batching leaves the model's probabilities unchanged (it changes them only by float rounding).
    One decoding step costs about as much for 40 rows as for 5 on a CPU (it reads every weight once), so this
    is several times faster than one subject at a time."""
    if len(subjects) != len(seeds):
        raise ValueError(f"{len(subjects)} subjects but {len(seeds)} seeds")
    prompts = [f"{s} is a" for s in subjects for _ in range(n)]
    conts = generation.generate(model, tok, prompts, max_out_len=max_out_len, top_k=5,
                                seed=[int(sd) for sd in seeds for _ in range(n)],
                                batch_size=max(1, n * facts_per_pass))
    eos = tok.eos_token or ""
    out = []
    for k in range(len(subjects)):
        texts = []
        for prompt, c in zip(prompts[k * n : (k + 1) * n], conts[k * n : (k + 1) * n]):
            text = unicodedata.normalize("NFKD", f"{prompt} {c}".strip()).replace("\n\n", " ")
            texts.append(text.replace(eos, "") if eos else text)
        out.append(texts)
    return out


def essence_ppl(model: nn.Module, tok, texts: Sequence[str], subject: str, sigma: float | None = None,
                max_tokens: int = 100) -> float:
    """Mean perplexity of the essence texts (§7.2), with subject noise for Fact Forcing."""
    with _noisy(model, tok, texts, subject, sigma):
        lps = scoring.text_token_logprobs(model, tok, texts, max_tokens=max_tokens)
    return metrics.essence_ppl([lp.numpy() for lp in lps])


def measure(model: nn.Module, tok, task: Task, fact: Mapping, essence: Sequence[str] | None = None) -> dict:
    """Probabilities of one task on the model as it is now. Lists follow the fact's prompt order.

    Keys: rewrite, paraphrase (list), neighborhood (list), rewrite_base, paraphrase_base (list),
    neighborhood_base (list: p(o_true) on neighbours, for ROME-style success), essence_ppl.
    """
    P = Prompts.of(fact)
    subj = fact["subject"]
    sigma = task.eval_sigma
    own = [P.rewrite, *P.paraphrases]
    nb = list(P.neighborhood)
    p_target = probs(model, tok, own + nb, [task.target] * len(own) + [task.neighborhood_target] * len(nb), subj, sigma)
    p_base = probs(model, tok, own + nb, [task.baseline] * len(own) + [fact["target_true"]] * len(nb), subj, sigma)
    k = len(own)
    out = {
        "rewrite": p_target[0],
        "paraphrase": p_target[1:k],
        "neighborhood": p_target[k:],
        "rewrite_base": p_base[0],
        "paraphrase_base": p_base[1:k],
        "neighborhood_base": p_base[k:],
    }
    out["essence_ppl"] = essence_ppl(model, tok, essence, subj, sigma) if essence else float("nan")
    return out


@torch.no_grad()
def top_predictions(model: nn.Module, tok, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities."""
    ids = torch.tensor([scoring.encode(tok, prompt)], device=device_of(model))
    p = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    vals, idx = p.topk(k)
    return [(tok.decode([i]), v) for v, i in zip(vals.tolist(), idx.tolist())]
