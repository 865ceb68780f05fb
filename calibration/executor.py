"""Where independent work runs: a tiny executor interface the core owns (in-process by default).

Expensive, independent work -- calibration shards, search candidates, evaluation shards, whole
models of a fleet -- is written as ``executor.map(fn, items, stage=...)``: ``fn`` is a module-level
function, ``items`` a list of argument tuples, and the results come back in the order of
``items``. ``InProcessExecutor`` (the default) calls ``fn`` here, one item after the other;
``optimizer.ray_executor.RayExecutor`` runs one Ray task per item. Nothing below the driver imports
Ray: the driver picks the executor and puts it in the run's ``PassContext.executor``; passes hand
it to calibration as an argument. Tasks never fan out again (they run with no executor). Results
are identical either way, because every task's result is merged exactly (``TensorStats.merge``,
``optimizer.evaluate.Tally.merge``) and sequential searches keep their path
(``optimizer.speculative``).

``share(obj)`` hands a large input (a serialized model, reference outputs) to every task once: the
object itself in-process, an object-store reference on Ray (resolved before ``fn`` runs when it is
a top-level argument). Every ``map`` appends a ``StageRecord`` (tasks, wall time, summed task time)
to ``executor.stages``; the report shows them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

#: Samples read (and statistics folded in) at a time by calibration when nobody asks otherwise.
DEFAULT_CALIB_BATCH_SIZE = 16


@dataclass
class StageRecord:
    """One ``map`` call: ``tasks`` run, ``wall_s`` for all of them, ``task_s`` summed over tasks
    (measured inside each task, so ``wall_s - task_s / workers`` is the scheduling overhead)."""

    stage: str
    tasks: int
    wall_s: float
    task_s: float

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@runtime_checkable
class Executor(Protocol):
    """Runs ``fn(*item)`` for every item; ``workers`` is how many run at once."""

    name: str
    workers: int
    stages: list[StageRecord]

    def map(self, fn: Callable[..., Any], items: Sequence[tuple], *, stage: str) -> list: ...

    def share(self, obj: Any) -> Any: ...


def timed_call(fn: Callable[..., Any], *args) -> tuple[Any, float]:
    """``(fn(*args), seconds)``: what every executor runs per task, so task time is measured alike."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


@dataclass
class InProcessExecutor:
    """The default: every task runs here, one after the other."""

    name: str = "in-process"
    workers: int = 1
    stages: list[StageRecord] = field(default_factory=list)

    def map(self, fn: Callable[..., Any], items: Sequence[tuple], *, stage: str) -> list:
        start = time.perf_counter()
        results, task_s = [], 0.0
        for item in items:
            result, seconds = timed_call(fn, *item)
            results.append(result)
            task_s += seconds
        self.stages.append(StageRecord(stage, len(items), time.perf_counter() - start, task_s))
        return results

    def share(self, obj: Any) -> Any:
        return obj

    def describe(self) -> dict:
        """The report's ``executor``: name, workers, and per stage tasks and times."""
        return {"name": self.name, "workers": self.workers, "stages": [s.to_dict() for s in self.stages]}


def fans_out(executor: Executor | None) -> bool:
    """Whether work should be split into tasks on ``executor``: any real executor (Ray, even with
    one worker), and in-process only when asked to (``workers > 1``, as tests do)."""
    return executor is not None and (executor.workers > 1 or not isinstance(executor, InProcessExecutor))


def check_calib_batch_size(value) -> int:
    """``value`` (None: ``DEFAULT_CALIB_BATCH_SIZE``) if it is a positive integer, else ``InputError``."""
    from optimizer.errors import InputError

    if value is None:
        return DEFAULT_CALIB_BATCH_SIZE
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"calib_batch_size must be a positive integer, got {value!r}")
    return value


__all__ = ["DEFAULT_CALIB_BATCH_SIZE", "Executor", "InProcessExecutor", "StageRecord", "check_calib_batch_size",
           "fans_out", "timed_call"]
