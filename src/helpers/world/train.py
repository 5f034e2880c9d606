"""Train the world model (a ``transformers.GPT2LMHeadModel``) on the world corpus.

The loop is ours: documents are joined with ``<|endoftext|>`` and packed into fixed-length blocks (no
padding), re-shuffled and re-packed every epoch; AdamW with linear warmup and cosine decay; dropout off
(we want memorisation); loss, next-token accuracy and (periodically) fact accuracy are logged.
Same seed, same weights (single process, fixed thread count, deterministic algorithms).

Training-side pressures towards subject enrichment (see the world chapter): ``p_name_mask`` (for that share
of mentions, later text may not attend to a name's tokens before its last one) and ``name_attn_penalty``
(an auxiliary loss on the attention later text still pays to them; it needs eager attention), both on in
the default preset, which together move the lookup onto the subject's last token; ``index_epochs`` (a
curriculum that reads the who's-who index lines first) and the mask schedule are off in the presets.

Presets and the model cache are in :mod:`.presets`, the name masks and the attention penalty in
:mod:`.name_masks` (re-exported here).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import scoring
from .generate import World
from .name_masks import additive_mask, attention_penalty, name_key_mask, name_mask, subject_spans

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation. ``epochs`` passes over the packed corpus."""

    seed: int = 0
    vocab_size: int = 2048
    n_layer: int = 8
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    seq_len: int = 128
    batch_size: int = 16
    epochs: int = 20
    index_epochs: int = 0  # curriculum: epochs over the who's-who index lines before the full corpus
    p_name_mask: float = 0.0  # share of subject mentions whose first tokens later text cannot attend to
    name_mask_hold: float = 1.0  # fraction of the steps with the full p_name_mask ...
    name_mask_end: float = 1.0  # ... then linearly down to 0 at this fraction (a curriculum, not a test-time change)
    name_attn_penalty: float = 0.0  # weight of the auxiliary loss on attention from later text to a name's non-last tokens
    lr: float = 2e-3
    min_lr_frac: float = 0.05
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    eval_every: int = 50
    n_eval_facts: int = 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_model(cfg: TrainConfig, tok) -> "torch.nn.Module":
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tok.eos_token_id
    gcfg = GPT2Config(
        vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    if cfg.name_attn_penalty > 0:
        gcfg._attn_implementation = "eager"  # the penalty needs the attention weights
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(gcfg)
    # GPT-2's tanh-GELU as torch's fused kernel (the same function to 2.4e-7, ~20% faster training), as
    # helpers.models.load_model runs it afterwards; the saved config keeps "gelu_new".
    from ..models import use_fused_gelu

    use_fused_gelu(model)
    return model


def pack(docs_ids: list[list[int]], eos: int, seq_len: int, rng: np.random.RandomState,
         docs_spans: list[list[tuple[int, int]]] | None = None):
    """Shuffle documents, join them with eos, cut into (n_blocks, seq_len) blocks (the tail is dropped).

    Returns the blocks, and with ``docs_spans`` (token spans of subject mentions per document) also the
    spans falling entirely inside each block, in block coordinates.
    """
    order = rng.permutation(len(docs_ids))
    flat: list[int] = []
    spans: list[tuple[int, int]] = []
    for i in order:
        if docs_spans is not None:
            spans.extend((len(flat) + b, len(flat) + e) for b, e in docs_spans[i])
        flat.extend(docs_ids[i])
        flat.append(eos)
    n = len(flat) // seq_len
    blocks = torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)
    if docs_spans is None:
        return blocks
    per_block: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for b, e in spans:
        k = b // seq_len
        if k < n and (e - 1) // seq_len == k:
            per_block[k].append((b - k * seq_len, e - k * seq_len))
    return blocks, per_block


