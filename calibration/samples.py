"""The one data path of a run: which samples verify each pass, evaluate the result, and calibrate.

Every consumer reads ``CalibrationSource`` objects (``calibration.sources``), batch by batch. The
rule, stated once:

* ``--data D`` given: per-pass verification on the first ``VERIFY_SAMPLES`` samples of D, the
  final evaluation on all of D; calibration on ``--calib`` when given, else on D (with a warning:
  accuracy is then measured on the calibration samples).
* only ``--calib C`` (N samples): when N >= ``HOLDOUT_MIN``, the last ``min(EVAL_SAMPLES, N // 4)``
  samples are held out of the statistics and evaluate the result (verification on the first
  ``VERIFY_SAMPLES`` of them); with fewer samples nothing is held out and the first
  ``min(EVAL_SAMPLES, N)`` samples of C evaluate (the report says they were also calibrated on).
* neither: synthetic inputs at the resolved shapes, and the report says so loudly.

A model whose first dim is static (e.g. batch 1) is fed exactly that many samples per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from calibration.shapes import ShapePlan
from calibration.sources import CalibrationSource, Feeds, SyntheticSource, batch_len, effective_batch_size
from optimizer.runtime import InputSpec

VERIFY_SAMPLES = 8
EVAL_SAMPLES = 64
#: Samples that score candidates in searches (``method=auto``): the first of the evaluation set,
#: at most this many and at most ``SCORE_BYTES`` of inputs.
SCORE_SAMPLES = 64
SCORE_BYTES = 256 << 20
HOLDOUT_MIN = 32
SYNTHETIC_EVAL_SAMPLES = 8


def labelled_batches(source, specs: list[InputSpec], batch_size: int) -> Iterator[tuple[Feeds, np.ndarray | None]]:
    """``(feeds, labels or None)`` batches of any source (only labelled sources have labels)."""
    labelled = getattr(source, "labelled_batches", None)
    if callable(labelled):
        yield from labelled(specs, batch_size)
    else:
        for feeds in source.batches(specs, batch_size):
            yield feeds, None


@dataclass
class SliceSource:
    """Samples ``[start, stop)`` of another source, streamed in the same batch size."""

    source: CalibrationSource
    start: int
    stop: int
    label: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def synthetic(self) -> bool:
        return self.source.synthetic

    @property
    def description(self) -> str:
        return f"{self.source.description} [samples {self.start}..{self.stop - 1}]"

    @property
    def num_samples(self) -> int:
        return max(0, min(self.stop, self.source.num_samples) - self.start)

    def labelled_batches(self, specs: list[InputSpec], batch_size: int):
        index = 0
        for feeds, labels in labelled_batches(self.source, specs, batch_size):
            n = batch_len(feeds)
            lo, hi = max(self.start - index, 0), min(self.stop - index, n)
            index += n
            if hi > lo:
                yield {k: v[lo:hi] for k, v in feeds.items()}, (labels[lo:hi] if labels is not None else None)
            if index >= self.stop:
                break

    def batches(self, specs: list[InputSpec], batch_size: int):
        for feeds, _ in self.labelled_batches(specs, batch_size):
            yield feeds


@dataclass
class RunSamples:
    """The samples of one run: verification batches, the evaluation source, the calibration source."""

    verify: list[Feeds]
    evaluation: CalibrationSource
    calibration: CalibrationSource
    origin: str  # "data" | "calib" | "synthetic"
    held_out: int = 0
    note: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def synthetic(self) -> bool:
        return self.origin == "synthetic"

    @property
    def verify_samples(self) -> int:
        return sum(batch_len(b) for b in self.verify)

    def score_batches(self, specs: list[InputSpec], batch_size: int) -> list[Feeds]:
        """Batches for scoring search candidates: the first ``SCORE_SAMPLES`` evaluation samples
        (within ``SCORE_BYTES``); the verification batches when the evaluation set is synthetic."""
        if self.synthetic:
            return list(self.verify)
        batches, total = [], 0
        for feeds in SliceSource(self.evaluation, 0, SCORE_SAMPLES).batches(specs, batch_size):
            total += sum(v.nbytes for v in feeds.values())
            if batches and total > SCORE_BYTES:
                break
            batches.append(feeds)
        return batches

    def to_dict(self, calibrates: bool = True) -> dict:
        """JSON for the report; ``calibrates``: whether any pass read the calibration samples."""
        calibration = {"source": self.calibration.description, "samples": self.calibration.num_samples,
                       "synthetic": bool(self.calibration.synthetic)} if calibrates else None
        return {
            "origin": self.origin,
            "verification": {"samples": self.verify_samples, "batches": len(self.verify)},
            "evaluation": {"source": self.evaluation.description, "samples": self.evaluation.num_samples},
            "calibration": calibration,
            "held_out": self.held_out,
            "note": self.note,
        }


def plan_samples(
    specs: list[InputSpec],
    shapes: ShapePlan,
    *,
    data: CalibrationSource | None = None,
    calib: CalibrationSource | None = None,
    batch_size: int = VERIFY_SAMPLES,
) -> RunSamples:
    """Apply the module's rule. ``batch_size`` is how many samples one verification batch holds
    (1 when the original model only runs one sample at a time)."""
    size = effective_batch_size(specs, batch_size)
    if data is not None:
        run = RunSamples([], data, calib if calib is not None else data, "data")
        run.note = "--data"
        if calib is None:
            run.warnings.append(
                f"no --calib: calibration (where the pipeline needs it) uses --data ({data.description}); "
                "accuracy is then measured on the samples the ranges came from"
            )
        verify_from: CalibrationSource = data
    elif calib is not None:
        n = calib.num_samples
        if n >= HOLDOUT_MIN:
            k = min(EVAL_SAMPLES, n // 4)
            evaluation = SliceSource(calib, n - k, n, "held out of calibration")
            statistics = SliceSource(calib, 0, n - k, "calibration")
            run = RunSamples([], evaluation, statistics, "calib", held_out=k)
            run.note = f"{k} of {n} --calib samples held out of the statistics (the last {k})"
        else:
            m = min(EVAL_SAMPLES, n)
            evaluation = SliceSource(calib, 0, m, "also used for calibration")
            run = RunSamples([], evaluation, calib, "calib")
            run.note = (f"the first {m} of {n} --calib samples, which also calibrate (fewer than {HOLDOUT_MIN}: "
                        "none held out)")
        verify_from = run.evaluation
    else:
        synthetic = SyntheticSource(SYNTHETIC_EVAL_SAMPLES, shapes=dict(shapes.shapes), seed=1)
        calibration = SyntheticSource(shapes=dict(shapes.shapes), seed=0)
        run = RunSamples([], synthetic, calibration, "synthetic")
        run.note = "SYNTHETIC inputs (uniform random at the resolved shapes): not a measure of real accuracy"
        # One batch at exactly the resolved shapes (the original was shown to run at them).
        run.verify = [_synthetic_batch(specs, shapes)]
        return run
    verify = SliceSource(verify_from, 0, VERIFY_SAMPLES)
    run.verify = list(verify.batches(specs, size))
    return run


def _synthetic_batch(specs: list[InputSpec], shapes: ShapePlan) -> Feeds:
    from calibration.data import synthetic_inputs

    return synthetic_inputs(specs, shapes.shapes, seed=0)


@dataclass
class Prepared:
    """What ``prepare`` resolved: the shape plan, the run's samples, and the batch size the original runs at."""

    shapes: ShapePlan
    samples: RunSamples | None  # None when the original model does not run (numeric checks impossible)
    batch_size: int = VERIFY_SAMPLES
    loadable: bool = True


