"""The training check runs where pairs are written (workers/tasks.py), not only on beat's schedule."""

from __future__ import annotations

from workers.tasks import check_after_write


def test_check_runs_only_when_pairs_were_written() -> None:
    calls: list[int] = []
    assert check_after_write(3, check=lambda: calls.append(1)) is True
    assert check_after_write(0, check=lambda: calls.append(1)) is False
    assert calls == [1]
