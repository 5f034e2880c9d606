"""The terminal a person follows: progress relayed out of the kernel, one status line, logs kept aside."""

from __future__ import annotations

import functools
import io
import json
import time

import nbformat
import pytest

from helpers import pipeline, progress
from test_pipeline import _standin_profile


def test_bar_relays_its_state_to_the_named_file(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    monkeypatch.setenv(progress.ENV, str(path))
    outer = progress.tqdm(total=10, desc="tracing", disable=False, file=io.StringIO())
    outer.update(4)
    inner = progress.tqdm(total=3, desc="fast mlp", disable=False, file=io.StringIO())
    inner.update(1)
    progress._relay(force=True)
    states = progress.read_states(path)
    assert [(s["desc"], s["n"], s["total"]) for s in states] == [("tracing", 4, 10), ("fast mlp", 1, 3)]
    inner.close()
    assert [s["desc"] for s in progress.read_states(path)] == ["tracing"]
    outer.close()
    assert progress.read_states(path) == []
    # Without the variable nothing is written; a disabled bar is never relayed.
    monkeypatch.delenv(progress.ENV)
    path.unlink()
    progress.tqdm(range(3), disable=False, file=io.StringIO()).close()
    assert not path.exists()


def test_describe_shows_bar_count_and_eta():
    line = progress.describe([{"desc": "tracing", "n": 25, "total": 100, "elapsed": 30.0, "rate": 0.5},
                              {"desc": "fast mlp", "n": 3, "total": 30, "elapsed": 1.0, "rate": 3.0}], width=8)
    assert line == "tracing |██      | 25/100 [00:30<02:30] · fast mlp 3/30"
    assert progress.describe([{"desc": "tokens", "n": 7, "total": None, "elapsed": 3725.0, "rate": None}]) == \
        "tokens 7 [1:02:05]"
    assert progress.describe([]) == ""
    assert progress.read_states(__import__("pathlib").Path("/nonexistent/p.json")) == []


def _notebook(root, body: str) -> None:
    (root / "notebooks").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('profile = "x"\nresults_dir = ""\ncache_dir = ""', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ]
    nbformat.write(nb, root / "notebooks" / "01_data.ipynb")


def test_stage_progress_reaches_the_terminal_and_noise_goes_to_the_logs(tmp_path, model_dirs, capsys, monkeypatch):
    root = tmp_path / "proj"
    _notebook(root, "import os, time\n"
                    "from helpers.progress import tqdm\n"
                    "os.write(2, b'kernel noise on fd 2\\n')\n"
                    
                    "for _ in tqdm(range(12), desc='working', mininterval=0):\n"
                    "    time.sleep(0.25)\n")
    monkeypatch.setattr(pipeline, "StatusLine", functools.partial(progress.StatusLine, interval_s=0.2, every_s=0.5))
    profile = _standin_profile(tmp_path, model_dirs["gpt2"])
    pipeline.run(profile, book_dir=tmp_path / "book", root=root, results_root=tmp_path / "results")
    out = capsys.readouterr()
    terminal = out.out + out.err
    assert "01_data: running 01_data.ipynb" in terminal and "01_data: done in" in terminal
    assert "working |" in terminal and "/12 [" in terminal  # the relayed bar, with count and elapsed<eta
    assert "kernel noise" not in terminal and "INFO papermill" not in terminal and "TCP" not in terminal
    logs = tmp_path / "results" / "standin" / "logs"
    assert "kernel noise on fd 2" in (logs / "01_data.log").read_text()
    assert "Executing notebook" in (logs / "pipeline.log").read_text()
    assert not (logs / "01_data.progress.json").exists()


def test_failure_message_points_to_the_kernel_log(tmp_path, model_dirs):
    root = tmp_path / "proj"
    _notebook(root, "raise ValueError('broken on purpose')")
    profile = _standin_profile(tmp_path, model_dirs["gpt2"])
    with pytest.raises(pipeline.StageFailed, match=r"ValueError: broken on purpose\npartial notebook: .*\nkernel log: .*logs/01_data.log"):
        pipeline.run(profile, book_dir=tmp_path / "book", root=root, results_root=tmp_path / "results")


def test_status_line_rewrites_one_line_on_a_terminal(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    prog = tmp_path / "p.json"
    prog.write_text(json.dumps([{"desc": "edits", "n": 1, "total": 4, "elapsed": 2.0, "rate": 0.5}]))
    with progress.StatusLine(stream=stream, interval_s=0.05) as status:
        status.start("(3/9) 03_editing__rome__ei", prog)
        time.sleep(0.3)
        status.print("[pipeline] a permanent line")
        status.stop("(3/9) 03_editing__rome__ei")
    text = stream.getvalue()
    assert "\r(3/9) 03_editing__rome__ei [00:00] edits |" in text and "1/4 [00:02<00:06]" in text
    assert "[pipeline] a permanent line\n" in text
    assert "\n" not in text.split("[pipeline] a permanent line")[0].replace("\r", "")  # status never scrolls
