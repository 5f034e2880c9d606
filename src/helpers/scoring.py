"""Target-string probabilities and text generation (SCIENCE.md §3).

The primitive used everywhere: p(target | prompt) = prod_j p(y_j | x, y_<j), teacher-forced on x‖y,
where y = tokenize(" " + target) (a leading space is always added) and the product runs over **all**
target tokens. Batches are padded (right by default, left on request) with an attention mask and explicit
position ids, so a padded row scores exactly as it would alone.

Devices: batches are tokenized on the CPU and moved to the model's device in one copy (``make_batch(...,
device=...)``, :meth:`Batch.to`); index tensors derived from a batch live on the batch's device. Functions that
return results for tables (:func:`target_logprobs`, :func:`text_token_logprobs`) move them to
the CPU once per batch. Text generation and the correctness test live in :mod:`helpers.generation`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .models import device_of

log = logging.getLogger(__name__)


def with_space(target: str) -> str:
    """The target as it is tokenized: with one leading space."""
    return target if target.startswith(" ") else " " + target


def _own_bos(tok) -> list[int]:
    """``[bos_token_id]`` when the tokenizer itself prepends its BOS (probed by encoding "a"), else ``[]``."""
    bid = getattr(tok, "bos_token_id", None)
    if bid is None:
        return []
    ids = list(tok("a", add_special_tokens=True)["input_ids"])
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    return [bid] if ids[:1] == [bid] and plain[:1] != [bid] else []


def bos(tok) -> list[int]:
    """``[id]`` of the token every text starts with: the tokenizer's own BOS when it prepends one (Gemma's
    ``<bos>``), or the token :func:`set_bos` gave a tokenizer that adds none (SmolLM2's ``<|endoftext|>``, set
    by :func:`helpers.models.load_model`); else ``[]`` (GPT-2, the world tokenizer). Decided once per tokenizer."""
    cached = getattr(tok, "_helpers_bos", None)
    if cached is not None:
        return list(cached)
    out = _own_bos(tok)
    try:
        tok._helpers_bos = tuple(out)
    except AttributeError:  # pragma: no cover - tokenizers that refuse attributes: recompute each time
        pass
    return out


def set_bos(tok, token: str | None) -> None:
    """Make every text :func:`encode` returns start with ``token`` (for a model that needs a first token to
    use as its attention sink but whose tokenizer adds none), or with nothing (``None``). Raises a ValueError,
    leaving the tokenizer as it was, for a token the vocabulary lacks or when the tokenizer prepends its own BOS."""
    if token is None:
        tok._helpers_bos = ()
        return
    if _own_bos(tok):
        raise ValueError(f"the tokenizer already prepends {tok.bos_token!r}; cannot prepend {token!r} as well")
    tid = tok.convert_tokens_to_ids(token)
    if tid is None or (tid == getattr(tok, "unk_token_id", None) and token != getattr(tok, "unk_token", None)):
        raise ValueError(f"the tokenizer has no token {token!r} to prepend")
    tok._helpers_bos = (int(tid),)


def encode(tok, text: str, bos_token: bool = True) -> list[int]:
    """Token ids of ``text``: the model's BOS (for tokenizers that add one, or the token :func:`set_bos` gave;
    see :func:`bos`) followed by the text's tokens without other special tokens. Targets and text pieces
    appended to a prompt use ``bos_token=False``. Every position computed in ``helpers`` counts from the first
    id returned here."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    return bos(tok) + ids if bos_token else ids


@dataclass
class Batch:
    """A padded batch of prompt‖target sequences.

    input_ids, attention_mask, position_ids: (B, T) long. ``prompt_len[i]`` and ``target_len[i]`` give the
    lengths of row i; ``start[i]`` is the column of the row's first real token (0 under right padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_len: list[int]
    target_len: list[int]
    start: list[int]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str | None) -> "Batch":
        """This batch with its tensors on ``device`` (itself when they are there already, or ``device`` is None)."""
        if device is None or torch.device(device) == self.input_ids.device:
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.prompt_len, self.target_len, self.start)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }



def cache_kwarg(model: nn.Module) -> str:
    """Name of the forward's cache argument: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output) -> object:
    """The key/value cache returned by a ``use_cache=True`` forward."""
    past = getattr(output, "cache", None) if hasattr(type(output), "cache") else None
    past = past if past is not None else getattr(output, "past_key_values", None)
    if past is None:
        raise RuntimeError("the forward pass returned no key/value cache (was use_cache=True passed?)")
    return past


