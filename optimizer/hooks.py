"""Built-in pass-manager hooks: timing, size statistics, and verification after every pass."""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx

from optimizer.errors import InputError, VerificationError
import optimizer.io as model_io
from optimizer.manager import Hook, PassEvent
from optimizer.metrics import compare_outputs, first_violation
from optimizer.pass_base import PassContext, Tolerance

#: Accepts any finite output of the right shape (lossy passes under an accuracy budget).
FINITE_ONLY = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=None, max_mismatch=0.0)
from optimizer.runtime import OrtRunner, input_specs, run_like
from optimizer.stats import model_stats

log = logging.getLogger(__name__)


class TimingHook(Hook):
    """Wall time of each pass (the pass itself plus cleanup and export)."""

    def before_pass(self, event: PassEvent) -> None:
        event.record.time_s = time.perf_counter()

    def after_pass(self, event: PassEvent) -> None:
        event.record.time_s = time.perf_counter() - event.record.time_s


class StatsHook(Hook):
    """Node, initializer, parameter and byte counts before and after each pass."""

    def __init__(self):
        self._cache: tuple[int, object] | None = None

    def _stats(self, model: onnx.ModelProto):
        if self._cache is not None and self._cache[0] is model:
            return self._cache[1]
        stats = model_stats(model)
        self._cache = (model, stats)
        return stats

    def before_pass(self, event: PassEvent) -> None:
        event.record.before = self._stats(event.before)

    def after_pass(self, event: PassEvent) -> None:
        event.record.after = self._stats(event.after) if event.after is not None else event.record.before


def check_structure(model: onnx.ModelProto, full: bool = True) -> None:
    """onnx's checker (with strict shape inference when ``full``); raises onnx's ValidationError."""
    if model_io.weights_nbytes(model) > model_io.EXTERNAL_DATA_THRESHOLD:
        with model_io.model_on_disk(model) as path:
            onnx.checker.check_model(str(path), full_check=full)
    else:
        onnx.checker.check_model(model, full_check=full)


class VerifyHook(Hook):
    """Prove each pass kept the model valid (``structural``) and computing the same (``numeric``).

    Numeric verification runs the original model once in ONNX Runtime on ``ctx.reference_inputs``
    (synthetic inputs if none were given) and compares every later model with those outputs, using
    the pass's tolerance: equality up to float rounding for lossless passes. Checks the original
    model itself fails (a custom op ONNX Runtime lacks, an invalid original) are downgraded once,
    with a warning, instead of being blamed on a pass.
    """

    def __init__(self, mode: str = "numeric", lossy_finite_only: bool = False):
        self.mode = mode
        # With an accuracy budget, lossy passes are held to the budget instead of their tolerance;
        # verification then only demands finite outputs of the right shape from them.
        self.lossy_finite_only = lossy_finite_only
        self.warnings: list[str] = []
        self.full_check = True
        self.structural = True
        self.numeric = mode == "numeric"
        self.inputs: dict[str, np.ndarray] = {}
        self.reference: dict[str, np.ndarray] = {}  # the original model's outputs
        self.previous: dict[str, np.ndarray] = {}  # the last accepted model's outputs
        self.lossy_applied = False
        self._pending = None

    def start(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        self.lossy_applied, self._pending = False, None
        try:
            check_structure(model, full=True)
        except Exception as exc:
            try:
                check_structure(model, full=False)
                self.full_check = False
                self.warnings.append(f"original model fails strict shape inference ({_short(exc)}); checking without it")
            except Exception as exc2:
                self.structural = False
                self.warnings.append(f"original model fails the onnx checker ({_short(exc2)}); structural check skipped")
        if not self.numeric:
            return
        try:
            if ctx.reference_inputs is None:
                from calibration.data import synthetic_inputs

                specs = input_specs(model)
                ctx.reference_inputs = synthetic_inputs(specs, ctx.input_shapes, warnings=self.warnings)
            self.inputs = ctx.reference_inputs
            self.original = model
            self.reference = OrtRunner(model).run(self.inputs)
            self.previous = self.reference
        except InputError as exc:
            self.numeric = False
            self.warnings.append(f"numeric verification unavailable: {exc}")

    def after_pass(self, event: PassEvent) -> None:
        record = event.record
        if event.after is None:
            record.verification = "unchanged"
            return
        if self.structural:
            try:
                check_structure(event.after, full=self.full_check)
            except Exception as exc:
                raise VerificationError(f"the model is no longer valid: {_short(exc)}") from None
        if not self.numeric:
            record.verification = "passed" if self.structural else "skipped"
            record.verification_detail = "structural"
            return
        outputs = run_like(self.original, event.after, OrtRunner(event.after), self.inputs)
        lossy = type(event.pass_).lossy
        tol = type(event.pass_).tolerance
        if self.lossy_finite_only and lossy:
            tol = FINITE_ONLY
        # Lossless passes must reproduce the original exactly -- or, once a lossy pass has changed
        # the numerics, the previous model exactly. A lossy pass is judged against the model it
        # received, so a later pass is never blamed for an earlier pass's loss.
        reference = self.previous if (lossy or self.lossy_applied) else self.reference
        try:
            metrics = compare_outputs(reference, outputs)
        except ValueError as exc:
            raise VerificationError(str(exc)) from None
        record.outputs = metrics
        bad = first_violation(metrics, tol)
        worst = max(metrics, key=lambda m: m.max_rel, default=None)
        against = "previous model" if reference is self.previous and reference is not self.reference else "original"
        record.verification_detail = f"numeric vs {against}: {worst.name}: {worst.describe()}" if worst else "numeric"
        if bad is not None:
            raise VerificationError(
                f"output '{bad.name}' diverges from the {against}: {bad.describe()} "
                f"(allowed: abs err <= {tol.atol:g} + {tol.rtol:g} * max|ref| = {tol.atol + tol.rtol * bad.max_ref:.3g}"
                + (f", cosine >= {tol.min_cosine}" if tol.min_cosine is not None else "")
                + ")",
                output_name=bad.name,
            )
        self._pending = (outputs, lossy)
        record.verification = "passed"

    def accepted(self, event: PassEvent) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and event.after is not None:
            self.previous, lossy = pending
            self.lossy_applied |= lossy


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
