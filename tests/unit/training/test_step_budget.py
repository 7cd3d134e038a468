from __future__ import annotations

from workers.training.trainer import step_budget


def test_the_step_budget_is_cut_to_max_epochs_passes_over_a_small_snapshot() -> None:
    assert step_budget(80, 0.0, 78, 16) == 80  # no cap: the budget as set
    assert step_budget(80, 6.0, 78, 16) == 30  # ceil(6 * 78 / 16): not 16 passes over 78 pairs
    assert step_budget(80, 6.0, 400, 16) == 80  # a large snapshot keeps the budget
    assert step_budget(0, 6.0, 78, 16) == 0  # no step budget: training runs by epochs
    assert step_budget(80, 6.0, 1, 16) == 1
