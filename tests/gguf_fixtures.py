"""Tiny random GGUF files, written the way llama.cpp's converter writes real ones, for offline tests.

``write_tiny_gguf("llama" | "gemma3", path)`` builds a tiny transformers model with random weights (norms
included, so an offset or a permutation cannot hide), writes it as a GGUF file with the metadata and
``tokenizer.ggml.*`` fields transformers' GGUF loader reads, and returns the path with the state dict
the file encodes. Two of llama.cpp's storage conventions are reproduced so that the loader's inverse of
each is exercised:

* Llama's q/k projection rows are permuted from transformers' rotate-half layout to the interleaved
  layout of llama.cpp's rope (transformers' ``LlamaTensorProcessor`` undoes it);
* Gemma's RMSNorm weights are stored as ``1 + w`` (``Gemma2TensorProcessor`` subtracts the 1).

Both models tie their output projection to the token embedding (no ``output.weight`` tensor), as
SmolLM2-135M and Gemma 3 270M do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

TEXT = (
    "The Eiffel Tower is located in the city of Paris. Danielle Darrieux spoke the language of France. "
    "Toko Yasuda plays the guitar. The mother tongue of Thomas Joannes Stieltjes is Dutch. "
    "Autonomous University of Madrid, which is located in Spain. What is the twin city of Lyon? It is Beirut."
)

LLAMA_DIMS = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=64, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
                  rope_theta=10000.0)
GEMMA3_DIMS = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=64, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
                   rope_theta=1_000_000.0, sliding_window=16)


def byte_level_vocab(vocab_size: int = 300) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b") of a GPT-2-style byte-level BPE trained on :data:`TEXT`;
    id 0 is ``<|endoftext|>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([TEXT], trainer)
    vocab = tk.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tk.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, merges


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a Gemma-style vocabulary: specials, 256 byte-fallback tokens, the
    characters of :data:`TEXT` and their pairs within words (every piece's halves are in the vocabulary,
    so merges can be derived from it)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    text = "\u2581" + TEXT.replace(" ", "\u2581")
    chars = sorted(set(text))
    pairs = sorted({text[i:i + 2] for i in range(len(text) - 1) if "\u2581" not in text[i + 1:i + 2]})[:40]
    pieces = chars + [p for p in pairs if p not in chars]
    tokens += pieces
    types += [NORMAL] * len(pieces)
    scores = [0.0] * len(specials) + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from transformers' rotate-half order to llama.cpp's interleaved order:
    within each head, row ``j`` of the first half goes to ``2j`` and row ``j`` of the second half to ``2j+1``."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tiny_model(arch: str, vocab_size: int, seed: int) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=True, bos_token_id=0,
                                             eos_token_id=0, **LLAMA_DIMS))
    elif arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab_size, tie_word_embeddings=True, pad_token_id=0,
                                                   eos_token_id=1, bos_token_id=2, **GEMMA3_DIMS))
    else:
        raise ValueError(f"unknown tiny GGUF architecture {arch!r}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norms: a missing +-1 offset or a mis-mapped norm shows
                w = (1.0 if arch == "llama" else 0.0) + 0.1 * torch.randn_like(p)
                p.copy_(torch.round(w * 4096) / 4096)  # on a 2**-12 grid, so Gemma's stored 1 + w is exact
    return model


def _gguf_tensors(arch: str, model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's tensors under their GGUF names, stored the way llama.cpp stores them."""
    import gguf

    gguf_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    cfg = model.config
    name_map = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        t = t.detach().float().clone()
        if arch == "llama" and gguf_name.endswith(".attn_q"):
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif arch == "llama" and gguf_name.endswith(".attn_k"):
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        elif arch == "gemma3" and "norm" in gguf_name:
            t = t + 1.0
        out[f"{gguf_name}.{suffix}"] = t.numpy()
    return out


