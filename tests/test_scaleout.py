"""Executors (helpers.scaleout): tracing and the editing sweep on a local Ray cluster of 2 one-thread workers equal
the local path, resume after the driver is killed, and survive a worker killed mid-unit (its unit is retried, its
rows present exactly once). A tiny random GPT-2 stands in for the model, as in the pipeline's stand-in profile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ray = pytest.importorskip("ray")

from helpers import data, editing, scaleout, sweep, tables, tracing  # noqa: E402
from helpers.scaleout import ExecutorConfig, WorkerSpec  # noqa: E402
from helpers.study import Study  # noqa: E402
from conftest import SAMPLE_COUNTERFACT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAY2 = ExecutorConfig(kind="ray", workers=2, threads_per_worker=1, facts_per_unit=2)
TOL = dict(rtol=1e-5, atol=1e-6)  # workers use 1 thread, the driver 2: float rounding only


@pytest.fixture(scope="module")
def standin(tmp_path_factory, model_dirs):
    """A profile on the tiny random GPT-2 folder, its opened study (driver side) and the fixture facts."""
    tmp = tmp_path_factory.mktemp("scaleout")
    recs = json.loads(SAMPLE_COUNTERFACT.read_text())
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) + " "
                                + r["requested_rewrite"]["target_true"]["str"] for r in recs * 10))
    prof = {"name": "standin-ray", "model": str(model_dirs["gpt2"]), "data": str(SAMPLE_COUNTERFACT),
            "correctness_filter": False,
            "editing": {"corpus": str(corpus), "stats_tokens": 400, "batch_size": 2}}
    path = tmp / "standin-ray.yaml"
    path.write_text(yaml.safe_dump(prof))
    study = Study.open(str(path), tmp / "results", tmp / "cache")
    facts = data.to_frame(data.load_counterfact(SAMPLE_COUNTERFACT)).head(5)
    study.stats.precompute([0, 1])
    _ = study.templates  # cached on disk for the workers
    yield path, study, facts
    if ray.is_initialized():
        ray.shutdown()


def _executor(standin, **kw):
    path, study, _ = standin
    spec = WorkerSpec(str(path), str(study.results), str(study.cache))
    return scaleout.RayExecutor(ExecutorConfig(**{**RAY2.__dict__, **kw}), spec)


def _cell(method="rome"):
    return sweep.CellConfig(method, "ei", [0, 1], editing.load_hparams("world", method, "ei"), sigma=0.5,
                            batch_size=2)


def _same_edits(a: pd.DataFrame, b: pd.DataFrame) -> None:
    drop = ["seconds"]
    a, b = a.drop(columns=drop).reset_index(drop=True), b.drop(columns=drop).reset_index(drop=True)
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        if c.endswith(("_pre", "_post")):
            pd.testing.assert_series_equal(a[c].explode().astype(float), b[c].explode().astype(float), **TOL)
        else:
            assert a[c].astype(str).tolist() == b[c].astype(str).tolist(), c


def test_executor_config_is_validated():
    with pytest.raises(ValueError, match="kind 'dask' is not one of local, ray"):
        ExecutorConfig.from_dict({"kind": "dask"})
    with pytest.raises(ValueError, match=r"unknown keys \['gpu'\]"):
        ExecutorConfig.from_dict({"kind": "ray", "gpu": 1})
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ExecutorConfig.from_dict({"kind": "ray", "workers": 0})
    assert scaleout.make_executor(ExecutorConfig(), WorkerSpec("p", "r", "c")) is None  # local: in-process path


def test_tracing_on_two_workers_equals_the_local_path_and_resumes(standin, tmp_path):
    _, study, facts = standin
    kw = dict(kinds=["mlp"], windows=[1, 3], sigma=0.5, n_samples=3)
    local = tracing.trace_facts(study.model, study.tok, facts, checkpoint=tmp_path / "a.parquet", **kw)
    ex = _executor(standin)
    try:
        # a first run that saw 3 of the 5 facts (as if stopped): the full run traces only the other 2
        part = tracing.trace_facts(study.model, study.tok, facts.head(3), checkpoint=tmp_path / "b.parquet",
                                   executor=ex, **kw)
        assert set(part["case_id"]) == set(facts.head(3)["case_id"])
        seen = []
        ex_map = ex.map
        ex.map = lambda task, units, on_result: (seen.extend(len(u[0]) for u in units), ex_map(task, units, on_result))
        full = tracing.trace_facts(study.model, study.tok, facts, checkpoint=tmp_path / "b.parquet", executor=ex, **kw)
    finally:
        ex.close()
    assert seen == [2]  # only the two facts not traced before, in one unit
    pd.testing.assert_frame_equal(local, full, **TOL)
    on_disk = tables.read_table(tmp_path / "b.parquet")
    assert len(on_disk) == len(local) and not on_disk.duplicated(["case_id", "kind", "window", "token_idx", "layer"]).any()


def test_sweep_on_two_workers_equals_the_local_path(standin, tmp_path):
    _, study, facts = standin
    cfg = _cell("rome")
    local = sweep.run_cell(study.model, study.tok, facts, cfg, tmp_path / "a" / "t.parquet", tmp_path / "a",
                           stats=study.stats, templates=study.templates)
    ex = _executor(standin, layers_per_unit=1)
    try:
        dist = sweep.run_cell(study.model, study.tok, facts, cfg, tmp_path / "b" / "t.parquet", tmp_path / "b",
                              stats=study.stats, templates=study.templates, executor=ex)
    finally:
        ex.close()
    assert len(dist) == len(facts) * 2 and (dist["status"] == "ok").all()
    _same_edits(local, dist)
    # the table on disk carries the local path's fingerprint: a local re-run finds nothing left to do
    again = sweep.run_cell(study.model, study.tok, facts, cfg, tmp_path / "b" / "t.parquet", tmp_path / "b",
                           stats=study.stats, templates=study.templates)
    pd.testing.assert_frame_equal(again, dist)


def test_a_killed_worker_loses_only_its_unit(standin, tmp_path, monkeypatch):
    """The worker running unit 1 is killed (SIGKILL, its first attempt only): Ray restarts it, the unit runs
    again, and every (fact, layer) row is present exactly once, equal to the local run."""
    _, study, facts = standin
    cfg = _cell("ft1")
    local = sweep.run_cell(study.model, study.tok, facts, cfg, tmp_path / "a" / "t.parquet", tmp_path / "a")
    marker = tmp_path / "killed.pid"
    monkeypatch.setenv(scaleout.FAULT_ENV, f"edit:1:{marker}")
    ex = _executor(standin)
    try:
        dist = sweep.run_cell(study.model, study.tok, facts, cfg, tmp_path / "b" / "t.parquet", tmp_path / "b",
                              executor=ex)
    finally:
        ex.close()
    assert marker.exists()  # the kill happened
    assert not dist.duplicated(sweep.KEY).any() and len(dist) == len(facts) * 2
    _same_edits(local, dist)


def test_a_worker_that_keeps_dying_stops_the_unit_not_the_saved_rows(standin, tmp_path, monkeypatch):
    """With no retries a killed worker's unit is reported lost (UnitLost); the other units' rows are written,
    and a re-run resumes with only the lost unit left."""
    _, study, facts = standin
    cfg = _cell("ft1")
    monkeypatch.setenv(scaleout.FAULT_ENV, f"edit:0:{tmp_path / 'killed.pid'}")
    ex = _executor(standin, retries=0)
    out = tmp_path / "b" / "t.parquet"
    try:
        with pytest.raises(scaleout.UnitLost, match="edit unit 0"):
            sweep.run_cell(study.model, study.tok, facts, cfg, out, tmp_path / "b", executor=ex)
        saved = tables.read_table(out)
        pre = sweep.pre_edit(study.model, study.tok, facts, "ei", cfg.sigma, tmp_path / "b", cfg.options,
                             cfg.essence_samples)
        order = sweep.in_batch_order(study.tok, [f for _, f in facts.iterrows()], pre, cfg)
        assert set(saved["case_id"]) == {int(f["case_id"]) for f in order[2:]}  # units 1 and 2, not unit 0
        monkeypatch.delenv(scaleout.FAULT_ENV)
        done = sweep.run_cell(study.model, study.tok, facts, cfg, out, tmp_path / "b", executor=ex)
    finally:
        ex.close()
    assert len(done) == len(facts) * 2 and not done.duplicated(sweep.KEY).any()


def test_an_error_of_the_unit_itself_is_raised_once(standin, tmp_path):
    """A unit that raises (a subject missing from its prompt, with on_missing='raise') is not retried: the error
    reaches the driver as itself, after the other units' rows are saved."""
    _, study, facts = standin
    bad = facts.copy()
    bad.loc[bad.index[0], "prompt"] = "A prompt that names nobody is"  # full text: the subject is not in it
    ex = _executor(standin)
    try:
        with pytest.raises(tracing.SubjectNotFoundError):
            tracing.trace_facts(study.model, study.tok, bad, kinds=["mlp"], windows=[1], sigma=0.5, n_samples=2,
                                on_missing="raise", checkpoint=tmp_path / "t.parquet", executor=ex)
    finally:
        ex.close()
    saved = tables.read_table(tmp_path / "t.parquet")
    assert set(saved["case_id"]) == set(facts["case_id"].iloc[2:])


