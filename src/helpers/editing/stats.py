"""Uncentered second moments C = E[k k^T] of the down-projection input k (d_ff) per layer (SCIENCE.md §6.1).

Keys are taken at **every non-pad token** of the corpus documents (each truncated to the model's
n_positions), documents in a seeded random order, until ``n_tokens`` keys are collected (the last document is
cut at exactly ``n_tokens``). Those documents then run in batches of similar length (padding costs a full pass
per padded position; the batches change only the order of the float64 sums). All requested layers are
collected in one partial forward pass per batch (the pass stops after the highest requested down-projection).

Precision: each batch's k^T k (at most ``batch_tokens`` keys) is a float32 product, and the running sum over
batches is kept in **float64** (the paper accumulated in float32; float64 only removes the drift of a long
sum); the moment is stored in float32 like the paper's ``mom2_dtype``; inverses are computed in float64 and
cast to float32.

Devices: the keys are accumulated, and C and C^-1 are kept, on the model's device (float64 sums there too, so
a GPU run uses the same precision as a CPU run); only the disk cache is written from a CPU copy, and a cached
moment is loaded onto the model's device.

Disk cache: ``<cache_dir>/stats/<model fingerprint>/<corpus fingerprint>/layer<l>_n<n_tokens>.safetensors``
with tensors ``mom2`` (d_ff, d_ff) and ``count`` (the number of keys actually used). No pickle.
Statistics must be computed **before** editing: computing them while any forward hook is installed on the
model (e.g. a Fact Forcing noise hook) raises.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save
from torch import nn
from .. import integrity
from ..progress import tqdm

from .. import hooks, models, scoring
from ..tables import atomic_path
from .base import model_fingerprint

log = logging.getLogger(__name__)


def read_corpus(corpus: str | Path | Sequence[str]) -> list[str]:
    """A list of documents: the list itself, or a text file with one document per line (blank lines dropped)."""
    if isinstance(corpus, (str, Path)):
        lines = Path(corpus).read_text(encoding="utf-8").splitlines()
        return [l for l in lines if l.strip()]
    return [d for d in corpus if d.strip()]


def corpus_fingerprint(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _assert_no_hooks(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            raise RuntimeError(
                f"refusing to compute second moments while hooks are installed (module {name!r}); "
                "a noise hook would corrupt them: precompute statistics before editing"
            )


def key_documents(tok, docs: Sequence[str], n_tokens: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Token ids of the documents the keys come from: ``docs`` in a seeded random order, each truncated to
    ``max_len`` tokens, until ``n_tokens`` tokens are taken (the last document cut at exactly ``n_tokens``; a
    causal model's keys at a document's first m positions do not depend on the rest of it)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out, count = [], 0
    for i in order:
        if count >= n_tokens:
            break
        ids = scoring.encode(tok, docs[i])[:max_len][: n_tokens - count]
        if ids:
            out.append(ids)
            count += len(ids)
    return out


def length_batches(lengths: Sequence[int], batch_tokens: int, batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), each with at most ``batch_size`` rows
    and at most ``batch_tokens`` padded tokens (rows x longest row; a longer row forms a batch of its own):
    padding, which costs a full pass per padded position, stays small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur and len(cur) < batch_size and lengths[cur[0]] * (len(cur) + 1) <= batch_tokens:
            cur.append(i)
        else:
            batches.append([i])
    return batches


def compute_second_moments(
    model: nn.Module,
    tok,
    docs: Sequence[str],
    layers: Sequence[int],
    n_tokens: int,
    batch_size: int = 64,
    max_len: int | None = None,
    seed: int = 0,
    progress: bool = True,
    batch_tokens: int = 4096,
) -> tuple[dict[int, torch.Tensor], int]:
    """({layer: C (d_ff, d_ff) float32 on the model's device}, number of keys used) over the first ``n_tokens``
    non-pad tokens (:func:`key_documents`), run in batches of similar length (:func:`length_batches`)."""
    _assert_no_hooks(model)
    layers = sorted(set(layers))
    if not layers:
        return {}, 0
    max_len = max_len or int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
    rows_all = key_documents(tok, docs, n_tokens, max_len, seed)
    names = [models.module_name(model, "down_proj", l) for l in layers]
    _, d_ff = models.dims(model)
    dev = models.device_of(model)
    sums = {l: torch.zeros((d_ff, d_ff), dtype=torch.float64, device=dev) for l in layers}
    count = 0
    bar = tqdm(total=sum(map(len, rows_all)), desc=f"second moments L{layers}", unit="tok", disable=not progress)
    with torch.no_grad():
        for batch in length_batches([len(r) for r in rows_all], batch_tokens, batch_size):
            rows = [rows_all[j] for j in batch]
            ids, mask = scoring.pad_right(tok, rows, dev)
            with hooks.trace(model, names, retain_output=False, retain_input=True, stop=True) as tr:
                model(input_ids=ids, attention_mask=mask)
            take = sum(map(len, rows))  # = mask.sum(), without a device sync
            sel = mask.reshape(-1).bool()
            for l, name in zip(layers, names):
                k = tr.inputs[name].reshape(-1, d_ff)[sel]
                sums[l] += (k.T @ k).double()  # a batch's product in float32, the running sum in float64
            count += take
            bar.update(take)
    bar.close()
    if count == 0:
        raise ValueError("the corpus gave no tokens")
    if count < n_tokens:
        log.warning("corpus has only %d tokens; second moments use %d instead of %d", count, count, n_tokens)
    return {l: (s / count).float() for l, s in sums.items()}, count


class SecondMoments:
    """Per-layer second moments C and inverses, cached in memory and on disk.

    ``corpus``: a list of documents or a text file (one document per line). ``n_tokens``: keys per layer.
    Call :meth:`precompute` with all layers you will edit (one corpus pass for all missing layers), then
    :meth:`moment` / :meth:`inverse` are lookups.
    """

    def __init__(
        self,
        model: nn.Module,
        tok,
        corpus: str | Path | Sequence[str],
        n_tokens: int,
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        max_len: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        self.model, self.tok = model, tok
        self.docs = read_corpus(corpus)
        self.n_tokens = int(n_tokens)
        self.batch_size, self.max_len, self.seed, self.progress = batch_size, max_len, seed, progress
        self.dir = (
            Path(cache_dir) / "stats" / model_fingerprint(model) / f"{corpus_fingerprint(self.docs)}_s{seed}"
            if cache_dir is not None
            else None
        )
        self._mom: dict[int, torch.Tensor] = {}
        self._inv: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def path(self, layer: int) -> Path | None:
        return self.dir / f"layer{layer}_n{self.n_tokens}.safetensors" if self.dir is not None else None

    def _load(self, layer: int) -> bool:
        p = self.path(layer)
        if p is None or not integrity.discard_if_bad(p, "second-moment statistics"):
            return False
        try:
            t = load_file(str(p))
        except Exception as err:  # a damaged file from before size/sha256 records existed
            log.warning("second-moment statistics %s are not readable (%s): recomputing", p, err)
            integrity.remove(p)
            return False
        self._mom[layer] = t["mom2"].to(models.device_of(self.model))
        self.counts[layer] = int(t["count"])
        return True

    def precompute(self, layers: Sequence[int]) -> None:
        """Make C available for ``layers``: load cached ones, compute the rest in one corpus pass."""
        missing = [l for l in sorted(set(layers)) if l not in self._mom and not self._load(l)]
        if not missing:
            return
        moms, count = compute_second_moments(
            self.model, self.tok, self.docs, missing, self.n_tokens, self.batch_size, self.max_len,
            self.seed, self.progress,
        )
        for l, c in moms.items():
            self._mom[l] = c
            self.counts[l] = count
            p = self.path(l)
            if p is not None:
                p.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(p, expected_bytes=c.numel() * c.element_size()) as tmp:
                    # bytes written by Python, so that a full disk is an OSError (DiskFull), not a SafetensorError
                    tmp.write_bytes(save({"mom2": c.contiguous().cpu(), "count": torch.tensor(count)}))

    def moment(self, layer: int) -> torch.Tensor:
        """C (d_ff, d_ff) float32, on the model's device."""
        if layer not in self._mom:
            self.precompute([layer])
        return self._mom[layer]

    def inverse(self, layer: int) -> torch.Tensor:
        """C^-1 (d_ff, d_ff) float32 (inverted in float64), on the model's device."""
        if layer not in self._inv:
            self._inv[layer] = torch.linalg.inv(self.moment(layer).double()).float()
        return self._inv[layer]
