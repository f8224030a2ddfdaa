"""trainer.planning against outputs recorded from the planner before it became a package.

tests/unit/planner_recorded.json holds, for every case of planner_cases.py, a digest of the whole
plan or estimate (messages, notes and every part included) or the error it raised. A change to any
number of the planner shows here as the case that moved.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit import planner_cases as C
from trainer import planning

RECORDED = Path(__file__).with_name("planner_recorded.json")


def test_every_recorded_case_is_planned_as_recorded():
    recorded = json.loads(RECORDED.read_text())
    cases = C.cases()
    assert C.digest({"cases": cases}) == recorded["cases"], "the cases changed: the recording no longer applies"
    moved = []
    for case in cases:
        got = C.run(case, planning.plan, planning.estimate_for_spec)
        if got != recorded["outcomes"][case["id"]]:
            moved.append((case["id"], case["kind"], case["model"], case["spec"], case["kw"], got))
    assert not moved, f"{len(moved)} of {len(cases)} cases moved, first: {moved[:3]}"
