"""Every cached artefact is checked before use: a truncated or damaged file is reported with its path and
rebuilt, never read."""

from __future__ import annotations

import os
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import integrity, tables


def truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def flip(p: Path, at: float = 0.5) -> None:
    data = bytearray(p.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    p.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate, "flipped byte": flip}


def _table(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({"case_id": np.arange(n), "p": rng.random(n)})


@pytest.mark.parametrize("kind", DAMAGE)
def test_problem_names_truncation_and_changed_bytes(tmp_path, kind):
    p = tmp_path / "t.parquet"
    tables.write_table(_table(), p)
    assert integrity.problem(p) is None and integrity.sidecar(p).exists()
    DAMAGE[kind](p)
    expected = "truncated" if kind == "truncated" else "sha256 differs"
    assert expected in integrity.problem(p)
    with pytest.raises(integrity.CorruptFile, match=rf"t\.parquet: .*{expected}"):
        tables.read_table(p)


def test_a_file_without_a_record_is_accepted_unless_required(tmp_path):
    p = tmp_path / "old.parquet"
    _table().to_parquet(p)
    assert integrity.problem(p) is None
    assert integrity.problem(p, require_record=True) == "no size/sha256 record"
    truncate(p)  # an old damaged file is still refused, by the reader
    with pytest.raises(integrity.CorruptFile, match="not a readable parquet table"):
        tables.read_table(p)


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_results_table_is_recomputed(tmp_path, caplog, kind):
    from helpers import sweep

    p = tmp_path / "edits.parquet"
    tables.write_table(_table(), p, key="k")
    DAMAGE[kind](p)
    with caplog.at_level(logging.WARNING):
        got = sweep._read_if_same(p, "k", empty=_table(0))
    assert got.empty and not p.exists() and not integrity.sidecar(p).exists()
    assert str(p) in caplog.text


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_second_moments_are_recomputed(tmp_path, caplog, kind, model_dirs):
    import torch

    from helpers.editing.stats import SecondMoments
    from helpers.models import load_model

    model, tok = load_model(str(model_dirs["gpt2"]))
    docs = ["the cat sat on the mat and looked at the dog"] * 20
    first = SecondMoments(model, tok, docs, n_tokens=200, cache_dir=tmp_path, progress=False)
    first.precompute([1])
    c = first.moment(1).clone()
    path = first.path(1)
    DAMAGE[kind](path)
    again = SecondMoments(model, tok, docs, n_tokens=200, cache_dir=tmp_path, progress=False)
    with caplog.at_level(logging.WARNING):
        again.precompute([1])
    assert str(path) in caplog.text and torch.equal(again.moment(1), c)
    assert integrity.problem(path) is None  # rebuilt with a fresh record


@pytest.mark.parametrize("kind", ["truncated", "flipped byte", "not json"])
def test_damaged_context_templates_are_sampled_again(tmp_path, caplog, kind, model_dirs):
    from helpers.editing import templates
    from helpers.models import load_model

    model, tok = load_model(str(model_dirs["gpt2"]))
    templates._MEMORY.clear()
    first = templates.context_templates(model, tok, cache_dir=tmp_path)
    (path,) = (tmp_path / "templates").glob("*.json")
    if kind == "not json":  # damaged before records existed: no record, unreadable content
        integrity.sidecar(path).unlink()
        path.write_text("{not json")
    else:
        DAMAGE[kind](path)
    templates._MEMORY.clear()
    with caplog.at_level(logging.WARNING):
        again = templates.context_templates(model, tok, cache_dir=tmp_path)
    assert str(path) in caplog.text and again == first
    assert json.loads(path.read_text())["rome"] == first.rome


def test_damaged_tracing_checkpoint_is_traced_again(tmp_path, caplog, model_dirs):
    from helpers import tracing
    from helpers.models import load_model

    model, tok = load_model(str(model_dirs["gpt2"]))
    facts = pd.DataFrame({"case_id": [0, 1], "subject": ["cat", "dog"], "prompt": ["The {} sat", "A {} ran"],
                          "target_true": [" on", " away"]})
    ck = tmp_path / "ck.parquet"
    whole = tracing.trace_facts(model, tok, facts, windows=[1], sigma=0.1, progress=False, checkpoint=ck)
    flip(ck)
    with caplog.at_level(logging.WARNING):
        again = tracing.trace_facts(model, tok, facts, windows=[1], sigma=0.1, progress=False, checkpoint=ck)
    assert str(ck) in caplog.text
    pd.testing.assert_frame_equal(again, whole)


def test_folder_manifest_finds_a_damaged_or_missing_member(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 100)
    (folder / "sub" / "b.txt").write_text("hello")
    assert integrity.folder_problem(folder) is None  # no manifest yet: a folder from before manifests
    integrity.write_manifest(folder)
    assert integrity.folder_problem(folder) is None
    flip(folder / "sub" / "b.txt")
    assert "sub/b.txt: sha256 differs" in integrity.folder_problem(folder)
    (folder / "sub" / "b.txt").write_text("hello")
    truncate(folder / "a.bin")
    assert "a.bin: 50 bytes, 100 when written" in integrity.folder_problem(folder)
    (folder / "a.bin").unlink()
    assert integrity.folder_problem(folder) == "a.bin is missing"


def test_damaged_world_model_is_trained_again(tmp_path, caplog, monkeypatch):
    """A copy of a (fake) finished world folder with a damaged weight file is deleted and rebuilt."""
    from helpers.world import presets

    folder = presets.world_folder("smoke", tmp_path)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    (folder / "world.json").write_text("{}")
    integrity.write_manifest(folder)
    assert presets.ensure_world_model("smoke", tmp_path, progress=False) == folder  # intact: reused
    flip(folder / "model.safetensors")

    class Retrained(Exception):
        pass

    def build(*a, **k):
        raise Retrained

    monkeypatch.setattr(presets, "build_world", build)
    with caplog.at_level(logging.WARNING), pytest.raises(Retrained):
        presets.ensure_world_model("smoke", tmp_path, progress=False)
    assert str(folder) in caplog.text and "model.safetensors: sha256 differs" in caplog.text
    assert not folder.exists()


def test_pipeline_reruns_a_stage_whose_output_was_damaged(tmp_path, model_dirs, capsys):
    from helpers import pipeline
    from test_pipeline import _standin_profile
    from test_progress import _notebook

    root = tmp_path / "proj"
    _notebook(root, "import pandas as pd\nfrom helpers import tables\n"
                    "tables.write_table(pd.DataFrame({'a': range(100)}), results_dir + '/rows.parquet')\n"
                    "with tables.atomic_path(results_dir + '/figure.svg') as tmp:\n"
                    "    tmp.write_text('<svg/>' * 50)\n")
    profile = _standin_profile(tmp_path, model_dirs["gpt2"])
    kw = dict(book_dir=tmp_path / "book", root=root, results_root=tmp_path / "results")
    res = tmp_path / "results" / "standin"
    assert [r["status"] for r in pipeline.run(profile, **kw)] == ["ran"]
    assert [r["status"] for r in pipeline.run(profile, **kw)] == ["skipped"]
    for victim in (res / "rows.parquet", res / "figure.svg", tmp_path / "book" / "executed" / "01_data.ipynb"):
        capsys.readouterr()
        if victim.suffix == ".ipynb":
            nb = json.loads(victim.read_text())
            nb["cells"][-1]["source"] = "changed"
            victim.write_text(json.dumps(nb))
        else:
            truncate(victim)
        assert [r["status"] for r in pipeline.run(profile, **kw)] == ["ran"], victim
        assert f"its output {victim}" in capsys.readouterr().out
        assert integrity.problem(res / "rows.parquet") is None
    # A table rewritten later through atomic_path (a shared cache) is not taken for damage.
    tables.write_table(pd.DataFrame({"a": range(7)}), res / "rows.parquet")
    assert [r["status"] for r in pipeline.run(profile, **kw)] == ["skipped"]
    shutil.rmtree(res / ".stages")


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    """What a writer killed mid-write leaves (atomic_path's temporary, a sidecar's, a download's): removed when its
    writer's process is gone, kept while it runs; in a results folder whose lock is held, all of them."""
    import subprocess
    import sys

    from helpers import tables

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "sub").mkdir()
    left = [tmp_path / f".t.parquet.{pid}.ab12_cd3.tmp", tmp_path / "sub" / f".x.sha256.{pid}.1234.tmp",
            tmp_path / f".model.gguf.tmp-{pid}"]
    live = tmp_path / f".u.parquet.{os.getpid()}.zz.tmp"
    legacy = tmp_path / ".v.png.jbk0d1r0.tmp"  # no writer pid in the name
    keep = tmp_path / "t.parquet"
    for p in (*left, live, legacy, keep):
        p.write_text("x")
    assert sorted(tables.remove_stale_temporaries(tmp_path)) == sorted(left)
    assert live.exists() and legacy.exists() and keep.exists()
    assert sorted(tables.remove_stale_temporaries(tmp_path, everything=True)) == sorted([live, legacy])
    assert keep.exists()
    with tables.atomic_path(tmp_path / "w.txt") as t:
        assert f".{os.getpid()}." in t.name  # the writer's pid is in every temporary's name
        t.write_text("y")
