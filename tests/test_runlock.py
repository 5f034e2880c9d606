"""One run at a time per results folder (helpers.runlock): refusal, stale locks, waiting, release."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import pipeline
from helpers.runlock import RunLocked, run_lock

HOLDER = """
import sys, time
from pathlib import Path
from helpers.runlock import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(folder: Path, seconds: float) -> subprocess.Popen:
    """A process holding ``folder``'s lock for ``seconds`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "locked", "the holder process did not take the lock"
    return proc


def recorded(folder: Path) -> dict:
    text = (folder / ".lock").read_text()
    return json.loads(text) if text else {}


def test_second_holder_is_refused_with_pid_and_start_time(tmp_path):
    proc = hold(tmp_path, 30)
    try:
        info = recorded(tmp_path)
        assert info["pid"] == proc.pid and info["started"] and info["host"] and info["argv"]
        with pytest.raises(RunLocked) as err:
            with run_lock(tmp_path):
                pytest.fail("took a lock another process holds")
        msg = str(err.value)
        assert f"run pid {proc.pid} (started {info['started']}" in msg
        assert str(tmp_path / ".lock") in msg and "--wait" in msg
        assert isinstance(err.value, RuntimeError) and err.value.holder["pid"] == proc.pid
        assert recorded(tmp_path)["pid"] == proc.pid  # the refused run left the holder's record alone
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_lock_of_a_killed_run_is_stale_and_taken_over(tmp_path, caplog):
    proc = hold(tmp_path, 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert recorded(tmp_path)["pid"] == proc.pid  # the killed run could not clean up
    with caplog.at_level(logging.WARNING, logger="helpers.runlock"):
        with run_lock(tmp_path):
            assert recorded(tmp_path)["pid"] == os.getpid()
    assert f"cleared the stale lock of pid {proc.pid}" in caplog.text and "no longer running" in caplog.text


def test_wait_starts_when_the_holder_finishes(tmp_path, caplog):
    proc = hold(tmp_path, 1.5)
    started = recorded(tmp_path)["started"]
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="helpers.runlock"):
        with run_lock(tmp_path, wait=True, poll_s=0.1):
            waited = time.monotonic() - t0
            assert proc.wait(timeout=10) == 0  # the holder finished normally
            assert recorded(tmp_path)["pid"] == os.getpid()
    assert waited > 0.5
    waits = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waits) == 1 and f"waiting for run pid {proc.pid} (started {started}) to finish" in waits[0]
    assert "stale" not in caplog.text  # a clean release is not a stale lock


def test_released_after_the_block_and_after_an_exception(tmp_path):
    with run_lock(tmp_path) as path:
        assert path == tmp_path / ".lock"
        with pytest.raises(RunLocked, match=f"run pid {os.getpid()}"):  # a second holder, even in-process
            with run_lock(tmp_path):
                pass
    assert recorded(tmp_path) == {}  # emptied: released cleanly
    with pytest.raises(KeyError):
        with run_lock(tmp_path):
            raise KeyError("boom")
    assert recorded(tmp_path) == {}
    with run_lock(tmp_path):  # free again
        pass
    probe = "import sys, fcntl; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    subprocess.run([sys.executable, "-c", probe, str(tmp_path / ".lock")], check=True)


def test_cli_run_refuses_a_locked_profile(tmp_path, monkeypatch, capsys):
    from helpers.__main__ import main

    monkeypatch.setenv("HELPERS_RESULTS", str(tmp_path))
    monkeypatch.setattr(pipeline, "_run", lambda *a, **k: pytest.fail("ran while the profile was locked"))
    with run_lock(tmp_path / "default"):
        assert main(["run", "--profile", "default"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("[pipeline] ERROR: another run is using") and f"run pid {os.getpid()}" in err
