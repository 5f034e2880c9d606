"""A GPT-2-like byte-level BPE tokenizer for the embedded world.

Trained with the ``tokenizers`` library and wrapped as a ``transformers.PreTrainedTokenizerFast`` with
``<|endoftext|>`` as bos/eos/unk/pad and no BOS added. As in GPT-2, a word's token carries its leading
space, so every token decodes to its own text (code written for GPT-2's tokenizer works unchanged).

The tokenizer is trained on a *vocabulary corpus*, not on the world corpus: every template/object/filler
word and every shared first name many times (so they become single tokens), and every name syllable,
never two syllables side by side. Frequent surnames therefore do not collapse into one token; they stay
2-3 syllable pieces, like rare names under GPT-2's tokenizer.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from .generate import (DISTRACTOR_LINKS, INTERJECTIONS, FILLER_NAMES, FILLER_NOUNS, FILLER_TIMES, FILLER_VERBS, ORG_WORDS, PRODUCT_WORDS,
                       RELATIONS, SYLLABLES, CODAS, World)

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"


def _common_text(world: World) -> list[str]:
    words: set[str] = set()
    for rel in RELATIONS:
        for t in rel.templates + rel.fragments:
            words.update(re.findall(r"[A-Za-z']+|[^\sA-Za-z']", t.replace("{}", "").replace("{o}", "")))
        words.update(rel.objects)
    words.update(FILLER_NAMES + FILLER_NOUNS + FILLER_VERBS + ORG_WORDS + PRODUCT_WORDS)
    for t in FILLER_TIMES + INTERJECTIONS + DISTRACTOR_LINKS:
        words.update(t.split())
    words.update(["is", "a", "the", "someone", "and", "in", "of", ".", ",", "(", ")", ":", ";", "'s"])
    return sorted(words)


def train_tokenizer(world: World, vocab_size: int = 2048, seed: int = 0):
    """Train the byte-level BPE on the world's vocabulary corpus; return a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.RandomState(seed + 7919)
    lines: list[str] = []
    common = _common_text(world)
    for _ in range(50):
        lines.append(" ".join(common))
    # Syllables (capitalised or not, with or without a leading space) become tokens, but no two syllables
    # are ever adjacent here, so invented names split into syllable pieces; shared first names and brand
    # words are whole tokens, like common first names under GPT-2's tokenizer.
    syll = list(SYLLABLES) + [s.capitalize() for s in SYLLABLES] + [c for c in CODAS]
    for _ in range(200):  # more often than any word-internal pair, so syllable merges rank first
        lines.append(" ".join(syll))
        lines.append("|".join(syll))
    shared = sorted({e.name.split()[0] for e in world.entities if " " in e.name})
    for _ in range(20):
        lines.append(" ".join(shared))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
    )
    fast.model_max_length = 1024
    return fast


def subject_token_lengths(tok, subjects: list[str]) -> list[int]:
    """Number of tokens of each subject as it appears mid-sentence (with a leading space)."""
    return [len(tok.encode(" " + s)) for s in subjects]
