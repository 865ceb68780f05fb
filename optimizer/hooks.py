"""Built-in pass-manager hooks: timing, size statistics, and verification after every pass."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from calibration.sources import batch_len
from optimizer.errors import InputError, VerificationError
import optimizer.io as model_io
from optimizer.events import Hook, PassEvent, StageTimes
from optimizer.metrics import compare_batches, first_violation
from optimizer.pass_base import EXACT, PassContext, Tolerance
from optimizer.runtime import Sessions, input_specs
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


def check_structure(model: onnx.ModelProto, full: bool = True, runtime_loads: bool = False) -> None:
    """onnx's checker (with strict shape inference when ``full``); raises onnx's ValidationError.

    ``runtime_loads``: ONNX Runtime loads this very model next (numeric verification), which checks
    the weights' data; the checker then sees the graph with its large initializers as typed inputs
    (``passes.inference_model.without_weights``) instead of serializing every weight once more.
    """
    if runtime_loads:
        from passes.inference_model import without_weights

        model = without_weights(model)
    if model_io.weights_nbytes(model) > model_io.EXTERNAL_DATA_THRESHOLD:
        with model_io.model_on_disk(model) as path:
            onnx.checker.check_model(str(path), full_check=full)
    else:
        onnx.checker.check_model(model, full_check=full)


@dataclass
class Verdict:
    """What ``VerifyHook.verify_model`` found: status, a one-line detail, per-output metrics, and
    the candidate's outputs (None for a structural check)."""

    status: str
    detail: str
    metrics: list = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] | None = None


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

    def __init__(self, mode: str = "numeric", lossy_finite_only: bool = False, lazy_noise: bool = False):
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
        self.sessions: Sessions | None = None  # set by ``start`` (the run's, or its own)
        self.lossy_applied = False
        self._pending = None
        self.lazy_noise = lazy_noise
        self.stages = StageTimes()  # the manager hands its own in, to report where the time went

    def start(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        self.lossy_applied, self._pending = False, None
        stages = self.stages
        try:
            with stages.measure("checker"):
                check_structure(model, full=True, runtime_loads=self.numeric)
        except Exception as exc:
            try:
                with stages.measure("checker"):
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
            self.sessions = ctx.sessions if ctx.sessions is not None else Sessions()
            with stages.measure("sessions"):
                self.sessions.runner(model)
            with stages.measure("runs"):
                self.reference = [self.sessions.run(model, b, keep=True) for b in batches]
        except InputError as exc:
            self.numeric = False
            self.warnings.append(f"numeric verification unavailable, checking structure only: {exc}")
            return
        self.batches = batches
        self.previous = self.reference
        samples = sum(batch_len(b) for b in batches)
        self.info = {
            "samples": samples,
            "batches": len(batches),
            "lossless_rule": f"|err| <= max({EXACT.atol:g} + {EXACT.rtol:g}*max|ref|, {EXACT.noise_multiple:g} x noise), "
            f"capped at {EXACT.ceiling_rel:g}*max|ref|",
            "noise": {"measured": False, "why": "every check passed within the bound without noise"},
        }
        if not self.lazy_noise:
            self._measure_noise()

    def _measure_noise(self) -> None:
        """The original's float noise on the verification batches (``optimizer.noise``): two more
        sessions and runs of the original. Lazily, on the first check the zero-noise bound fails --
        the bound only grows with noise, so a check that passes without it passes with it."""
        from optimizer.noise import estimate_noise

        with self.stages.measure("noise"):
            self.noise = estimate_noise(self.original, self.batches, self.reference, self.sessions.runner(self.original))
        self.info["noise"] = self.noise.to_dict()
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
        cls = type(event.pass_)
        try:
            verdict = self.verify_model(event.after, cls.lossy, cls.tolerance)
        except VerificationError as exc:
            record.outputs, record.verification_detail = exc.metrics, exc.detail
            raise
        record.verification, record.verification_detail = verdict.status, verdict.detail
        record.outputs = verdict.metrics
        self._pending = (verdict.outputs, cls.lossy) if verdict.outputs is not None else None

    def verify_model(self, model: onnx.ModelProto, lossy: bool = False, tolerance: Tolerance = EXACT) -> Verdict:
        """Check ``model`` (structure, then outputs against the original or, after a lossy pass,
        the previous model); raise ``VerificationError`` when it fails. Nothing is accepted yet:
        ``commit`` makes the checked model the new "previous" one."""
        stages = self.stages
        if self.structural:
            try:
                with stages.measure("checker"):
                    check_structure(model, full=self.full_check, runtime_loads=self.numeric)
            except Exception as exc:
                raise VerificationError(f"the model is no longer valid: {_short(exc)}") from None
        if not self.numeric:
            return Verdict("passed" if self.structural else "skipped", "structural")
        with stages.measure("sessions"):
            self.sessions.runner(model)
        with stages.measure("runs"):
            outputs = [self.sessions.run_like(self.original, model, b, keep=True) for b in self.batches]
        try:
            return self._judge(outputs, lossy, tolerance)
        except VerificationError:
            if self.noise is not None:
                raise
            self._measure_noise()  # the zero-noise bound failed: judge again with the real one
            return self._judge(outputs, lossy, tolerance)

    def _judge(self, outputs: list[dict[str, np.ndarray]], lossy: bool, tolerance: Tolerance) -> Verdict:
        stages = self.stages
        tol = FINITE_ONLY if (self.lossy_finite_only and lossy) else tolerance
        # Lossless passes must reproduce the original -- or, once a lossy pass has changed the
        # numerics, the previous model. A lossy pass is judged against the model it received, so a
        # later pass is never blamed for an earlier pass's loss.
        reference = self.previous if (lossy or self.lossy_applied) else self.reference
        unstable = set(self.noise.unstable) if self.noise else set()
        try:
            with stages.measure("compare"):
                metrics = compare_batches(
                    [{k: v for k, v in r.items() if k not in unstable} for r in reference],
                    [{k: v for k, v in o.items() if k not in unstable} for o in outputs],
                )
        except ValueError as exc:
            raise VerificationError(str(exc)) from None
        # The model's noise bounds what a lossless rewrite may change; lossy passes are scale-free.
        noise = self.noise.outputs if (self.noise and not lossy) else {}
        bad = first_violation(metrics, tol, noise)
        worst = max(metrics, key=lambda m: m.max_rel, default=None)
        against = "previous model" if reference is self.previous and reference is not self.reference else "original"
        detail = f"numeric vs {against}: {worst.name}: {worst.describe()}" if worst else "numeric"
        if bad is not None:
            error = VerificationError(
                f"output '{bad.name}' diverges from the {against}: {bad.describe()} ({_allowed(bad, tol, noise.get(bad.name))})",
                output_name=bad.name, metrics=metrics, detail=detail,
            )
            raise error
        return Verdict("passed", detail, metrics, outputs)

    def commit(self, verdict: Verdict, lossy: bool = False) -> None:
        """``verdict``'s model is now the current one (its outputs are the new "previous")."""
        if verdict.outputs is not None:
            self.previous = verdict.outputs
            self.lossy_applied |= lossy

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
