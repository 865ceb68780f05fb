"""What the pass manager hands its hooks: one ``PassRecord`` per pass run, the ``PassEvent`` around
it, and the ``Hook`` interface (timing, statistics and verification are hooks: ``optimizer.hooks``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import onnx

from optimizer.metrics import OutputMetrics
from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.stats import ModelStats


#: How a refused site's reason is named in a record's stats: ``skipped_<reason>``.
SKIPPED_PREFIX = "skipped_"


def skip_key(reason: str) -> str:
    """The stat that counts sites refused for ``reason`` (words joined by ``_``)."""
    return SKIPPED_PREFIX + "_".join(reason.split())


def skip_reasons(stats: dict) -> dict[str, int]:
    """``{reason: sites}`` from a record's stats (the inverse of ``skip_key``), nonzero counts only."""
    return {k[len(SKIPPED_PREFIX):]: v for k, v in stats.items() if k.startswith(SKIPPED_PREFIX) and v}


@dataclass
class PassRecord:
    """What happened in one run of one pass (one entry per fixed-point iteration)."""

    name: str
    spec: str
    iteration: int = 0
    changed: bool = False
    stats: dict[str, int | float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    time_s: float = 0.0
    before: ModelStats | None = None
    after: ModelStats | None = None
    verification: str = "off"  # passed | failed | skipped | off | unchanged
    verification_detail: str = ""
    outputs: list[OutputMetrics] = field(default_factory=list)
    rolled_back: bool = False
    error: str = ""

    def take(self, result: PassResult) -> None:
        """Record what the pass returned; its skipped sites become ``skipped_<reason>`` stats."""
        self.changed = result.changed
        self.stats = dict(result.stats)
        self.stats.update((skip_key(reason), n) for reason, n in sorted(result.skipped.items()))
        self.details = dict(result.details)


@dataclass
class PassEvent:
    """Handed to hooks. ``after`` is None before the pass and when the pass changed nothing."""

    pass_: Pass
    record: PassRecord
    before: onnx.ModelProto
    ctx: PassContext
    after: onnx.ModelProto | None = None
    result: PassResult | None = None
    passes_before: tuple[str, ...] = ()


class Hook:
    """Instrumentation around each pass. Raising from ``after_pass`` fails the pass."""

    def start(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        """Called once with the original model before the pipeline runs."""

    def before_pass(self, event: PassEvent) -> None:
        """Called before ``event.pass_`` runs."""

    def after_pass(self, event: PassEvent) -> None:
        """Called after the pass ran and the graph was cleaned up, sorted and exported."""

    def accepted(self, event: PassEvent) -> None:
        """Called once every hook's ``after_pass`` succeeded: the pass's model is now current."""


class StageTimes:
    """Seconds spent per stage of a run (graph import/export, checker, sessions, runs, passes...),
    summed over the run: where verification's cost goes (``RunResult.timing``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextmanager
    def measure(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.counts[stage] = self.counts.get(stage, 0) + count

    def to_dict(self) -> dict:
        """``{stage: {"s": seconds, "calls": n}}``, largest first."""
        order = sorted(self.seconds, key=self.seconds.get, reverse=True)
        return {k: {"s": round(self.seconds[k], 4), "calls": self.counts[k]} for k in order}
