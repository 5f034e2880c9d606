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


def tiny_tokenizer(vocab_size: int = 300):
    """A GPT-2-like byte-level BPE trained on the fixture records (fast, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for r in json.loads(SAMPLE_COUNTERFACT.read_text()):
        rr = r["requested_rewrite"]
        texts += [rr["prompt"].format(rr["subject"]) + " " + rr["target_true"]["str"], rr["target_new"]["str"]]
        texts += r["paraphrase_prompts"] + r["neighborhood_prompts"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


def tiny_model(arch: str, vocab_size: int, n_layer: int = 3, seed: int = 0):
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM)

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
    raise ValueError(arch)


ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """arch -> folder with a tiny random model + tokenizer saved by save_pretrained."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        tiny_model(arch, len(tokenizer)).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[arch] = d
    return out
