"""Scoring generated answers against expected ones, and picking the best evaluated step.

Every grader gives each answer a score in [0, 1]; an eval pass reports the mean per grader.
Answers and expected answers are compared with surrounding whitespace stripped.

- exact_match: 1 when the answer equals the expected answer.
- contains: 1 when the expected answer occurs in the answer.
- regex: 1 when the grader's pattern is found in the answer (re.search).
- similarity: normalised Levenshtein similarity, 1 - edit distance / length of the longer text
  (1: equal, 0: nothing in common); each text is cut to SIMILARITY_CHARS characters first.

Pure Python: no torch, so that the worker can pick the best step from stored metrics too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from trainer.eval_settings import Grader

SIMILARITY_CHARS = 1000


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete, substitute one character) that turn a into b."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def similarity(answer: str, expected: str) -> float:
    a, b = answer[:SIMILARITY_CHARS], expected[:SIMILARITY_CHARS]
    longer = max(len(a), len(b))
    return 1.0 if longer == 0 else 1.0 - levenshtein(a, b) / longer


def score(grader: Grader, answer: str, expected: str) -> float:
    """One answer's score in [0, 1] by one grader."""
    answer, expected = answer.strip(), expected.strip()
    if grader.type == "regex":
        assert grader.pattern is not None  # the spec requires it
        return float(re.search(grader.pattern, answer, re.IGNORECASE if grader.ignore_case else 0) is not None)
    if grader.ignore_case:
        answer, expected = answer.casefold(), expected.casefold()
    if grader.type == "exact_match":
        return float(answer == expected)
    if grader.type == "contains":
        return float(expected in answer)
    return similarity(answer, expected)


def grade(graders: Sequence[Grader], answers: Sequence[str], expected: Sequence[str]) -> dict[str, float]:
    """eval_<name>: the mean score of every grader over the answers."""
    n = max(len(answers), 1)
    return {f"eval_{g.score_name}": sum(score(g, a, e) for a, e in zip(answers, expected, strict=True)) / n
            for g in graders}


def best_step(evaluated: Iterable[tuple[int, dict[str, Any]]], metric: str) -> tuple[int, float] | None:
    """(step, score) of the highest `metric` among (step, metrics) pairs, the earliest of equal
    ones; None when no pair has the metric."""
    best: tuple[int, float] | None = None
    for step, metrics in sorted(evaluated, key=lambda pair: pair[0]):
        value = metrics.get(metric) if isinstance(metrics, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and (best is None or value > best[1]):
            best = (step, float(value))
    return best
