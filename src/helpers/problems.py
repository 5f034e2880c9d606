"""The five editing problems (SCIENCE.md §5): what each edit optimizes, in which direction, on which input.

| key | problem | target | direction | input |
|---|---|---|---|---|
| ei | Error Injection | o_false (CounterFact's target_new) | raise | clean |
| tr | Tracing Reversal | o_noise: the model's output for the noised subject | raise | clean |
| fe | Fact Erasure | o_true | lower | clean |
| fa | Fact Amplification | o_true | raise | clean |
| ff | Fact Forcing | o_true | raise | noised subject (editing and evaluation) |

The paper's rule is the default; :class:`ProblemOptions` reproduces the released code where it differs
(SCIENCE.md §10): the Tracing Reversal target as the whole sampled string, Fact Forcing noise at the bare
prompt's subject positions inside templated prompts, and the neighborhood target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from . import generation, scoring
from .editing import EditRequest, NoiseSpec, input_noise
from .editing.base import NoisePositions
from .models import device_of
from .tracing import fill_prompt, subject_range


@dataclass(frozen=True)
class Problem:
    key: str
    name: str
    direction: str  # "raise" | "lower"
    noised: bool  # Fact Forcing: noise on the subject during editing and evaluation


PROBLEMS: dict[str, Problem] = {
    "ei": Problem("ei", "Error Injection", "raise", False),
    "tr": Problem("tr", "Tracing Reversal", "raise", False),
    "fe": Problem("fe", "Fact Erasure", "lower", False),
    "fa": Problem("fa", "Fact Amplification", "raise", False),
    "ff": Problem("ff", "Fact Forcing", "raise", True),
}
ALIASES = {
    "error_injection": "ei", "tracing_reversal": "tr", "fact_erasure": "fe",
    "fact_amplification": "fa", "fact_forcing": "ff",
}


def get_problem(key: str) -> Problem:
    k = ALIASES.get(key, key)
    if k not in PROBLEMS:
        raise KeyError(f"unknown problem {key!r}; known: {', '.join(PROBLEMS)}")
    return PROBLEMS[k]


@dataclass(frozen=True)
class ProblemOptions:
    """Paper rule (default) vs the released code's behaviour, per divergence (SCIENCE.md §10).

    tr_target: "continuation" (paper: o_noise is the noised model's output) or "code" (the decoded prompt +
      continuation, which the released code uses as target_new).
    ff_noise_positions: "subject" (noise each templated prompt's own subject tokens) or "code" (positions
      [b, e) of the bare prompt in every prompt, hitting template prefixes).
    neighborhood_target: "paper" (o_false for every problem) or "code" (the problem's target).
    tr_max_out_len: total tokens (prompt included) of the Tracing Reversal sample (code: 12).
    """

    tr_target: str = "continuation"
    ff_noise_positions: str = "subject"
    neighborhood_target: str = "paper"
    tr_max_out_len: int = 12

    def __post_init__(self) -> None:
        checks = {
            "tr_target": ("continuation", "code"),
            "ff_noise_positions": ("subject", "code"),
            "neighborhood_target": ("paper", "code"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ProblemOptions.{name} must be one of {allowed}, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class Task:
    """One fact posed as one problem: the edit request and what the evaluation scores.

    target: the string the editor optimizes and the rewrite/paraphrase metrics score.
    baseline: the competing string for the unscaled metrics (request_baseline).
    neighborhood_target: what the neighborhood score is computed on.
    eval_sigma: noise σ on subject positions during evaluation (Fact Forcing) or None.
    """

    case_id: int
    problem: str
    request: EditRequest
    target: str
    baseline: str
    neighborhood_target: str
    eval_sigma: float | None


def noised_sample(model: nn.Module, tok, prompt: str, subject: str, sigma: float, max_out_len: int = 12,
                  seed: int = 1, top_k: int = 5) -> str:
    """o_noise: one top-k sample (``max_out_len`` tokens in total) from the prompt with its subject noised.

    As in the released code, every row is noised with fresh draws from a seed-1 generator, and only the first
    pass (the whole prompt) is noised; later tokens build on the noised key/value cache.
    """
    b, e = subject_range(tok, prompt, subject)
    spec = NoiseSpec(sigma=sigma, n_samples=1, seed=seed, positions="subject")
    pos = NoisePositions(spec, (b, e))
    pos.set_rows([(b, e)])
    with input_noise(model, spec, pos):
        return generation.generate(model, tok, [prompt], max_out_len=max_out_len, top_k=top_k, seed=seed)[0]


def make_task(
    model: nn.Module,
    tok,
    fact: Mapping,
    problem: str,
    sigma: float,
    options: ProblemOptions = ProblemOptions(),
) -> Task:
    """Build the :class:`Task` for a fact row (``helpers.data`` fact columns) and a problem key."""
    prob = get_problem(problem)
    case_id = int(fact["case_id"])
    template, subject = fact["prompt"], fact["subject"]
    o_true, o_false = fact["target_true"], fact["target_new"]
    prompt = fill_prompt(template, subject)
    noise = None
    if prob.key == "ei":
        target, baseline = o_false, o_true
    elif prob.key == "tr":
        n_prompt = len(scoring.encode(tok, prompt))
        max_len = options.tr_max_out_len if options.tr_target == "code" else max(options.tr_max_out_len, n_prompt + 1)
        cont = noised_sample(model, tok, prompt, subject, sigma, max_out_len=max_len)
        if not cont.strip() and options.tr_target == "continuation":  # only whitespace/eos sampled: longer
            cont = noised_sample(model, tok, prompt, subject, sigma, max_out_len=max_len + 10)
        target = (prompt + " " + cont).strip() if options.tr_target == "code" else cont
        if not target.strip():
            raise ValueError(f"case_id={case_id}: Tracing Reversal produced an empty o_noise")
        baseline = o_true
    elif prob.key == "fe":
        target, baseline = o_true, o_false
    elif prob.key == "fa":
        target, baseline = o_true, o_false
    else:  # ff
        target = o_true
        baseline = _ff_baseline(model, tok, prompt, subject, sigma)
        noise = NoiseSpec(sigma=sigma, n_samples=10, seed=1, positions=options.ff_noise_positions)
    request = EditRequest(template, subject, target, direction=prob.direction, noise=noise, case_id=case_id)
    nb_target = o_false if options.neighborhood_target == "paper" else target
    return Task(case_id, prob.key, request, target, baseline, nb_target, sigma if prob.noised else None)


@torch.no_grad()
def _ff_baseline(model: nn.Module, tok, prompt: str, subject: str, sigma: float, n: int = 10) -> str:
    """Fact Forcing's request_baseline: argmax of the softmax at the last position averaged over n noised rows."""
    b, e = subject_range(tok, prompt, subject)
    spec = NoiseSpec(sigma=sigma, n_samples=n, seed=1, positions="subject")
    pos = NoisePositions(spec, (b, e))
    pos.set_rows([(b, e)] * n)
    ids = torch.tensor([scoring.encode(tok, prompt)] * n, device=device_of(model))
    with input_noise(model, spec, pos):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1).mean(0)
    return tok.decode([int(probs.argmax())]).strip()
