"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random models of every supported architecture,
saved with ``save_pretrained`` (safetensors) so they load offline by path like a real checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_COUNTERFACT = FIXTURES / "counterfact_sample.json"


def tiny_tokenizer(vocab_size: int = 300, bos: bool = False):
    """A GPT-2-like byte-level BPE trained on the fixture records (fast, offline). ``bos=True``: a Gemma-like
    tokenizer that prepends its own ``<bos>`` token (a separate special token) to every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for r in json.loads(SAMPLE_COUNTERFACT.read_text()):
        rr = r["requested_rewrite"]
        texts += [rr["prompt"].format(rr["subject"]) + " " + rr["target_true"]["str"], rr["target_new"]["str"]]
        texts += r["paraphrase_prompts"] + r["neighborhood_prompts"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<bos>"] if bos else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(texts, trainer)
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                  bos_token="<bos>" if bos else "<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


def tiny_model(arch: str, vocab_size: int, n_layer: int = 3, seed: int = 0):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTJConfig,
                              GPTJForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_positions=128, **common))
    if arch == "gptj":
        return GPTJForCausalLM(GPTJConfig(n_layer=n_layer, n_embd=32, n_head=2, n_positions=128, rotary_dim=8, **common))
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=2,
                                                intermediate_size=96, max_position_embeddings=128, **common))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=2,
                                            num_key_value_heads=2, intermediate_size=80, max_position_embeddings=128,
                                            **common))
    if arch == "gemma3":  # BOS id 1 (tiny_tokenizer(bos=True)); a sliding window shorter than the prompts
        return Gemma3ForCausalLM(Gemma3TextConfig(
            num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            intermediate_size=80, max_position_embeddings=128, sliding_window=4, query_pre_attn_scalar=16,
            vocab_size=vocab_size, bos_token_id=1, eos_token_id=0, pad_token_id=0))
    raise ValueError(arch)


ARCHS = ["gpt2", "gptj", "gpt_neox", "llama", "gemma3"]
BOS_ARCHS = {"gemma3"}  # their fixture tokenizer prepends <bos>, as Gemma's does


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer():
    return tiny_tokenizer(bos=True)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer, bos_tokenizer) -> dict[str, Path]:
    """arch -> folder with a tiny random model + tokenizer saved by save_pretrained."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        t = bos_tokenizer if arch in BOS_ARCHS else tokenizer
        tiny_model(arch, len(t)).save_pretrained(d)
        t.save_pretrained(d)
        out[arch] = d
    return out
