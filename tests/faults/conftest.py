"""The fault suite runs on one thread (the machines it runs on are small and shared; one thread also keeps the
bitwise comparisons independent of how many cores the machine has)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# Tests that find a gradguard bug still open on main (issue 13; each described in BENCHMARKS.md, "Fault
# injection"). Strict: a fix makes the test pass, and the suite then fails until its line is removed here.
_KNOWN = Path(__file__).with_name("known_bugs.txt")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    known = {line.strip() for line in _KNOWN.read_text().splitlines() if line.strip()}
    for item in items:
        if item.nodeid in known:
            item.add_marker(pytest.mark.xfail(strict=True, reason="open bug found by the fault suite (issue 13)"))