def prepare(
    model,
    specs: list[InputSpec],
    given: dict | None = None,
    *,
    data=None,
    calib=None,
    sessions=None,
) -> Prepared:
    """Open ``data``/``calib``, resolve shapes once (running the original to prove they work) and
    plan the samples. Raises ``InputError`` when the original model does not run on the user's own
    data or ``--shapes``; when it runs at no default shape, ``samples`` is None (say so, verify
    structurally). ``sessions`` (``optimizer.runtime.Sessions``): where the original's session and
    the outputs of these trial runs are kept for the run's later stages."""
    from calibration.data import synthetic_inputs
    from calibration.shapes import observed_shapes, resolve_shapes
    from calibration.sources import open_source
    from optimizer.errors import InputError
    from optimizer.runtime import RuntimeFailure, Sessions

    data_source = open_source(data, specs) if data is not None else None
    calib_source = open_source(calib, specs) if calib is not None else None
    real = data_source or calib_source
    where = "--data" if data_source is not None else "--calib"
    size = effective_batch_size(specs, VERIFY_SAMPLES)
    first = next(iter(real.batches(specs, size)), None) if real is not None else None
    if real is not None and first is None:
        raise InputError(f"{real.description}: holds no samples")
    sessions = sessions if sessions is not None else Sessions()
    try:
        sessions.runner(model)
    except RuntimeFailure as exc:  # e.g. a custom op ONNX Runtime lacks: shapes cannot be tested
        plan = resolve_shapes(model, specs, given, observed_shapes(first, where))
        plan.runs, plan.failure = False, str(exc)
        return Prepared(plan, None, size, loadable=False)

    def try_run(shapes: dict[str, tuple[int, ...]], batch: dict | None = first) -> str | None:
        feeds = dict(batch or {})
        missing = [s for s in specs if s.name not in feeds]
        feeds.update(synthetic_inputs(missing, shapes))
        try:
            sessions.run(model, feeds, keep=True)
        except InputError as exc:
            return str(exc)
        return None

    observed = observed_shapes(first, where)
    plan = resolve_shapes(model, specs, given, observed, try_run)
    if not plan.runs and first is not None and size > 1 and batch_len(first) > 1:
        single = {k: v[:1] for k, v in first.items()}
        retry = resolve_shapes(model, specs, given, observed_shapes(single, where), lambda s: try_run(s, single))
        if retry.runs:
            plan, size = retry, 1
    if not plan.runs:
        if real is not None or given:
            what = f"the first samples of {real.description}" if real is not None else "the given --shapes"
            raise InputError(f"the original model does not run on {what}: {plan.failure}")
        return Prepared(plan, None, size)
    samples = plan_samples(specs, plan, data=data_source, calib=calib_source, batch_size=size)
    return Prepared(plan, samples, size)
