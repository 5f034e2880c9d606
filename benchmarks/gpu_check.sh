#!/usr/bin/env bash
# The prepared check for a lent GPU machine (README, "On a GPU"): `device: cuda` on every stage's code and
# SmolLM2's tracing and editing speed, in one device call of under 10 minutes. Prepare with
# benchmarks/gpu_pack.sh, then call the device tool's `run` (the real weights need the first call; without it the
# timings use random weights in SmolLM2's shape, which run the same products):
#   1. carry [".gpu/gguf.part00", ".gpu/wheels"]     command "bash benchmarks/gpu_check.sh stash"
#   2. at once, carry [".gpu/smollm2", ".gpu/gguf.part01"]     command "bash benchmarks/gpu_check.sh"   timeout_s 590
# (without call 1 the machine's own transformers, 5.17 when last seen, runs; this project is tested with 5.25)
# Everything is written under $OUT (the device tool's folder; /tmp/gpu_check_out elsewhere): env.txt, pytest.log,
# tracing.log, editing.log. GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 runs the same steps small on a CPU (a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
STASH=/tmp/helpers_gpu_stash
mkdir -p "$OUT"
if [ "${1:-}" = stash ]; then  # call 1: keep the GGUF's first part on the machine for call 2
    mkdir -p "$STASH" && cp -r .gpu/gguf.part00 .gpu/wheels "$STASH/" && ls -la "$STASH" "$STASH/wheels"
    exit $?
fi
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HELPERS_CACHE=${HELPERS_CACHE_GPU:-/tmp/helpers_gpu_cache} HELPERS_RESULTS=/tmp/helpers_gpu_results
WHEELS=$(ls "$STASH"/wheels/*.whl .gpu/wheels/*.whl 2>/dev/null)
if [ -n "$WHEELS" ]; then  # before the image's site-packages on the path
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/helpers_site \
        $WHEELS && export PYTHONPATH="$PYTHONPATH:/tmp/helpers_site"
fi
{
    date -u; nvidia-smi 2>&1 | head -15
    "$PY" -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

# 1. every stage's code on the device, against the CPU (tiny GPT-2, Llama and Gemma 3 models)
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tail -25 | tee "$OUT/pytest.log"

# 2. the model: SmolLM2's real weights if both GGUF parts are here (checked against their sha256 on loading),
#    else random weights in its shape (the same products and passes: timings only, no quality figures)
mkdir -p "$HELPERS_CACHE/gguf"
if [ -f "$STASH/gguf.part00" ] && [ -f .gpu/gguf.part01 ]; then
    cat "$STASH/gguf.part00" .gpu/gguf.part01 > "$HELPERS_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    MODEL=smollm2-135m; WEIGHTS="real (the GGUF, de-quantized)"
else
    MODEL=/tmp/helpers_gpu_smollm2_random; WEIGHTS="RANDOM in SmolLM2's shape (timings only)"
    "$PY" - "$MODEL" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from helpers.named_models import NAMED_MODELS
dst = Path(sys.argv[1])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/smollm2")).save_pretrained(dst)
AutoTokenizer.from_pretrained(".gpu/smollm2").save_pretrained(dst)
# the GGUF's sha256 gives the folder SmolLM2's first-token rule (helpers.models.load_model, bos_token="auto")
(dst / "helpers_checkpoint.json").write_text(json.dumps(
    {"gguf_sha256": NAMED_MODELS["smollm2-135m"].gguf_sha256, "weights": "random, for timings only"}))
PYEOF
fi
echo "weights: $WEIGHTS" | tee -a "$OUT/env.txt"

# 3. tracing and editing speed (benchmarks/tracing.py, benchmarks/editing.py, as `make bench` runs them on a CPU)
if [ -n "${GPU_CHECK_SMALL:-}" ]; then
    TR="--facts 1 --repeats 1"; ED="--facts 2 --layers 12 --problems ei,ff --methods rome,ft1 --n-tokens 2000"
else
    TR="--facts 8 --repeats 3"; ED="--facts 16 --layers 6,18 --problems ei,ff --methods ft1,rome,memit,ft5 --n-tokens 100000"
fi
timeout 150 "$PY" benchmarks/tracing.py --model "$MODEL" --data known --windows 10 --device "$DEVICE" $TR \
    2>&1 | grep -v "it/s\]" | tee "$OUT/tracing.log"
timeout 330 "$PY" benchmarks/editing.py --model "$MODEL" --hparams smollm2-135m --data known --corpus wikitext \
    --no-loop --device "$DEVICE" $ED 2>&1 | grep -v "it/s\]" | tee "$OUT/editing.log"
echo "done $(date -u)" | tee -a "$OUT/env.txt"
# the reply shows the end of the output: a short summary last
echo "===== summary ($WEIGHTS weights)"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -2
grep -E "^(device|fast path|reference path|ratio)" "$OUT/tracing.log"
sed -n '/^problem /,/^$/p' "$OUT/editing.log"
grep -E "^(peak|device)" "$OUT/editing.log"
