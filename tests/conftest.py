"""Records whether the lab tier really ran, for CI.

CI must fail when the lab tier did not run (a deselection, a collection error, a skip).
Pytest's own exit status cannot say that, so every run writes build/lab-tier.json with
the outcomes of tests marked ``lab``; .ci/run checks it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "build" / "lab-tier.json"
_outcomes: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "lab" not in report.keywords:
        return
    if report.when == "call" or report.outcome != "passed":
        _outcomes[report.outcome] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(dict(_outcomes)) + "\n")
