"""The pass manager: runs a pipeline over a model, calling hooks before and after every pass.

Timing, size statistics and verification are hooks (``optimizer.hooks``), so the manager itself only
sequences passes, runs fixed-point groups, and rolls back a failing pass when asked to keep going.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import onnx

from optimizer.errors import PassError, VerificationError
from optimizer.events import Hook, PassEvent, PassRecord  # noqa: F401  (Hook, PassRecord: public here too)
from optimizer.graph import graph_to_model, import_graph
from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.pipeline import FixedPoint, Step, coerce_pipeline, format_pipeline

log = logging.getLogger(__name__)

VerifyMode = Literal["numeric", "structural", "off"]


@dataclass
class RunResult:
    """The optimized model, one record per pass run, and warnings worth reporting."""

    model: onnx.ModelProto
    records: list[PassRecord]
    pipeline: str
    warnings: list[str] = field(default_factory=list)
    verification: dict = field(default_factory=dict)  # samples, noise and rule (VerifyHook.info)

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.records if r.rolled_back]


class PassManager:
    """Run a pipeline of passes, verifying after each one.

    ``pipeline``: text (``"cleanup,fuse-conv-bn"``), a preset name, or a list of passes/text.
    ``verify``: ``numeric`` (ONNX Runtime before/after on the same inputs), ``structural`` (onnx
    checker with shape inference) or ``off``. A pass that fails verification or raises is rolled
    back and the pipeline goes on (the record says why); ``strict=True`` raises ``PassError``
    instead. ``keep_going`` is the older spelling of ``not strict``.
    ``lossy_finite_only``: hold lossy passes only to finite outputs (an accuracy budget judges them).
    """

    def __init__(
        self,
        pipeline: str | Step | list[Step | str] | None = "default",
        *,
        verify: VerifyMode = "numeric",
        strict: bool = False,
        keep_going: bool | None = None,
        hooks: list[Hook] | None = None,
        lossy_finite_only: bool = False,
    ):
        from optimizer.hooks import StatsHook, TimingHook, VerifyHook

        self.steps = coerce_pipeline(pipeline)
        self.verify = verify
        self.keep_going = (not strict) if keep_going is None else keep_going
        builtin: list[Hook] = [TimingHook(), StatsHook()]
        if verify != "off":
            builtin.append(VerifyHook(verify, lossy_finite_only))
        self.hooks = builtin + list(hooks or [])

    @property
    def pipeline_text(self) -> str:
        return format_pipeline(self.steps)

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> RunResult:
        """Run the pipeline on a copy of ``model``; the input proto is never modified."""
        ctx = ctx or PassContext()
        current = onnx.ModelProto()
        current.CopyFrom(model)
        if not ctx.opset:
            ctx.opset = next((o.version for o in current.opset_import if o.domain in ("", "ai.onnx")), 0)
        state = _RunState(current, [], [])
        from optimizer.runtime import input_specs

        self._original = current
        ctx.original_inputs = input_specs(current)
        for hook in self.hooks:
            hook.start(current, ctx)
            state.warnings.extend(getattr(hook, "warnings", []))
        self._run_steps(self.steps, state, ctx, iteration=0)
        verification: dict = {}
        for hook in self.hooks:
            for warning in getattr(hook, "warnings", []):
                if warning not in state.warnings:
                    state.warnings.append(warning)
            verification.update(getattr(hook, "info", {}))
        return RunResult(state.model, state.records, self.pipeline_text, state.warnings, verification)

    def _run_steps(self, steps: list[Step], state: _RunState, ctx: PassContext, iteration: int) -> bool:
        changed_any = False
        for step in steps:
            if isinstance(step, FixedPoint):
                for i in range(step.max_iterations):
                    if not self._run_steps(step.steps, state, ctx, iteration=i):
                        break
                    changed_any = True
                else:
                    state.warnings.append(
                        f"fixpoint({format_pipeline(step.steps)}) did not converge in {step.max_iterations} rounds"
                    )
            else:
                changed_any |= self._run_pass(step, state, ctx, iteration)
        return changed_any

    def _run_pass(self, p: Pass, state: _RunState, ctx: PassContext, iteration: int) -> bool:
        record = PassRecord(p.name, p.spec(), iteration)
        needed = type(p).requires_any_op
        skip = bool(needed) and not needed & state.op_types()  # nothing it could act on
        event = PassEvent(p, record, state.model, ctx, passes_before=tuple(dict.fromkeys(r.spec for r in state.records)))
        state.records.append(record)
        try:
            for hook in self.hooks:
                hook.before_pass(event)
            from optimizer.runtime import io_adapter

            ctx.feed_adapter = io_adapter(self._original, state.model)[0]
            if skip:  # no graph import: the pass could not match anything in this model
                graph, result = None, PassResult(False)
            else:
                graph = import_graph(state.model)
                result = p.run(graph, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"{type(p).__name__}.run must return a PassResult, got {type(result).__name__}")
            event.result = result
            record.changed = result.changed
            record.stats = dict(result.stats)
            record.details = dict(result.details)
            if result.changed:
                graph.cleanup(remove_unused_graph_inputs=False).toposort()
                event.after = graph_to_model(graph, state.model)
            for hook in self.hooks:
                hook.after_pass(event)
        except Exception as exc:
            record.error = _one_line(exc)
            if isinstance(exc, VerificationError):
                record.verification = "failed"
            before = ", ".join(event.passes_before) or "none"
            if self.keep_going:
                record.rolled_back = True
                record.changed = False
                log.info("pass '%s' failed and was rolled back: %s", p.name, record.error)
                state.warnings.append(f"pass '{p.spec()}' rolled back: {record.error}")
                return False
            message = f"pass '{p.spec()}' failed: {record.error} (passes before it: {before})"
            if isinstance(exc, VerificationError):
                error: PassError = VerificationError(message, p.name, event.passes_before, exc.output_name)
            else:
                error = PassError(message, p.name, event.passes_before)
            error.records = state.records
            raise error from exc
        for hook in self.hooks:
            hook.accepted(event)
        if event.after is not None:
            state.model = event.after
            return True
        return False


@dataclass
class _RunState:
    model: onnx.ModelProto
    records: list[PassRecord]
    warnings: list[str]
    _ops: tuple = (None, frozenset())

    def op_types(self) -> frozenset[str]:
        """Op types in the current model, subgraphs included (cached per model)."""
        if self._ops[0] is not self.model:
            from optimizer.stats import op_histogram

            self._ops = (self.model, frozenset(op_histogram(self.model)))
        return self._ops[1]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]