def make_batch(
    tok,
    prompts: Sequence[str],
    targets: Sequence[str] | None = None,
    padding_side: str = "right",
    device: torch.device | str | None = None,
) -> Batch:
    """Tokenize prompt (and optional target, with leading space) pairs into one padded :class:`Batch`, built on
    the CPU and moved to ``device`` (the model's: :func:`helpers.models.device_of`) when given."""
    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows, plen, tlen = [], [], []
    for i, prompt in enumerate(prompts):
        x = encode(tok, prompt)
        y = encode(tok, with_space(targets[i]), bos_token=False) if targets is not None else []
        if not x:
            raise ValueError(f"prompt {i} tokenizes to nothing: {prompt!r}")
        if targets is not None and not y:
            raise ValueError(f"target {i} tokenizes to nothing: {targets[i]!r}")
        rows.append(x + y)
        plen.append(len(x))
        tlen.append(len(y))
    T = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    starts = []
    for i, r in enumerate(rows):
        s = 0 if padding_side == "right" else T - len(r)
        ids[i, s : s + len(r)] = torch.tensor(r)
        mask[i, s : s + len(r)] = 1
        starts.append(s)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, mask, pos, plen, tlen, starts).to(device)


# Logits only where they are read: the unembedding (49,152 words for SmolLM2, 262,144 for Gemma 3) runs on the
# positions that score a target, not on every position. False computes every position (tests compare both).
SELECT_LOGITS = True


