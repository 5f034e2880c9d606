"""The common editing interface: requests, edits as data, applying/restoring them, windows, input noise.

An :class:`Edit` is *data*: per edited layer a dense weight delta ``deltas[l]`` of shape (d_model, d_ff) in
output x input orientation (whatever the storage orientation of the down-projection), optional bias
deltas ``bias_deltas[l]`` (d_model,) (fine-tuning updates the bias too), and, for rank-one methods, the
factors ``factors[l] = (r (d_model,), a (d_ff,))`` with ``deltas[l] == outer(r, a)``. It can be

- written into the weights: :func:`apply_edit` / :func:`restore` or the context manager :func:`applied`
  (the touched tensors are copied first and copied back on exit, so the restore is bitwise exact), or
- applied through forward hooks without touching any weight: :func:`hooked`
  (down_proj output += x @ delta^T + bias_delta), the basis for per-example edits (issue 8).

Devices: an edit's tensors live on the device of the model that computed it (no copies to the CPU; applying
it to that model's weights stays on the device). :func:`apply_edit` and the per-example hooks also accept an
edit from another device (copied to the weights' device once per application); :func:`hooked` adds the
deltas it is given as they are, so they must be on the model's device (fine-tuning creates them there).
Input noise is drawn from a CPU generator and moved to the device once per draw: the same noise on any device.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .. import hooks, models, scoring

log = logging.getLogger(__name__)

METHODS = ("rome", "memit", "ft1", "ft5")
PROBLEMS = ("error_injection", "tracing_reversal", "fact_erasure", "fact_amplification", "fact_forcing")
PROBLEM_ALIASES = {"ei": "error_injection", "tr": "tracing_reversal", "fe": "fact_erasure",
                   "fa": "fact_amplification", "ff": "fact_forcing"}
HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams"


class EditError(ValueError):
    """A request that cannot be edited, or an edit that went wrong (NaN/inf). The message names the case."""


@dataclass(frozen=True)
class NoiseSpec:
    """Gaussian input noise on subject token embeddings during editing (Fact Forcing, SCIENCE.md §5).

    sigma: std of the noise added to the embedding output (before position embeddings for GPT-2).
    n_samples: noisy copies of the prompt in a fine-tuning batch (ROME/MEMIT use 1, as in the code).
    seed: seeds one generator per edit; every forward pass draws fresh noise from it.
    positions: "subject" (faithful: the subject's own positions in every prompt of the batch) or "code"
    (the released code: positions [b, e) of the subject in the *bare* request prompt, in every row, which
    hits prefix tokens of context-templated prompts).
    """

    sigma: float
    n_samples: int = 10
    seed: int = 1
    positions: str = "subject"

    def __post_init__(self) -> None:
        if self.positions not in ("subject", "code"):
            raise ValueError(f"noise positions must be 'subject' or 'code', not {self.positions!r}")


@dataclass(frozen=True)
class EditRequest:
    """One edit: make ``target`` more (``raise``) or less (``lower``) likely after ``prompt``.

    prompt: a template with "{}" for the subject ("The mother tongue of {} is"); a filled prompt that
    contains ``subject`` verbatim is accepted too. target: the string to score, without leading space
    (one is added when tokenizing). noise: input noise during editing (Fact Forcing) or None.
    """

    prompt: str
    subject: str
    target: str
    direction: str = "raise"
    noise: NoiseSpec | None = None
    case_id: object = None

    def __post_init__(self) -> None:
        if self.direction not in ("raise", "lower"):
            raise EditError(f"{self.where()}: direction must be 'raise' or 'lower', not {self.direction!r}")
        if not self.subject:
            raise EditError(f"{self.where()}: empty subject")
        if not self.target.strip():
            raise EditError(f"{self.where()}: empty target")
        self.template  # validates that the subject is in the prompt

    def where(self) -> str:
        return f"case {self.case_id}" if self.case_id is not None else f"request {self.prompt!r}"

    @property
    def template(self) -> str:
        """The prompt with exactly one "{}" where the subject goes."""
        if "{}" in self.prompt:
            if self.prompt.count("{}") != 1:
                raise EditError(f"{self.where()}: prompt {self.prompt!r} has more than one '{{}}'")
            return self.prompt
        if self.subject in self.prompt:
            return self.prompt.replace(self.subject, "{}", 1)
        raise EditError(
            f"{self.where()}: subject {self.subject!r} is not in the prompt {self.prompt!r} "
            "(give a template with '{}' or a prompt containing the subject)"
        )

    @property
    def text(self) -> str:
        return fill(self.template, self.subject)

    @property
    def erase(self) -> bool:
        return self.direction == "lower"


@dataclass
class Edit:
    """An edit as data (see the module docstring). Tensors are float32 on the device of the model that computed
    the edit, (d_model, d_ff) out x in."""

    method: str
    layers: list[int]
    deltas: dict[int, torch.Tensor]
    bias_deltas: dict[int, torch.Tensor] = field(default_factory=dict)
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def check_finite(self, where: str = "") -> "Edit":
        """Raise :class:`EditError` if any delta is NaN or inf."""
        for kind, d in (("weight", self.deltas), ("bias", self.bias_deltas)):
            for layer, t in d.items():
                if not torch.isfinite(t).all():
                    raise EditError(f"{where or 'edit'}: {self.method} produced a non-finite {kind} delta at layer {layer}")
        return self

    def norms(self) -> dict[int, float]:
        """Frobenius norm of each layer's weight delta."""
        return {layer: float(t.norm()) for layer, t in self.deltas.items()}


# ----------------------------------------------------------------------------------------------- layers


def window(center: int, w: int, n_layers: int) -> list[int]:
    """W(center, w) as a list (see :func:`helpers.models.window`)."""
    return list(models.window(center, w, n_layers))


# ------------------------------------------------------------------------------------------- templates


def fill(template: str, value: str) -> str:
    """Replace the first "{}" of ``template`` by ``value`` (no str.format: braces elsewhere are literal)."""
    i = template.find("{}")
    if i < 0:
        raise ValueError(f"template {template!r} has no '{{}}'")
    return template[:i] + value + template[i + 2 :]


def subject_token_range(tok, template: str, subject: str) -> tuple[int, int]:
    """Token range [b, e) of ``subject`` in ``fill(template, subject)``.

    As in ROME: prefix, subject and suffix are tokenized separately; a space ending the prefix moves to the
    subject (" " + subject). A mismatch with the tokenization of the whole prompt is logged.
    """
    i = template.find("{}")
    if i < 0:
        raise ValueError(f"template {template!r} has no '{{}}'")
    prefix = template[:i]
    piece = subject
    if prefix.endswith(" "):
        prefix, piece = prefix[:-1], " " + subject
    head = scoring.encode(tok, prefix) if prefix else scoring.bos(tok)  # BOS (if any) counts as a position
    b = len(head)
    n = len(scoring.encode(tok, piece, bos_token=False))
    full = scoring.encode(tok, fill(template, subject))
    pieces = head + scoring.encode(tok, piece, bos_token=False)
    if full[: b + n] != pieces:
        log.warning("subject %r tokenizes differently inside %r; using the piecewise positions", subject, template)
    return b, b + n


def last_subject_positions(tok, templates: Sequence[str], subject: str) -> list[int]:
    """Column of the last subject token in each filled template (right padding: absolute columns)."""
    return [subject_token_range(tok, t, subject)[1] - 1 for t in templates]


# ------------------------------------------------------------------------------------- model utilities


def model_fingerprint(model: nn.Module) -> str:
    """Short hash of the config and a sample of the weights (embedding row 0, each down-projection's head)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        h.update(models.module(model, "embed").weight[0].float().cpu().numpy().tobytes())
        for layer in range(models.n_layers(model)):
            w = models.down_proj_weight(model, layer).reshape(-1)[:4096]
            h.update(w.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _bias(model: nn.Module, layer: int) -> torch.Tensor | None:
    return getattr(models.module(model, "down_proj", layer), "bias", None)


def apply_edit(model: nn.Module, edit: Edit) -> dict[str, torch.Tensor]:
    """Add ``edit`` into the model's weights in place; returns bitwise copies of the touched tensors (on the
    weights' device). The edit's tensors are moved to the weights' device and dtype (no copy when they are there)."""
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in edit.layers:
            name = models.module_name(model, "down_proj", layer)
            w = models.down_proj_weight(model, layer)
            saved[name + ".weight"] = w.detach().clone()
            if layer in edit.deltas:
                models.down_proj_out_in(model, layer).add_(edit.deltas[layer].to(w.device, w.dtype))
            b = _bias(model, layer)
            if layer in edit.bias_deltas:
                if b is None:
                    raise EditError(f"{edit.method} edit has a bias delta but layer {layer} has no bias")
                saved[name + ".bias"] = b.detach().clone()
                b.add_(edit.bias_deltas[layer].to(b.device, b.dtype))
    return saved


def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy the saved tensors back (bitwise exact)."""
    with torch.no_grad():
        for key, value in saved.items():
            mod_name, attr = key.rsplit(".", 1)
            getattr(hooks.get_module(model, mod_name), attr).copy_(value)


@contextlib.contextmanager
def applied(model: nn.Module, edit: Edit) -> Iterator[nn.Module]:
    """``with applied(model, edit):`` the edit is in the weights; on exit the originals are restored bitwise."""
    saved = apply_edit(model, edit)
    try:
        yield model
    finally:
        restore(model, saved)


@contextlib.contextmanager
def hooked(
    model: nn.Module,
    deltas: dict[int, torch.Tensor],
    bias_deltas: dict[int, torch.Tensor] | None = None,
) -> Iterator[hooks.Trace]:
    """Apply weight deltas through forward hooks: down_proj(x) + x @ delta^T (+ bias delta). No weight changes.

    Gradients flow to the deltas (and through x), so fine-tuning trains the deltas directly. The deltas must be
    on the model's device (see the module docstring).
    """
    bias_deltas = bias_deltas or {}
    layers = sorted(set(deltas) | set(bias_deltas))
    names = {models.module_name(model, "down_proj", l): l for l in layers}
    holder: dict[str, hooks.Trace] = {}

    def fn(out: torch.Tensor, name: str) -> torch.Tensor:
        layer = names[name]
        new = out
        if layer in deltas:
            x = holder["tr"].inputs[name]
            new = new + x @ deltas[layer].to(out.dtype).T
        if layer in bias_deltas:
            new = new + bias_deltas[layer].to(out.dtype)
        return new

    with hooks.trace(model, list(names), edit=fn, retain_output=False, retain_input=True, keep_grad=True) as tr:
        holder["tr"] = tr
        yield tr


@contextlib.contextmanager
def edit_hooks(model: nn.Module, edit: Edit) -> Iterator[hooks.Trace]:
    """:func:`hooked` for an :class:`Edit`."""
    with hooked(model, edit.deltas, edit.bias_deltas) as tr:
        yield tr


# ------------------------------------------------------------------------------------------ input noise


@contextlib.contextmanager
def input_noise(
    model: nn.Module,
    spec: NoiseSpec | None,
    positions: "NoisePositions",
) -> Iterator[None]:
    """Add N(0, sigma^2) noise to the embedding output at subject positions on every pass with length > 1.

    ``positions(batch_rows) -> list of (b, e)`` gives the noised token range of each row of the current
    forward pass (the caller knows which prompts it feeds). One CPU generator seeded with ``spec.seed``
    serves the whole context, so every pass draws fresh noise, deterministically; each draw is moved to the
    activations' device in one copy (the same numbers on every device).
    """
    if spec is None or spec.sigma == 0:
        yield
        return
    gen = torch.Generator().manual_seed(spec.seed)

    def fn(out: torch.Tensor, _name: str) -> torch.Tensor | None:
        if out.shape[1] <= 1:
            return None
        ranges = positions(out.shape[0])
        new = out.clone()
        lens = {e - b for b, e in ranges}
        if len(lens) == 1:  # one draw (rows, len, d), like the released code
            n = lens.pop()
            noise = (torch.randn((out.shape[0], n, out.shape[2]), generator=gen) * spec.sigma).to(out.device)
            for i, (b, e) in enumerate(ranges):
                new[i, b:e] = new[i, b:e] + noise[i].to(out.dtype)
        else:
            for i, (b, e) in enumerate(ranges):
                noise = (torch.randn((e - b, out.shape[2]), generator=gen) * spec.sigma).to(out.device)
                new[i, b:e] = new[i, b:e] + noise.to(out.dtype)
        return new

    with hooks.trace(model, models.module_name(model, "embed"), edit=fn, retain_output=False):
        yield


class NoisePositions:
    """Which token ranges to noise in the next forward pass; set by the method before each pass.

    ``code_range`` is the subject range in the bare request prompt (used in "code" mode for every row);
    ``rows`` is the list of per-row subject ranges of the batch about to run (used in "subject" mode).
    """

    def __init__(self, spec: NoiseSpec | None, code_range: tuple[int, int]):
        self.spec = spec
        self.code_range = code_range
        self.rows: list[tuple[int, int]] = []

    def set_rows(self, rows: list[tuple[int, int]]) -> None:
        self.rows = list(rows)

    def __call__(self, n_rows: int) -> list[tuple[int, int]]:
        if self.spec is not None and self.spec.positions == "code":
            return [self.code_range] * n_rows
        if len(self.rows) != n_rows:
            raise RuntimeError(f"noise positions set for {len(self.rows)} rows but the pass has {n_rows}")
        return self.rows


def subject_ranges(tok, templates: Sequence[str], subject: str) -> list[tuple[int, int]]:
    return [subject_token_range(tok, t, subject) for t in templates]


# ------------------------------------------------------------------------------------------ hparams


def load_hparams(family: str | Path, method: str, problem: str = "error_injection") -> dict:
    """Hyperparameters for (model family, method, problem): the family file's ``default`` merged with
    the problem's overrides (problem: a long name or ei/tr/fe/fa/ff). ``family`` is a name in ``helpers/hparams`` (world, gpt-j, gpt2-xl) or a path."""
    import yaml

    path = Path(family)
    if not path.suffix:
        path = HPARAMS_DIR / f"{family}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no hparams file {path} (have: {sorted(p.stem for p in HPARAMS_DIR.glob('*.yaml'))})")
    raw = yaml.safe_load(path.read_text())
    if method not in raw:
        raise KeyError(f"{path.name} has no section for method {method!r}")
    problem = PROBLEM_ALIASES.get(problem, problem)
    if problem not in PROBLEMS:
        raise KeyError(f"unknown problem {problem!r}; known: {PROBLEMS}")
    sec = raw[method]
    out = dict(sec.get("default", {}))
    out.update((sec.get("problems") or {}).get(problem) or {})
    return out