def write_tiny_gguf(arch: str, path: str | Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write a tiny random ``arch`` ("llama" or "gemma3") model as a float32 GGUF file at ``path``;
    returns ``(path, reference)`` where ``reference`` is the transformers state dict the file encodes."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if arch == "llama":
        tokens, merges = byte_level_vocab()
        scores, types = None, [CONTROL] + [NORMAL] * (len(tokens) - 1)
        dims = LLAMA_DIMS
    else:
        (tokens, scores, types), merges = sentencepiece_vocab(), None
        dims = GEMMA3_DIMS
    model = _tiny_model(arch, len(tokens), seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(dims["max_position_embeddings"])
    w.add_embedding_length(dims["hidden_size"])
    w.add_block_count(dims["num_hidden_layers"])
    w.add_feed_forward_length(dims["intermediate_size"])
    w.add_head_count(dims["num_attention_heads"])
    w.add_head_count_kv(dims["num_key_value_heads"])
    w.add_layer_norm_rms_eps(dims["rms_norm_eps"])
    w.add_rope_freq_base(dims["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(dims["head_dim"])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_unk_token_id(0)
        w.add_pad_token_id(0)
    else:
        w.add_key_length(dims["head_dim"])
        w.add_value_length(dims["head_dim"])
        w.add_sliding_window(dims["sliding_window"])
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
        w.add_pad_token_id(0)
        w.add_eos_token_id(1)
        w.add_bos_token_id(2)
        w.add_unk_token_id(3)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, arr in _gguf_tensors(arch, model).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return path, reference


def _rope_theta(cfg, layer_type: str = "full_attention") -> float:
    """``rope_theta`` of a transformers config (v5 keeps it in ``rope_parameters``, per layer type for Gemma 3)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type in params:
        params = params[layer_type]
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _byte_level_bpe(tok) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b") of a byte-level BPE tokenizer; ValueError for any other kind."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError("write_gguf_from_model writes byte-level BPE tokenizers only (GGUF tokenizer model 'gpt2')")
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the tokenizer's ids are not contiguous from 0")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, merges


def _adds_bos(tok) -> bool:
    """Whether the tokenizer itself prepends its BOS token (Gemma's ``<bos>``)."""
    bid = tok.bos_token_id
    return bid is not None and tok("a")["input_ids"][:1] == [bid] != tok("a", add_special_tokens=False)["input_ids"][:1]


def write_gguf_from_model(model: torch.nn.Module, tok, path: str | Path, fold_query_scale: bool = True) -> Path:
    """Write any (e.g. trained) transformers ``LlamaForCausalLM`` or ``Gemma3ForCausalLM`` with tied embeddings,
    and its byte-level BPE tokenizer, as a float32 GGUF file at ``path``, with llama.cpp's storage conventions
    (:func:`_gguf_tensors`: Llama's q/k permutation, Gemma's ``1 + w`` norms, no ``output.weight``).

    The tokenizer is written as llama.cpp writes a byte-level BPE (``tokenizer.ggml.model = "gpt2"``): the
    tokens in id order (special tokens typed CONTROL), the merges, the bos/eos/unk/pad ids and
    ``tokenizer.ggml.add_bos_token`` (True when the tokenizer prepends its BOS, as Gemma's does).

    Gemma 3: a GGUF file has no key for ``query_pre_attn_scalar``. llama.cpp scales attention scores by
    ``1/sqrt(key_length)``; transformers' GGUF loader leaves the config default (256). When the model's value
    differs from that default and ``fold_query_scale`` is True, the factor ``sqrt(256 / query_pre_attn_scalar)``
    is folded into the stored ``attn_q_norm`` weights (the queries are RMS-normalised, so only the norm's scale
    carries it, and rope is linear), so that transformers' loader rebuilds the same function -- to float32
    rounding, no longer bit for bit; llama.cpp would then read queries that much too large. With
    ``fold_query_scale=False`` such a model is refused. Config values GGUF cannot carry at all (a local rope base
    or layer pattern other than the defaults, soft-capping) are refused too.
    """
    import math

    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    arch = {"llama": "llama", "gemma3_text": "gemma3"}.get(cfg.model_type)
    if arch is None:
        raise ValueError(f"write_gguf_from_model writes llama and gemma3_text models, not {cfg.model_type!r}")
    if not cfg.tie_word_embeddings:
        raise ValueError("write_gguf_from_model writes models with tied embeddings only")
    tokens, merges = _byte_level_bpe(tok)
    if len(tokens) != model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {model.get_input_embeddings().weight.shape[0]} embedding rows")
    special = set(tok.all_special_ids)
    types = [CONTROL if i in special else NORMAL for i in range(len(tokens))]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tensors = _gguf_tensors(arch, model)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"{arch}-from-model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(cfg))
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_tokenizer_pre("smollm")
    else:
        from transformers import Gemma3TextConfig

        default = Gemma3TextConfig(num_hidden_layers=cfg.num_hidden_layers)
        for key in ("layer_types", "final_logit_softcapping", "attn_logit_softcapping", "hidden_activation"):
            if getattr(cfg, key) != getattr(default, key):
                raise ValueError(f"GGUF cannot carry {key}={getattr(cfg, key)!r} (the loader uses "
                                 f"{getattr(default, key)!r})")
        if _rope_theta(cfg, "sliding_attention") != _rope_theta(default, "sliding_attention"):
            raise ValueError("GGUF cannot carry a local rope base other than the default")
        if cfg.query_pre_attn_scalar != default.query_pre_attn_scalar:
            if not fold_query_scale:
                raise ValueError(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar}: transformers' GGUF loader "
                                 f"would use {default.query_pre_attn_scalar}")
            c = math.sqrt(default.query_pre_attn_scalar / cfg.query_pre_attn_scalar)
            for name, arr in tensors.items():
                if name.endswith(".attn_q_norm.weight"):  # stored 1 + w -> c * (1 + w)
                    tensors[name] = (c * arr.astype(np.float64)).astype(np.float32)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
        w.add_tokenizer_pre("default")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for token, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                       ("pad", w.add_pad_token_id)):
        if (tid := getattr(tok, f"{token}_token_id")) is not None:
            add(tid)
    w.add_add_bos_token(_adds_bos(tok))
    w.add_add_eos_token(False)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
