"""A GGUF file converted once into a float32 safetensors folder that :func:`helpers.models.load_model` opens,
finished only when its marker (:data:`MARKER`, recording the GGUF's sha256) exists."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from . import integrity
from .checksums import sha256_file
from .progress import tqdm

log = logging.getLogger(__name__)

MARKER = "helpers_checkpoint.json"


def model_folder(cache_dir: Path, gguf_sha256: str, gguf_file: str) -> Path:
    """``<cache>/models/<sha256[:16]>-<stem>``: where the conversion of a GGUF file lives."""
    return Path(cache_dir) / "models" / f"{gguf_sha256[:16]}-{Path(gguf_file).stem}"


def read_marker(folder: Path) -> dict | None:
    """The folder's :data:`MARKER` contents, or None if it is missing or unreadable."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_converted(folder: Path, gguf_sha256: str, check_files: bool = False) -> bool:
    """Whether ``folder`` holds a finished conversion of the GGUF file with this sha256 (with ``check_files``,
    also every file matching the size and sha256 recorded at conversion; a folder that does not is logged)."""
    marker = read_marker(folder)
    if marker is None or marker.get("gguf_sha256") != gguf_sha256:
        return False
    if check_files:
        bad = integrity.folder_problem(folder)
        if bad is not None:
            log.warning("converted model %s is damaged (%s): converting again", folder, bad)
            return False
    return True


def _tensor_types(gguf_path: Path) -> list[str]:
    import gguf

    return sorted({t.tensor_type.name for t in gguf.GGUFReader(str(gguf_path)).tensors})


def _weights_note(tensor_types: list[str], quantization: str | None) -> str:
    if set(tensor_types) <= {"F32", "F16", "BF16", "F64"}:
        return f"GGUF checkpoint stored as {'/'.join(tensor_types)}, converted to float32"
    what = quantization or f"quantized (GGUF tensor types {', '.join(tensor_types)})"
    return f"{what} quantized checkpoint de-quantized to float32, not the original weights"


def _load_gguf(gguf_path: Path):
    """(model, tokenizer) de-quantized to float32 by transformers, as a plain model ``save_pretrained`` accepts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    try:  # transformers >= 5: otherwise the model keeps a GGUF "quantizer" and refuses save_pretrained
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 local_files_only=True, **kwargs)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    if getattr(model, "hf_quantizer", None) is not None:  # rebuild it as a plain model from its config
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        model = plain
    return model.eval(), tok


def _check_saved(model, folder: Path) -> None:
    """The saved safetensors hold the model's tensors bit for bit; an unsaved one must share storage with a
    saved one (a tied ``lm_head``)."""
    import torch
    from safetensors import safe_open

    state, saved = model.state_dict(), set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key not in state or not torch.equal(f.get_tensor(key), state[key]):
                    raise RuntimeError(f"{file}: tensor {key} differs from the loaded model")
                saved.add(key)
    ptrs = {state[k].data_ptr() for k in saved}
    if unsaved := [k for k in state if k not in saved and state[k].data_ptr() not in ptrs]:
        raise RuntimeError(f"{folder}: tensors not saved: {unsaved[:5]}")


def convert_gguf(gguf_path: str | Path, dest_folder: str | Path, gguf_sha256: str | None = None,
                 source: str = "", licence: str = "", quantization: str | None = None) -> Path:
    """Convert a GGUF file into ``dest_folder`` (config, tokenizer, float32 ``model.safetensors`` and
    :data:`MARKER`), unless it already holds this file's conversion. Written into a temporary sibling
    folder that is renamed into place when complete."""
    import torch
    import transformers

    gguf_path, dest = Path(gguf_path).resolve(), Path(dest_folder)
    sha = gguf_sha256 or sha256_file(gguf_path)
    if is_converted(dest, sha, check_files=True):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    log.info("converting %s to float32 safetensors (a 100 MB file takes about half a minute)", gguf_path)
    bar = tqdm(total=3, desc=f"convert {gguf_path.name} (de-quantize, save, check)", unit="step")
    try:
        model, tok = _load_gguf(gguf_path)
        bar.update()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        bar.update()
        _check_saved(model, tmp)
        bar.update()
        integrity.write_manifest(tmp)  # before the marker: the marker means "complete and recorded"
        types = _tensor_types(gguf_path)
        marker = dict(
            gguf_file=gguf_path.name, gguf_sha256=sha, gguf_size=gguf_path.stat().st_size, gguf_tensor_types=types,
            source=source or str(gguf_path), licence=licence or "unknown (see the GGUF file's source)",
            weights=_weights_note(types, quantization), model_type=model.config.model_type,
            n_params=sum(p.numel() for p in model.parameters()),
            tie_word_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
            transformers_version=transformers.__version__, torch_version=torch.__version__,
            conversion_seconds=round(time.perf_counter() - t0, 1))
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if dest.exists():  # a stale or half-finished folder without a matching marker
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not is_converted(dest, sha):  # not a concurrent conversion that finished first
                raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.0f s -> %s", gguf_path.name, time.perf_counter() - t0, dest)
    return dest