DRIVER = """
import sys
from helpers import data, editing, scaleout, sweep
from helpers.study import Study
from helpers.scaleout import ExecutorConfig, WorkerSpec
import conftest
prof, res, cache, out = sys.argv[1:5]
study = Study.open(prof, res, cache)
facts = data.to_frame(data.load_counterfact(conftest.SAMPLE_COUNTERFACT)).head(5)
ex = scaleout.RayExecutor(ExecutorConfig(kind="ray", workers=1, facts_per_unit=1), WorkerSpec(prof, res, cache))
cfg = sweep.CellConfig("ft1", "ei", [0, 1], editing.load_hparams("world", "ft1", "ei"), sigma=0.5, batch_size=1)
from pathlib import Path
sweep.run_cell(study.model, study.tok, facts, cfg, Path(out), Path(res), executor=ex)
"""


def test_the_driver_killed_half_way_resumes(standin, tmp_path):
    """The driver process is killed (SIGKILL) once the table holds some units: a re-run finishes the cell with
    every row exactly once and the same values as an uninterrupted run."""
    path, study, facts = standin
    out, res = tmp_path / "t.parquet", tmp_path / "res"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(path), str(res), str(study.cache), str(out)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.err", "w"))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and 0 < len(pd.read_parquet(out)) < 10:
                break
            time.sleep(0.05)
        assert proc.poll() is None, ("the driver finished or failed before it could be killed: "
                                     + (tmp_path / "driver.err").read_text()[-2000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    half = tables.read_table(out)
    assert 0 < len(half) < 10
    cfg = sweep.CellConfig("ft1", "ei", [0, 1], _cell("ft1").hparams, sigma=0.5, batch_size=1)
    ex = _executor(standin, workers=1, facts_per_unit=1)
    try:
        done = sweep.run_cell(study.model, study.tok, facts, cfg, out, res, executor=ex)
    finally:
        ex.close()
    ref = sweep.run_cell(study.model, study.tok, facts, cfg, tmp_path / "ref.parquet", tmp_path / "ref")
    assert not done.duplicated(sweep.KEY).any()
    _same_edits(ref, done)


def test_errors_a_worker_raises_travel_back_as_themselves():
    """Ray sends a unit's exception to the driver pickled: the project's errors with fields survive the trip."""
    import pickle

    from helpers.data import RecordError
    from helpers.integrity import CorruptFile
    from helpers.tables import DiskFull

    for err in (CorruptFile(Path("/x.parquet"), "truncated"), DiskFull(Path("/y"), 10, 2),
                RecordError(3, "prompt", "missing"), tracing.SubjectNotFoundError(1, "p", "s")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)


def test_a_pool_larger_than_the_cluster_shrinks_to_fit(standin, tmp_path, caplog):
    """Asking for more workers than the cluster's CPUs hold would leave units waiting forever on actors that can
    never start: the pool shrinks to what fits, with a warning, and the work finishes."""
    _, study, facts = standin
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = int(ray.cluster_resources()["CPU"])
    ex = _executor(standin, workers=cpus + 3)
    try:
        with caplog.at_level("WARNING"):
            table = tracing.trace_facts(study.model, study.tok, facts.head(3), kinds=["mlp"], windows=[1], sigma=0.5,
                                        n_samples=2, executor=ex)
        assert len(ex._actors) == cpus
    finally:
        ex.close()
    assert f"holds {cpus} of the {cpus + 3} workers" in caplog.text
    assert set(table["case_id"]) == set(facts.head(3)["case_id"])