def mask_share(step: int, total: int, cfg: TrainConfig) -> float:
    """The name-mask share at ``step``: ``p_name_mask`` until ``name_mask_hold``, then linearly to 0 at
    ``name_mask_end`` (fractions of all steps), 0 afterwards, so the final model is trained without it."""
    t = step / max(1, total)
    if t < cfg.name_mask_hold:
        return cfg.p_name_mask
    if t >= cfg.name_mask_end:
        return 0.0
    return cfg.p_name_mask * (cfg.name_mask_end - t) / (cfg.name_mask_end - cfg.name_mask_hold)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_frac`` of the steps, then cosine decay to ``min_lr_frac * lr``."""
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def next_token_predictions(model, tok, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Argmax next-token id after each prompt (right padding, logits at the last real token). Shape (n,)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = [tok.encode(p) for p in prompts[i: i + batch_size]]
        ids, att = scoring.pad_right(tok, enc)
        logits = model(input_ids=ids, attention_mask=att).logits
        last = att.sum(1) - 1
        out.append(logits[torch.arange(len(enc)), last].argmax(-1))
    return torch.cat(out)


def first_token_accuracy(model, tok, records: list[dict]) -> float:
    """Share of records whose argmax next token is the first token of ' ' + target_true."""
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records]
    gold = torch.tensor([tok.encode(" " + r["requested_rewrite"]["target_true"]["str"])[0] for r in records])
    return float((next_token_predictions(model, tok, prompts) == gold).float().mean())


def train_model(world: World, cfg: TrainConfig, tok, log_path: Path | None = None, progress: bool = True):
    """Train a fresh model on ``world.corpus``; return (model, log rows as dicts)."""
    from ..progress import tqdm

    torch.use_deterministic_algorithms(True, warn_only=True)
    model = make_model(cfg, tok)
    model.train()
    eager = model.config._attn_implementation == "eager"  # adds a 4-D mask to the scores (see additive_mask)
    eos = tok.eos_token_id
    index_ids = [tok.encode(d) for d in world.index_corpus]
    docs_ids = [tok.encode(d) for d in world.corpus] + index_ids
    rng = np.random.RandomState(cfg.seed)
    spans = index_spans = None
    if cfg.p_name_mask > 0 or cfg.name_attn_penalty > 0:
        names = [e.name for e in world.entities]
        spans = subject_spans(tok, world.corpus + world.index_corpus, names)
        index_spans = spans[len(world.corpus):]

    def n_steps(ids: list[list[int]]) -> int:
        return max(1, (sum(len(d) + 1 for d in ids) // cfg.seq_len) // cfg.batch_size)

    phases = [(index_ids, n_steps(index_ids), index_spans)] * (cfg.index_epochs if index_ids else 0)
    phases += [(docs_ids, n_steps(docs_ids), spans)] * cfg.epochs
    total = sum(n for _, n, _ in phases)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    eval_records = world.records[: cfg.n_eval_facts]
    rows: list[dict] = []
    t0 = time.time()
    step = 0
    n_tokens = 0
    bar = tqdm(total=total, desc="train world model", disable=not progress, mininterval=2.0)
    for epoch, (ids, steps_per_epoch, sp) in enumerate(phases):
        if sp is None:
            blocks, block_spans = pack(ids, eos, cfg.seq_len, rng), None
        else:
            blocks, block_spans = pack(ids, eos, cfg.seq_len, rng, sp)
        for b in range(steps_per_epoch):
            x = blocks[b * cfg.batch_size: (b + 1) * cfg.batch_size]
            bs = None if block_spans is None else block_spans[b * cfg.batch_size: (b + 1) * cfg.batch_size]
            if bs is None or cfg.p_name_mask == 0:
                att = torch.ones_like(x)
            else:
                att = name_mask(bs, cfg.seq_len, mask_share(step, total, cfg), rng)
                if eager:
                    att = additive_mask(att)
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            out = model(input_ids=x, attention_mask=att, output_attentions=cfg.name_attn_penalty > 0)
            logits = out.logits[:, :-1]
            y = x[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            pen = torch.full((), float("nan"))
            if cfg.name_attn_penalty > 0 and bs is not None:
                pen = attention_penalty(out.attentions, name_key_mask(bs, cfg.seq_len))
                loss = loss + cfg.name_attn_penalty * pen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            n_tokens += x.numel()
            row = {"step": step, "epoch": epoch, "loss": loss.item(), "name_attn": float(pen.detach()), "lr": lr,
                   "token_acc": (logits.detach().argmax(-1) == y).float().mean().item(),
                   "tokens": n_tokens, "seconds": round(time.time() - t0, 2), "fact_acc": float("nan")}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
                model.eval()
                row["fact_acc"] = first_token_accuracy(model, tok, eval_records)
                model.train()
                bar.set_postfix(loss=f"{row['loss']:.3f}", fact_acc=f"{row['fact_acc']:.2f}")
            rows.append(row)
            step += 1
            bar.update(1)
    bar.close()
    model.eval()
    log.info("trained %d steps, %d tokens in %.0f s, final loss %.3f", step, n_tokens, time.time() - t0,
             rows[-1]["loss"])
    if log_path is not None:
        write_log(rows, log_path)
    return model, rows


def write_log(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
