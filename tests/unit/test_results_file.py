"""A job's results file (OpenAI's result_files): its figures per step, as CSV."""

from __future__ import annotations

import csv
import io

from core.results import results_table


def test_the_results_table_has_a_row_per_step_and_a_column_per_figure() -> None:
    events = [
        ("message", {"step": 1, "train_loss": 9.0}),  # not a figure event
        ("metrics", {"step": 1, "train_loss": 2.5, "learning_rate": 0.001, "tokens_per_second": 100.0}),
        ("metrics", {"step": 2, "train_loss": 2.0, "learning_rate": 0.002, "tokens_per_second": 110.0}),
        ("validation", {"step": 2, "valid_loss": 2.2, "valid_mean_token_accuracy": 0.5}),
        ("eval", {"step": 2, "eval_exact": 0.25, "seconds": 3.0}),
        # A resume trained step 2 again: its last figures are kept. A diverged loss is left out.
        ("metrics", {"step": 2, "train_loss": 1.9, "learning_rate": 0.002, "tokens_per_second": 120.0}),
        ("metrics", {"step": 3, "train_loss": float("nan"), "learning_rate": 0.003}),
        ("metrics", {"train_loss": 1.0}),  # no step
    ]
    rows = list(csv.reader(io.StringIO(results_table(events).decode())))
    assert rows == [
        ["step", "train_loss", "learning_rate", "tokens_per_second", "valid_loss", "valid_mean_token_accuracy", "eval_exact"],
        ["1", "2.5", "0.001", "100.0", "", "", ""],
        ["2", "1.9", "0.002", "120.0", "2.2", "0.5", "0.25"],
        ["3", "", "0.003", "", "", "", ""],
    ]


def test_a_job_without_figures_has_a_header_only() -> None:
    assert results_table([]) == b"step\n"