@contextlib.contextmanager
def unembed_at(model: nn.Module, rows: torch.Tensor, cols: torch.Tensor):
    """Within the block, the model's unembedding sees only positions (rows[i], cols[i]): its input (B, T, d) is
    replaced by the (1, R, d) gathered states, so ``.logits`` is (1, R, V) (final soft-capping, where a model has
    it, still applies). Gradients flow through the gather."""
    from .models import module

    head = module(model, "unembed")
    r, c = rows.reshape(-1), cols.reshape(-1)

    def pre(_mod, args):
        x = args[0]
        return (x[r.to(x.device), c.to(x.device)].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def target_pairs(batch: "Batch") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(rows, cols, counts): the logit positions scoring each row's target tokens, row by row."""
    rows, cols = [], []
    for i in range(len(batch.target_len)):
        c0 = batch.start[i] + batch.prompt_len[i] - 1
        rows += [i] * batch.target_len[i]
        cols += list(range(c0, c0 + batch.target_len[i]))
    dev = batch.device
    return (torch.tensor(rows, dtype=torch.long, device=dev), torch.tensor(cols, dtype=torch.long, device=dev),
            list(batch.target_len))


@contextlib.contextmanager
def scored_logits(model: nn.Module, batch: "Batch", extra: Sequence[tuple[int, int]] = ()):
    """Run a forward pass whose logits are computed only where they are read: at every row's target positions,
    then at the ``extra`` (row, col) positions (e.g. ROME's KL position). Yields a :class:`ScoredLogits`
    whose ``.set(logits)`` takes the pass's ``.logits``; with ``SELECT_LOGITS = False`` every position is
    computed and read back from the full tensor (the same numbers up to float rounding)."""
    rows, cols, counts = target_pairs(batch)
    er = torch.tensor([r for r, _ in extra], dtype=torch.long, device=batch.device)
    ec = torch.tensor([c for _, c in extra], dtype=torch.long, device=batch.device)
    out = ScoredLogits(batch, rows, cols, counts, er, ec)
    if SELECT_LOGITS:
        with unembed_at(model, torch.cat([rows, er]), torch.cat([cols, ec])):
            yield out
    else:
        yield out


class ScoredLogits:
    """Target log-probabilities and extra logits of one pass (see :func:`scored_logits`)."""

    def __init__(self, batch, rows, cols, counts, er, ec):
        self.batch, self.rows, self.cols, self.counts, self.er, self.ec = batch, rows, cols, counts, er, ec
        self.logits: torch.Tensor | None = None

    def set(self, logits: torch.Tensor) -> None:
        """Store the pass's logits: (1, R, V) when selected, else (B, T, V)."""
        if SELECT_LOGITS:
            # a view: its backward allocates nothing (indexing [0] would zero-fill a (1, R, V) gradient)
            self.logits = logits.squeeze(0)
        else:
            self.logits = torch.cat([logits[self.rows, self.cols], logits[self.er, self.ec]])
        # one split into target and extra rows: its backward writes both gradients into one (R, V) tensor, where
        # two slices would each zero-fill an (R, V) gradient and a third would hold their sum
        n = len(self.rows)
        self._targets, self._extra = self.logits.split([n, self.logits.shape[0] - n])

    def target_token_logprobs(self) -> list[torch.Tensor]:
        """Per row, log p of each target token (as :func:`target_token_logprobs`)."""
        ids = self.batch.input_ids[self.rows, self.cols + 1]
        lp = log_probs(self._targets).gather(-1, ids[:, None].to(self.logits.device))[:, 0]
        return list(lp.split(self.counts))

    def extra_logprobs(self) -> tuple[torch.Tensor, ...]:
        """Per extra position, its (V,) log-probabilities: one log-softmax over all of them (rows are independent:
        the same numbers as one row at a time), handed out by ``unbind``, whose backward stacks the rows'
        gradients into one tensor (indexing row by row would zero-fill a full gradient per row)."""
        return log_probs(self._extra).unbind(0)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the last axis, in float32 at least (float64 logits stay float64)."""
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


def target_token_logprobs(logits: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
    """Per-row log p of each target token, from logits (B, T, V) of a prompt‖target batch."""
    logp = log_probs(logits)
    out = []
    for i in range(logits.shape[0]):
        s, p, t = batch.start[i], batch.prompt_len[i], batch.target_len[i]
        cols = torch.arange(s + p - 1, s + p - 1 + t, device=logits.device)  # logits at c score token c+1
        out.append(logp[i, cols, batch.input_ids[i, cols + 1]])
    return out


def target_logprob_from_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B,) summed log p(target | prompt) from logits (B, T, V); keeps the autograd graph."""
    return torch.stack([lp.sum() for lp in target_token_logprobs(logits, batch)])


def target_logprobs(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
    padding_side: str = "right",
) -> torch.Tensor:
    """(N,) log p(target_i | prompt_i), summed over all target tokens, on the CPU. No gradients.

    Any hooks installed on ``model`` by the caller (noise, edits) apply to every pass.
    """
    out = []
    dev = device_of(model)
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            b = make_batch(tok, prompts[i : i + batch_size], targets[i : i + batch_size], padding_side, dev)
            if not SELECT_LOGITS:
                out.append(target_logprob_from_logits(model(**b.model_inputs()).logits, b).cpu())
                continue
            rows, cols, counts = target_pairs(b)
            with unembed_at(model, rows, cols):
                logits = model(**b.model_inputs()).logits[0]  # (R, V)
            tok_lp = log_probs(logits).gather(-1, b.input_ids[rows, cols + 1][:, None])[:, 0]
            out.append(torch.stack([x.sum() for x in tok_lp.split(counts)]).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def target_probs(model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[str], **kw) -> torch.Tensor:
    """(N,) p(target_i | prompt_i) on the CPU: the product over all target tokens (SCIENCE.md §3)."""
    return target_logprobs(model, tok, prompts, targets, **kw).exp()


def pad_right(tok, ids: Sequence[Sequence[int]], device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), both (len(ids), max length ≥ 1) long, padded with the
    tokenizer's pad token (its end-of-text token when it has none); built on the CPU, then moved to ``device``."""
    T = max((len(i) for i in ids), default=0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    x = torch.full((len(ids), max(T, 1)), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for r, row in enumerate(ids):
        x[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return (x, mask) if device is None else (x.to(device), mask.to(device))


def text_token_logprobs(model: nn.Module, tok, texts: Sequence[str], max_tokens: int = 100) -> list[torch.Tensor]:
    """Per text, log p(x_i | x_<i) for i = 2..N (N = token count after truncation to ``max_tokens``), on the CPU.

    All texts run in one right-padded forward pass (so a caller's per-row hooks see one row per text).
    """
    ids = [encode(tok, t)[:max_tokens] for t in texts]
    if not ids:
        return []
    x, mask = pad_right(tok, ids, device_of(model))
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return next_token_logprobs(torch.log_softmax(logits.float(), -1), x, [len(row) for row in ids])


def next_token_positions(lens: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), each (Σ max(lens[r] - 1, 0),) long on ``device``: every position of right-padded rows of
    ``lens`` tokens whose next token is read (all but each row's last), row by row."""
    rows = [r for r, n in enumerate(lens) for _ in range(n - 1)]
    cols = [c for n in lens for c in range(n - 1)]
    return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device))


def next_token_logprobs(logp: torch.Tensor, x: torch.Tensor, lens: Sequence[int]) -> list[torch.Tensor]:
    """Per row r, log p(x[r, i] | x[r, <i]) for i = 1..lens[r]-1 from log-probabilities (B, T, V) of the right-
    padded ids ``x`` (B, T): gathered on their device, moved to the CPU in one copy, split per row."""
    r, c = next_token_positions(lens, logp.device)
    flat = logp[r, c, x[r, c + 1]].cpu()
    return list(flat.split([max(n - 1, 0) for n in lens]))
