"""A write that runs out of space stops with the path and the space needed, and leaves no partial file."""

from __future__ import annotations

import errno
import subprocess
import uuid

import numpy as np
import pandas as pd
import pytest

from helpers import tables


def _frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"case_id": np.arange(n), "p": rng.random(n), "note": [uuid.uuid4().hex for _ in range(n)]})


def _failing_to_parquet(after_bytes: int):
    def to_parquet(self, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"x" * after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return to_parquet


def test_table_write_that_runs_out_of_space_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "rows.parquet"
    tables.write_table(_frame(5), dest, key="old")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _failing_to_parquet(4096))
    with pytest.raises(tables.DiskFull, match=r"no space left on the device to write .*rows\.parquet: it needs at "
                                              r"least 4\.0 KB") as err:
        tables.write_table(_frame(50), dest, key="new")
    assert err.value.errno == errno.ENOSPC and err.value.path == dest and err.value.needed == 4097
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rows.parquet.sha256", "rows.parquet"]  # no temporary file
    back = tables.read_table(dest)
    assert tables.table_key(back) == "old" and len(back) == 5


def test_other_os_errors_pass_through_unchanged(tmp_path, monkeypatch):
    def to_parquet(self, path, *a, **k):
        raise OSError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    with pytest.raises(OSError) as err:
        tables.write_table(_frame(3), tmp_path / "t.parquet")
    assert not isinstance(err.value, tables.DiskFull) and err.value.errno == errno.EACCES
    assert list(tmp_path.iterdir()) == []


def test_second_moment_cache_reports_the_exact_size_it_needs(tmp_path, monkeypatch, model_dirs):
    from pathlib import Path

    from helpers.editing.stats import SecondMoments
    from helpers.models import dims, load_model

    model, tok = load_model(str(model_dirs["gpt2"]))
    d_ff = dims(model)[1]
    real = Path.write_bytes

    def full(self, data):
        if self.name.endswith(".tmp") and "stats" in self.parts:
            real(self, data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    sm = SecondMoments(model, tok, ["the cat sat on the mat"] * 10, n_tokens=100, cache_dir=tmp_path, progress=False)
    with pytest.raises(tables.DiskFull, match=rf"layer1_n100\.safetensors: it needs at least "
                                              rf"{tables._size(d_ff * d_ff * 4)}") as err:
        sm.precompute([1])
    assert err.value.needed == d_ff * d_ff * 4
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written, no record


@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KB tmpfs (needs the right to mount, as root in a container; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_real_full_filesystem(small_fs):
    tables.write_table(_frame(10), small_fs / "small.parquet")
    with pytest.raises(tables.DiskFull, match=r"small_big\.parquet: it needs at least .* free there") as err:
        tables.write_table(_frame(60_000), small_fs / "small_big.parquet")
    assert err.value.free < 256 * 1024
    assert sorted(p.name for p in small_fs.iterdir()) == [".small.parquet.sha256", "small.parquet"]
    assert len(tables.read_table(small_fs / "small.parquet")) == 10


def test_a_stage_that_runs_out_of_space_stops_the_run_naming_the_file(tmp_path, model_dirs):
    from helpers import pipeline
    from test_progress import _notebook
    from test_pipeline import _standin_profile

    root = tmp_path / "proj"
    _notebook(root, "import errno, pandas as pd\n"
                    "from helpers import tables\n"
                    "def full(self, path, *a, **k):\n"
                    "    open(path, 'wb').write(b'x' * 10)\n"
                    "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
                    "pd.DataFrame.to_parquet = full\n"
                    "tables.write_table(pd.DataFrame({'a': [1]}), results_dir + '/rows.parquet')\n")
    profile = _standin_profile(tmp_path, model_dirs["gpt2"])
    with pytest.raises(pipeline.StageFailed, match=r"01_data failed .*DiskFull: .*no space left on the device to "
                                                   r"write .*rows\.parquet: it needs at least 11 B"):
        pipeline.run(profile, book_dir=tmp_path / "book", root=root, results_root=tmp_path / "results")
    res = tmp_path / "results" / "standin"
    assert not list(res.glob("*rows.parquet*")) and not (res / ".stages" / "01_data.json").exists()
