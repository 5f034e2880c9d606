"""What keys cached results: the package's code (source_hash) apart from its hyperparameter files and profiles,
which reach results through the values they hold (hparams_hash in every stage key, a cell's values in its
fingerprint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import package_hash, pipeline, sweep


@pytest.fixture
def pkg(tmp_path, monkeypatch) -> Path:
    """A stand-in package: code, a vendored JSON, a hyperparameter file and a profile."""
    root = tmp_path / "helpers"
    for rel, text in {"tracing.py": "X = 1\n", "vendor/facts.json": "[]\n", "hparams/m.yaml": "rome: {}\n",
                      "profiles/p.yaml": "name: p\n", "editing/rome.py": "Y = 2\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    monkeypatch.setattr(package_hash, "PACKAGE_DIR", root)
    return root


def test_source_hash_sees_code_and_vendored_data_not_hparams_or_profiles(pkg):
    src, hp = package_hash.source_hash(), package_hash.hparams_hash()
    (pkg / "hparams" / "m.yaml").write_text("rome: {kl_factor: 1}\n")
    (pkg / "profiles" / "p.yaml").write_text("name: p\nmax_facts: 3\n")
    assert package_hash.source_hash() == src  # tracing tables, facts, σ: still valid
    assert package_hash.hparams_hash() != hp  # the stages re-run
    for rel in ("editing/rome.py", "vendor/facts.json"):
        before = package_hash.source_hash()
        (pkg / rel).write_text((pkg / rel).read_text() + "\n")
        assert package_hash.source_hash() != before, rel
    before = package_hash.source_hash()
    (pkg / "editing" / "__pycache__").mkdir()
    (pkg / "editing" / "__pycache__" / "rome.py").write_text("stale")  # never part of the source
    (pkg / "notes.txt").write_text("not source")
    assert package_hash.source_hash() == before
    assert pipeline.source_hash is package_hash.source_hash  # what the pipeline and sweep read


def test_data_dirs_name_the_real_folders():
    """After a rename of hparams/ or profiles/, leaving them out of source_hash would silently do nothing."""
    tops = {package_hash._top(p) for p in package_hash._package_files()}
    assert set(package_hash.DATA_DIRS) <= tops and {"editing", "pipeline.py"} <= tops


def test_stage_key_follows_hparams_files(pkg):
    prof = pipeline.load_profile("smoke")
    st = pipeline.stages(prof, pipeline.project_root())[0]
    key = pipeline._stage_key(st, {}, prof, pipeline._code_key(), "up")
    assert pipeline._stage_key(st, {}, prof, pipeline._code_key(), "up") == key
    (pkg / "hparams" / "m.yaml").write_text("rome: {kl_factor: 1}\n")
    assert pipeline._stage_key(st, {}, prof, pipeline._code_key(), "up") != key


def test_cell_fingerprint_follows_the_cells_values_not_the_file(pkg, monkeypatch):
    """A cell's cached rows stay valid when a hyperparameter file changes elsewhere, and not when its own
    values change."""
    monkeypatch.setattr(pipeline, "source_hash", package_hash.source_hash)
    cfg = {"method": "rome", "hparams": {"kl_factor": 0.0625}}
    key = sweep._fingerprint("cell", cfg, "m")
    (pkg / "hparams" / "m.yaml").write_text("memit: {kl_factor: 1}\n")  # another method's value
    assert sweep._fingerprint("cell", cfg, "m") == key
    assert sweep._fingerprint("cell", {**cfg, "hparams": {"kl_factor": 1}}, "m") != key
    (pkg / "tracing.py").write_text("X = 2\n")  # code changed: every cached row is recomputed
    assert sweep._fingerprint("cell", cfg, "m") != key
