"""A stage kernel follows the thread budget the stage runner writes (helpers.thread_budget)."""

from __future__ import annotations

import torch

from helpers import thread_budget


def test_shares_split_the_cores_and_give_the_remainder_to_the_first():
    a, b, c = (f"/x/{n}" for n in "abc")
    assert thread_budget.shares([a, b], 2) == {a: 1, b: 1}
    assert thread_budget.shares([a], 2) == {a: 2}  # the last kernel running takes every core
    assert thread_budget.shares([a, b], 5) == {a: 3, b: 2}
    assert thread_budget.shares([a, b, c], 2) == {a: 1, b: 1, c: 1}  # never 0 threads
    assert thread_budget.shares([], 4) == {}


def test_follow_sets_torch_threads_from_the_file(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    path = tmp_path / "stage.threads"
    monkeypatch.setenv(thread_budget.ENV, str(path))
    try:
        assert thread_budget.follow(force=True) is None  # no file yet: unchanged
        thread_budget.write(path, 1)
        torch.set_num_threads(2)
        assert thread_budget.follow(force=True) == 1 and torch.get_num_threads() == 1
        thread_budget.write(path, 2)
        assert thread_budget.follow() is None  # checked a moment ago: not again yet
        assert thread_budget.follow(force=True) == 2 and torch.get_num_threads() == 2
        assert thread_budget.follow(force=True) is None  # already so
        path.write_text("garbled")
        assert thread_budget.follow(force=True) is None and torch.get_num_threads() == 2
        assert not list(tmp_path.glob("*.tmp"))
    finally:
        torch.set_num_threads(before)
