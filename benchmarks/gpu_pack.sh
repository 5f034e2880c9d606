#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for benchmarks/gpu_check.sh, the one prepared check for a lent GPU machine
# (README, "On a GPU"). That machine reaches no network and receives at most 64 MiB per call, so this packs:
#   .gpu/wheels/      gguf (SmolLM2's conversion; the machine's image lacks it), and transformers 5.25 with the
#                     huggingface_hub it needs: the image's transformers 5.17 fails this project's GPT-J tracing test
#                     (pure-Python wheels: the machine runs Python 3.12, this one 3.11; `kernels` is optional)
#   .gpu/smollm2/     SmolLM2's config and tokenizer (a random-weight model of its shape, when the weights cannot come)
#   .gpu/gguf.part00, .gpu/gguf.part01   SmolLM2's GGUF (98 MB) in two parts (44 MiB and the rest): the first
#                     call carries part00 and the wheels, the second part01 (each under 64 MiB with the tree)
# Usage: bash benchmarks/gpu_pack.sh   (after `make env`; fetches and converts SmolLM2 once if not cached)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/smollm2
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels gguf==0.19.0 transformers==5.25.0 \
    huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore click
folder=$("$PY" -c "from helpers.checkpoints import resolve_model_source; from helpers.pipeline import cache_dir; \
print(resolve_model_source('smollm2-135m', cache_dir()))")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json; do cp "$folder/$f" .gpu/smollm2/; done
gguf=$("$PY" -c "from helpers.named_models import NAMED_MODELS as N; from helpers.pipeline import cache_dir; \
print(cache_dir() / 'gguf' / N['smollm2-135m'].gguf_file)")
split -b 44M -d "$gguf" .gpu/gguf.part
ls -la .gpu .gpu/wheels .gpu/smollm2
du -sh .gpu
