"""Built-in pass-manager hooks: timing, size statistics, and verification after every pass."""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx

from calibration.sources import batch_len
from optimizer.errors import InputError, VerificationError
import optimizer.io as model_io
from optimizer.events import Hook, PassEvent
from optimizer.metrics import compare_batches, first_violation
from optimizer.pass_base import EXACT, PassContext, Tolerance
from optimizer.runtime import OrtRunner, input_specs, run_like
from optimizer.stats import model_stats

log = logging.getLogger(__name__)

#: Accepts any finite output of the right shape (lossy passes under an accuracy budget).
FINITE_ONLY = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=None, max_mismatch=0.0)


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

    Numeric verification runs the original model once in ONNX Runtime on the run's verification
    batches (``ctx.verify_batches``: the user's samples, or synthetic inputs at shapes under which
    the original runs) and compares every later model with those outputs. Lossless passes are
    judged against the model's own float noise on the same inputs (``optimizer.noise``; the
    ``EXACT`` tolerance), lossy passes by their scale-free tolerance. Checks the original model
    itself fails (a custom op ONNX Runtime lacks, an original that does not run at any shape we
    can find) are downgraded once, with a warning, instead of being blamed on a pass.
    """

    def __init__(self, mode: str = "numeric", lossy_finite_only: bool = False):
        self.mode = mode
        # With an accuracy budget, lossy passes are held to the budget instead of their tolerance;
        # verification then only demands finite outputs of the right shape from them.
        self.lossy_finite_only = lossy_finite_only
        self.warnings: list[str] = []
        self.info: dict = {}
        self.full_check = True
        self.structural = True
        self.numeric = mode == "numeric"
        self.batches: list[dict[str, np.ndarray]] = []
        self.reference: list[dict[str, np.ndarray]] = []  # the original model's outputs
        self.previous: list[dict[str, np.ndarray]] = []  # the last accepted model's outputs
        self.noise = None
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
            batches = ctx.verify_batches or ([ctx.reference_inputs] if ctx.reference_inputs is not None else [])
            if not batches:
                batches = [_runnable_synthetic(model, ctx, self.warnings)]
                ctx.verify_batches = batches  # passes that run the model themselves use runnable inputs
            self.original = model
            runner = OrtRunner(model)
            self.reference = [runner.run(b) for b in batches]
        except InputError as exc:
            self.numeric = False
            self.warnings.append(f"numeric verification unavailable, checking structure only: {exc}")
            return
        self.batches = batches
        self.previous = self.reference
        from optimizer.noise import estimate_noise

        self.noise = estimate_noise(model, batches, self.reference)
        samples = sum(batch_len(b) for b in batches)
        self.info = {
            "samples": samples,
            "batches": len(batches),
            "lossless_rule": f"|err| <= max({EXACT.atol:g} + {EXACT.rtol:g}*max|ref|, {EXACT.noise_multiple:g} x noise), "
            f"capped at {EXACT.ceiling_rel:g}*max|ref|",
            "noise": self.noise.to_dict(),
        }
        if self.noise.unstable:
            self.warnings.append(
                f"output(s) {', '.join(self.noise.unstable)} change shape under float noise (e.g. box counts after NMS); "
                "they are not compared element by element"
            )

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
        runner = OrtRunner(event.after)
        outputs = [run_like(self.original, event.after, runner, b) for b in self.batches]
        lossy = type(event.pass_).lossy
        tol = type(event.pass_).tolerance
        if self.lossy_finite_only and lossy:
            tol = FINITE_ONLY
        # Lossless passes must reproduce the original -- or, once a lossy pass has changed the
        # numerics, the previous model. A lossy pass is judged against the model it received, so a
        # later pass is never blamed for an earlier pass's loss.
        reference = self.previous if (lossy or self.lossy_applied) else self.reference
        unstable = set(self.noise.unstable) if self.noise else set()
        try:
            metrics = compare_batches(
                [{k: v for k, v in r.items() if k not in unstable} for r in reference],
                [{k: v for k, v in o.items() if k not in unstable} for o in outputs],
            )
        except ValueError as exc:
            raise VerificationError(str(exc)) from None
        record.outputs = metrics
        # The model's noise bounds what a lossless rewrite may change; lossy passes are scale-free.
        noise = self.noise.outputs if (self.noise and not lossy) else {}
        bad = first_violation(metrics, tol, noise)
        worst = max(metrics, key=lambda m: m.max_rel, default=None)
        against = "previous model" if reference is self.previous and reference is not self.reference else "original"
        record.verification_detail = f"numeric vs {against}: {worst.name}: {worst.describe()}" if worst else "numeric"
        if bad is not None:
            raise VerificationError(
                f"output '{bad.name}' diverges from the {against}: {bad.describe()} ({_allowed(bad, tol, noise.get(bad.name))})",
                output_name=bad.name,
            )
        self._pending = (outputs, lossy)
        record.verification = "passed"

    def accepted(self, event: PassEvent) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and event.after is not None:
            self.previous, lossy = pending
            self.lossy_applied |= lossy


def _allowed(m, tol: Tolerance, noise) -> str:
    """What ``tol`` allowed output ``m``, in words."""
    parts = []
    if m.cosine is None or m.mismatch > m.allowed_mismatch(tol, noise):
        parts.append(f"mismatch <= {m.allowed_mismatch(tol, noise):.2%}")
    if m.cosine is not None:
        if tol.absolute:
            text = f"abs err <= {m.allowed_abs(tol, noise):.3g}"
            if tol.noise_multiple is not None:
                noise_abs = noise.max_abs if noise is not None else 0.0
                text += (f" = max({tol.atol:g} + {tol.rtol:g}*max|ref|, {tol.noise_multiple:g} x float noise {noise_abs:.3g})"
                         f" capped at {tol.ceiling_rel:g}*max|ref| {m.max_ref:.3g}")
            parts.append(text)
        if tol.min_cosine is not None:
            parts.append(f"cosine >= {tol.min_cosine}")
    return "allowed: " + ", ".join(parts or ["finite outputs"])


def _runnable_synthetic(model: onnx.ModelProto, ctx: PassContext, warnings: list[str]) -> dict[str, np.ndarray]:
    """Synthetic inputs at shapes under which ``model`` runs (``calibration.shapes``), for a
    ``PassManager`` used without the ``optimize`` driver's sample plan."""
    from calibration.data import ShapeSpec, synthetic_inputs
    from calibration.shapes import runnable_shapes

    plan = runnable_shapes(model, {n: ShapeSpec(tuple(s)) for n, s in (ctx.input_shapes or {}).items()})
    if not plan.runs:
        raise InputError(f"the original model does not run on synthetic inputs ({plan.failure}); give {plan.hint()}")
    warnings.extend(plan.warnings)
    return synthetic_inputs(input_specs(model), plan.shapes)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
