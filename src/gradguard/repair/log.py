"""The bounded in-memory record of what gradguard did to a run (``guard.actions``).

A run that clips most steps (common with ``clip=1.0`` on language models) would otherwise grow this list by one
``Action`` per step for as long as the Guard lives: about 320 bytes a step, 300 MiB per million steps (measured in
BENCHMARKS.md, "Scale"). Clips are kept only for the most recent steps; the rarer repairs (skips, learning-rate
changes, rollbacks) are kept far longer. Every action still reaches the sinks (``events.jsonl``, TensorBoard, ...)
and is counted, so nothing is lost but the old in-memory copies.

Room: the repairer. It may touch: ``types``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque

from ..types import Action

KEEP_CLIPS = 256  # the most recent clipped steps kept in memory
KEEP_OTHER = 4096  # the most recent skips, learning-rate changes and rollbacks kept in memory


class ActionLog:
    """Actions in the order they happened: the last ``keep_clips`` clips and the last ``keep_other`` others,
    with a count of every action ever recorded, by kind."""

    def __init__(self, keep_clips: int = KEEP_CLIPS, keep_other: int = KEEP_OTHER) -> None:
        self._seq = itertools.count()
        self._clips: deque[tuple[int, Action]] = deque(maxlen=keep_clips)
        self._other: deque[tuple[int, Action]] = deque(maxlen=keep_other)
        self.counts: Counter[str] = Counter()

    def append(self, action: Action) -> None:
        (self._clips if action.kind == "clip" else self._other).append((next(self._seq), action))
        self.counts[action.kind] += 1

    def __len__(self) -> int:
        return len(self._clips) + len(self._other)

    def to_list(self) -> list[Action]:
        """The kept actions, oldest first (both queues are in order already: a merge, not a sort)."""
        return [a for _, a in heapq.merge(self._clips, self._other, key=lambda t: t[0])]
