"""Loading causal LMs and naming their parts.

Architectures differ only in a small table of module names (:data:`ARCHITECTURES`). Everything else in
``helpers`` (tracing, editing, statistics) asks this module where the embeddings, MLPs, down-projections
and blocks are, and never spells a module path itself.

Layer indices are 0-based everywhere in code (the paper's layer 6 is code layer 5).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .hooks import get_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """Module names of one architecture. ``{}`` in a template is replaced by the 0-based layer index;
    ``a|b`` lists alternative names across transformers versions (the first that exists is used).

    ``down_proj_transposed`` is True when the down-projection stores its weight as (d_ff, d_model)
    (GPT-2's ``Conv1D``) rather than ``nn.Linear``'s (d_model, d_ff). ``mlp_adds_to_stream`` is True when a
    block's output is its residual stream plus the MLP module's output, added as it is (no norm after the MLP):
    then a vector added to the MLP's output equals the same vector added to the block's output.
    """

    model_types: tuple[str, ...]
    embed: str
    block: str
    mlp: str
    down_proj: str
    attn: str
    final_norm: str
    unembed: str
    n_layers_attr: str
    down_proj_transposed: bool = False
    mlp_adds_to_stream: bool = True


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        model_types=("gpt2",),
        embed="transformer.wte",
        block="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        down_proj="transformer.h.{}.mlp.c_proj",
        attn="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        n_layers_attr="n_layer",
        down_proj_transposed=True,
    ),
    "gptj": ArchSpec(
        model_types=("gptj",),
        embed="transformer.wte",
        block="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        down_proj="transformer.h.{}.mlp.fc_out",
        attn="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        n_layers_attr="n_layer",
    ),
    "gpt_neox": ArchSpec(
        model_types=("gpt_neox",),
        embed="gpt_neox.embed_in",
        block="gpt_neox.layers.{}",
        mlp="gpt_neox.layers.{}.mlp",
        down_proj="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head|embed_out",  # transformers >= 5 | < 5
        n_layers_attr="num_hidden_layers",
    ),
    "llama": ArchSpec(
        model_types=("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"),
        embed="model.embed_tokens",
        block="model.layers.{}",
        mlp="model.layers.{}.mlp",
        down_proj="model.layers.{}.mlp.down_proj",
        attn="model.layers.{}.self_attn",
        final_norm="model.norm",
        unembed="lm_head",
        n_layers_attr="num_hidden_layers",
    ),
    # Gemma 3: the embedding module scales by sqrt(d_model) itself (so noise is added to the scaled embedding,
    # what the first block reads); four norms per block (the MLP's output is normed before the residual add,
    # so restoring the MLP module's output restores what that norm reads); gated MLP, down_proj edited.
    "gemma3": ArchSpec(
        model_types=("gemma3_text", "gemma2", "gemma"),
        embed="model.embed_tokens",
        block="model.layers.{}",
        mlp="model.layers.{}.mlp",
        down_proj="model.layers.{}.mlp.down_proj",
        attn="model.layers.{}.self_attn",
        final_norm="model.norm",
        unembed="lm_head",
        n_layers_attr="num_hidden_layers",
        mlp_adds_to_stream=False,  # post_feedforward_layernorm (Gemma 2/3)
    ),
}

# Causal-tracing noise σ the paper used for its two models (SCIENCE.md §2); other models use 3×std.
PAPER_NOISE = {"EleutherAI/gpt-j-6B": 0.094, "gpt2-xl": 0.1}


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES.values() for t in spec.model_types)


def arch_of(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of a transformers model, or a ValueError naming the supported types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ARCHITECTURES.values():
        if model_type in spec.model_types:
            return spec
    raise ValueError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); "
        f"supported model types: {', '.join(supported_model_types())}"
    )


def n_layers(model: nn.Module) -> int:
    return int(getattr(model.config, arch_of(model).n_layers_attr))


def module_name(model: nn.Module, kind: str, layer: int | None = None) -> str:
    """Dotted name of a part: kind in {embed, block, mlp, down_proj, attn, final_norm, unembed}."""
    spec = arch_of(model)
    template = getattr(spec, kind, None)
    if not isinstance(template, str):
        raise ValueError(f"unknown module kind {kind!r}")
    if "{}" in template:
        if layer is None:
            raise ValueError(f"module kind {kind!r} needs a layer index")
        L = n_layers(model)
        if not 0 <= layer < L:
            raise IndexError(f"layer {layer} out of range for a {L}-layer model")
        template = template.replace("{}", str(layer))
    options = template.split("|")
    for name in options:
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    return options[0]


def module(model: nn.Module, kind: str, layer: int | None = None) -> nn.Module:
    return get_module(model, module_name(model, kind, layer))


def down_proj_weight(model: nn.Module, layer: int) -> nn.Parameter:
    """The down-projection weight of ``layer`` as stored (see ``ArchSpec.down_proj_transposed``)."""
    return module(model, "down_proj", layer).weight


def down_proj_out_in(model: nn.Module, layer: int) -> torch.Tensor:
    """A (d_model, d_ff) *view* of the down-projection weight, whatever its storage orientation."""
    w = down_proj_weight(model, layer)
    return w.T if arch_of(model).down_proj_transposed else w


def window(center: int, w: int, n_layers: int) -> range:
    """W(center, w) = [max(0, c - w//2), min(L, c + ceil(w/2))): the layers a window of width ``w`` around
    ``center`` covers, clipped at the edges and never shifted (SCIENCE.md §2.2). Tracing restores and
    FT-5/MEMIT edit exactly these layers."""
    if w < 1:
        raise ValueError(f"window width must be >= 1, got {w}")
    if not 0 <= center < n_layers:
        raise IndexError(f"central layer {center} out of range for a {n_layers}-layer model")
    return range(max(0, center - w // 2), min(n_layers, center + -(-w // 2)))


def device_of(model: nn.Module) -> torch.device:
    """The device the model runs on (its first parameter's). ``helpers`` runs a model on one device and creates
    every tensor that meets its activations or weights there (inputs, index tensors, deltas, statistics)."""
    return next(model.parameters()).device


def dims(model: nn.Module) -> tuple[int, int]:
    """(d_model, d_ff) read off the layer-0 down-projection."""
    d_model, d_ff = down_proj_out_in(model, 0).shape
    return int(d_model), int(d_ff)


class TanhGELU(nn.Module):
    """GPT-2's tanh-approximated GELU through torch's fused kernel.

    The same formula as transformers' ``NewGELUActivation`` (which spells it out in Python: a pow, a tanh and
    four elementwise ops), within 2.4e-7; about 2x faster forward and backward on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def use_fused_gelu(model: nn.Module) -> int:
    """Replace every ``NewGELUActivation`` in ``model`` by :class:`TanhGELU`; returns how many were replaced."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "NewGELUActivation":
                setattr(parent, name, TanhGELU())
                n += 1
    return n


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    allow_bin: bool = False,
    local_files_only: bool | None = None,
    fused_gelu: bool = True,
    attn_implementation: str | None = None,
    bos_token: str | None = "auto",
):
    """Load ``(model, tokenizer)`` by named model (``smollm2-135m``, ``gemma3-270m``: fetched and converted
    once, :mod:`helpers.checkpoints`), ``.gguf`` file, hub name or local folder, in eval mode, gradients off.

    Weights are read from safetensors. ``allow_bin=True`` also accepts ``pytorch_model.bin`` (transformers
    then loads it with ``torch.load(weights_only=True)``). A local folder is always loaded offline. The
    tokenizer gets pad = eos when it has no pad token, and a BOS token as ``bos_token`` says (below). ``fused_gelu``
    runs GPT-2-style models' tanh-GELU with torch's kernel (:func:`use_fused_gelu`; same function to 2.4e-7,
    editing 15-20% faster on a CPU); ``False`` keeps transformers' module.

    ``attn_implementation`` (transformers' own attention functions): None = transformers' default (``"sdpa"``).
    ``"eager"`` was faster for this project's short passes on a CPU (session 19, 8 batched ROME edits of
    SmolLM2: 92.7 -> 81.4 s, the CPU flash kernel's backward being the difference; measured before
    :func:`use_grouped_sdpa`) but its results change in the last bits with the thread count, so tables would no
    longer be byte-identical across ``--jobs`` settings: not the default.

    ``bos_token``: a token every text starts with (:func:`helpers.scoring.set_bos`) for a tokenizer that adds
    none. ``"auto"``: the named model's rule (:attr:`~helpers.named_models.NamedModel.prepend_bos`: SmolLM2 gets
    ``<|endoftext|>``, found by the GGUF sha256 its converted folder records), else the tokenizer's own
    behaviour; ``None``: the tokenizer's own behaviour (the paper's code, which never adds one for GPT-J). The
    token is recorded in the config (``helpers_prepend_bos``), so caches keyed by the model's fingerprint
    (second moments, context templates) keep the two apart.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoints import resolve_model_source

    if str(name_or_path) != "world":  # named models and .gguf files: their converted float32 folder
        from .pipeline import cache_dir

        name_or_path = resolve_model_source(str(name_or_path), cache_dir())
    path = Path(name_or_path)
    is_local = path.exists()
    if local_files_only is None:
        local_files_only = is_local
    src = str(path) if is_local else str(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(
            src,
            dtype=dtype,
            use_safetensors=None if allow_bin else True,
            attn_implementation=attn_implementation,
            local_files_only=local_files_only,
        )
    except (OSError, ValueError) as err:
        hint = (
            "no such local folder, and the hub could not be reached or has no such model; "
            "download the weights elsewhere and pass the folder"
            if not is_local
            else "the folder lacks a config, tokenizer or safetensors weights"
        )
        raise OSError(f"cannot load model {name_or_path!r}: {hint} ({err})") from err
    arch_of(model)  # fail early, with the list of supported types
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if bos_token == "auto":
        from .gguf_convert import read_marker
        from .named_models import prepend_bos_for

        marker = read_marker(path) if is_local else None
        bos_token = prepend_bos_for((marker or {}).get("gguf_sha256"))
    if bos_token is not None:
        from .scoring import set_bos

        set_bos(tok, bos_token)
        model.config.helpers_prepend_bos = bos_token
        log.info("every text starts with %r (the model's attention sink; its tokenizer adds no BOS)", bos_token)
    if fused_gelu and use_fused_gelu(model):
        log.info("tanh-GELU runs as torch's fused kernel (fused_gelu=False keeps transformers' module)")
    model.to(device).eval().requires_grad_(False)
    use_grouped_sdpa(model)
    log.info("loaded %s (%s, %d layers)", name_or_path, model.config.model_type, n_layers(model))
    return model, tok


#: transformers' switch for handing grouped key/value heads to torch's SDPA as they are (read at every call).
SDPA_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


def use_grouped_sdpa(model: nn.Module) -> bool:
    """On a CPU, let transformers' ``sdpa`` attention pass a grouped-query model's key/value heads (SmolLM2: 3
    for 9 query heads; Gemma 3 270M: 1 for 4) to torch's kernel with ``enable_gqa`` instead of repeating them
    per query head first, which it does by default whenever a mask is given (every padded batch here). The same
    logits bitwise and the same input gradients up to the order of one sum (bitwise on some CPUs, within 1e-7
    relative on others), thread-count invariant (tests/test_models.py), and the attention's forward and
    backward about twice as fast on these short passes. Sets ``$TRANSFORMERS_SDPA_FORCE_GQA`` (process-wide)
    unless the user set it; not for a GPU model, where a masked grouped call would leave the fused kernels (a GPU
    model loaded after a CPU one in the same process inherits the setting: unset it there). Returns whether
    grouped calls are on for this model."""
    cfg = getattr(model, "config", None)
    grouped = (getattr(cfg, "num_key_value_heads", None) or 0) < (getattr(cfg, "num_attention_heads", None) or 0)
    if not grouped or device_of(model).type != "cpu":
        return False
    os.environ.setdefault(SDPA_GQA_ENV, "1")
    return os.environ[SDPA_GQA_ENV] == "1"
