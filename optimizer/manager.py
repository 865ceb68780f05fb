"""The pass manager: runs a pipeline over a model, calling hooks before and after every pass.

Timing, size statistics and verification are hooks (``optimizer.hooks``), so the manager itself only
sequences passes, runs fixed-point groups, and rolls back a failing pass when asked to keep going.

Batched verification (the default): a run of consecutive lossless passes (a whole fixed point
included) shares one onnx-graphsurgeon graph -- no export and re-import between passes -- and is
verified once, after the group. Only when that check fails, or a pass in it raises, is the group
replayed from the model it started on with every pass verified on its own: the failing pass is
named and is the only one rolled back, exactly as without batching. ``batch=False`` verifies every
pass on its own from the start. Custom hooks see every pass's model, so they turn batching off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import onnx
import onnx_graphsurgeon as gs

from optimizer.errors import PassError, VerificationError
from optimizer.events import Hook, PassEvent, PassRecord, StageTimes  # noqa: F401  (Hook, PassRecord: public here too)
from optimizer.graph import graph_to_model, import_graph, metadata_props
from optimizer.pass_base import EXACT, Pass, PassContext, PassResult
from optimizer.stats import ModelStats
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
    timing: dict = field(default_factory=dict)  # seconds and calls per stage (StageTimes.to_dict), plus replays
    stats: ModelStats | None = None  # ``model``'s statistics when the run counted them (else None)

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
    ``batch``: verify runs of lossless passes once per group, replaying the group pass by pass only
    when that check fails (module docstring); the default.
    ``lazy_noise``: measure the original's float noise only when a check fails the bound without
    it (the same verdicts: the bound only grows with noise); the report then has noise numbers
    only if one was needed.
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
        batch: bool = True,
        lazy_noise: bool = False,
    ):
        from optimizer.hooks import StatsHook, TimingHook, VerifyHook

        self.steps = coerce_pipeline(pipeline)
        self.verify = verify
        self.keep_going = (not strict) if keep_going is None else keep_going
        builtin: list[Hook] = [TimingHook(), StatsHook()]
        if verify != "off":
            builtin.append(VerifyHook(verify, lossy_finite_only, lazy_noise))
        self.hooks = builtin + list(hooks or [])
        self.batch = batch and not hooks  # a custom hook is promised every pass's model
        self.stages = StageTimes()
        for hook in builtin:
            hook.stages = self.stages

    @property
    def pipeline_text(self) -> str:
        return format_pipeline(self.steps)

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None, stats: ModelStats | None = None) -> RunResult:
        """Run the pipeline on a copy of ``model``; the input proto is never modified. ``stats``:
        ``model_stats(model)``, if the caller counted it already."""
        ctx = ctx or PassContext()
        current = onnx.ModelProto()
        current.CopyFrom(model)
        if not ctx.opset:
            ctx.opset = next((o.version for o in current.opset_import if o.domain in ("", "ai.onnx")), 0)
        state = _RunState(current, [], [])
        if stats is not None:
            state.remember_stats(current, stats)
        from optimizer.runtime import input_specs

        self.stages = StageTimes()
        self.replays = []
        for hook in self.hooks:
            if hasattr(hook, "stages"):
                hook.stages = self.stages

        self._original = current
        if ctx.sessions is not None:
            ctx.sessions.alias(current, model)  # the copy runs in the session of the model it copies
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
        timing = {"stages": self.stages.to_dict(), "replayed_groups": list(self.replays),
                  "batched": self.batch}
        return RunResult(state.model, state.records, self.pipeline_text, state.warnings, verification, timing,
                         state.known_stats(state.model))

    def _run_steps(self, steps: list[Step], state: _RunState, ctx: PassContext, iteration: int,
                   top: bool = True) -> bool:
        changed_any = False
        group: list[Step] = []
        for step in list(steps) + [None]:
            if top and self.batch and step is not None and _batchable(step):
                group.append(step)
                continue
            if group:
                changed_any |= self._run_group(group, state, ctx)
                group = []
            if step is None:
                break
            if isinstance(step, FixedPoint):
                changed_any |= _fixpoint(step, state, lambda i: self._run_steps(step.steps, state, ctx, i, top=False))
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
            ctx.model_metadata = metadata_props(state.model)
            if skip:  # no graph import: the pass could not match anything in this model
                graph, result = None, PassResult(False)
            else:
                with self.stages.measure("import"):
                    graph = import_graph(state.model)
                with self.stages.measure("passes"):
                    result = p.run(graph, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"{type(p).__name__}.run must return a PassResult, got {type(result).__name__}")
            event.result = result
            record.take(result)
            if result.changed:
                with self.stages.measure("cleanup"):
                    graph.cleanup(remove_unused_graph_inputs=False).toposort()
                with self.stages.measure("export"):
                    event.after = graph_to_model(graph, state.model, result.metadata)
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
                error: PassError = VerificationError(message, p.name, event.passes_before, exc.output_name,
                                                     records=state.records)
            else:
                error = PassError(message, p.name, event.passes_before, records=state.records)
            raise error from exc
        for hook in self.hooks:
            hook.accepted(event)
        if event.after is not None:
            state.model = event.after
            return True
        return False

    # -- batched groups ---------------------------------------------------------------------------
    def _run_group(self, group: list[Step], state: _RunState, ctx: PassContext) -> bool:
        """Run lossless ``group`` on one graph and verify once; replay it pass by pass if that fails."""
        from optimizer.runtime import io_adapter

        start_model, first_record, first_warning = state.model, len(state.records), len(state.warnings)
        ctx.feed_adapter = io_adapter(self._original, start_model)[0]
        shared = _SharedGraph(start_model, self.stages, state.op_types(), state.stats_of(start_model))
        try:
            if not self._shared_steps(group, shared, state, ctx, iteration=0):
                return False
            with self.stages.measure("export"):
                model = graph_to_model(shared.graph, start_model, shared.metadata)
            state.remember_stats(model, self._verify_group(model, state.records[first_record:]))
        except Exception as exc:  # a pass raised, or the group's model fails: find the pass
            changed = [r.spec for r in state.records[first_record:] if r.changed]
            self.replays.append({"passes": list(dict.fromkeys(changed)), "reason": _one_line(exc)})
            log.info("batched group failed (%s); replaying it pass by pass", _one_line(exc))
            del state.records[first_record:]
            del state.warnings[first_warning:]
            state.model = start_model
            return self._run_steps(group, state, ctx, iteration=0, top=False)
        state.model = model
        return True

    def _shared_steps(self, steps: list[Step], shared: _SharedGraph, state: _RunState, ctx: PassContext,
                      iteration: int) -> bool:
        changed_any = False
        for step in steps:
            if isinstance(step, FixedPoint):
                changed_any |= _fixpoint(step, state, lambda i: self._shared_steps(step.steps, shared, state, ctx, i))
            else:
                changed_any |= self._shared_pass(step, shared, state, ctx, iteration)
        return changed_any

    def _shared_pass(self, p: Pass, shared: _SharedGraph, state: _RunState, ctx: PassContext, iteration: int) -> bool:
        record = PassRecord(p.name, p.spec(), iteration)
        state.records.append(record)
        start = time.perf_counter()
        record.before = shared.stats()
        needed = type(p).requires_any_op
        if shared.idle.get(id(p)) == shared.version:
            # It found nothing to do in this very graph (a fixed point's last round): same answer.
            result = PassResult(False)
            record.verification_detail = "skipped: the graph has not changed since this pass last found nothing to do"
        elif needed and not needed & shared.op_types():  # nothing it could act on: no import either
            result = PassResult(False)
        else:
            graph = shared.graph
            ctx.model_metadata = dict(shared.metadata)
            with self.stages.measure("passes"):
                result = p.run(graph, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"{type(p).__name__}.run must return a PassResult, got {type(result).__name__}")
        record.take(result)
        if result.changed:
            with self.stages.measure("cleanup"):
                shared.graph.cleanup(remove_unused_graph_inputs=False).toposort()
            shared.touch()
            shared.metadata.update(result.metadata)
            record.after = shared.stats()
            record.verification = "pending"  # set once the group's model is checked
        else:
            shared.idle[id(p)] = shared.version
            record.after = record.before
            record.verification = "unchanged" if self.verify != "off" else "off"
        record.time_s = time.perf_counter() - start
        return result.changed

    def _verify_group(self, model: onnx.ModelProto, records: list[PassRecord]) -> ModelStats:
        """One check of the group's model for all its changed passes (raises when it fails); the
        model's statistics."""
        from optimizer.hooks import VerifyHook
        from optimizer.stats import model_stats

        changed = [r for r in records if r.changed]
        stats = changed[-1].after = model_stats(model)  # exact; the others are counted on the graph
        hook = next((h for h in self.hooks if isinstance(h, VerifyHook)), None)
        if hook is None:
            for r in changed:
                r.verification = "off"
            return stats
        verdict = hook.verify_model(model)  # lossless passes only, EXACT tolerance (``_batchable``)
        hook.commit(verdict)
        for r in changed:
            r.verification = verdict.status
            r.verification_detail = f"{verdict.detail} (checked once for the {len(changed)} changes of its group)"
        changed[-1].outputs = verdict.metrics
        return stats


def _fixpoint(step: FixedPoint, state: _RunState, run_round) -> bool:
    """Run ``run_round(iteration)`` until a round changes nothing; whether any round changed."""
    for i in range(step.max_iterations):
        if not run_round(i):
            return i > 0
    state.warnings.append(f"fixpoint({format_pipeline(step.steps)}) did not converge in {step.max_iterations} rounds")
    return True


def _batchable(step: Step) -> bool:
    """Lossless steps with the default tolerance and no calibration share a graph and one check."""
    from optimizer.pipeline import iter_passes

    return all(
        not type(p).lossy and not type(p).uses_calibration and type(p).tolerance == EXACT
        for p in iter_passes([step])
    )


class _SharedGraph:
    """The graph a batched group works on: imported once, lazily; op types and counts cached."""

    def __init__(self, model: onnx.ModelProto, stages: StageTimes, op_types: frozenset[str], stats: ModelStats):
        self.model, self.stages = model, stages
        self._graph: gs.Graph | None = None
        self._ops: frozenset[str] | None = op_types
        self._stats = stats
        self._base = self._stats  # exact stats of the model the group started on
        self._base_weights: tuple[int, int, int] | None = None
        self.version = 0  # bumped on every change
        self.idle: dict[int, int] = {}  # id(pass) -> the version it last ran on without a change
        self.metadata = metadata_props(model)  # updated by the group's passes' PassResult.metadata

    @property
    def graph(self) -> gs.Graph:
        if self._graph is None:
            with self.stages.measure("import"):
                self._graph = import_graph(self.model)
            self._base_weights = _constant_weights(self._graph)
        return self._graph

    def touch(self) -> None:
        """The graph changed: recount what is cached."""
        self.version += 1
        self._ops = None
        self._stats = None

    def op_types(self) -> frozenset[str]:
        if self._ops is None:
            self._ops = frozenset(n.op for g in _graphs(self.graph) for n in g.nodes)
        return self._ops

    def stats(self) -> ModelStats:
        """Exact node count; weights counted on the graph's constants; bytes estimated from them."""
        if self._stats is None:
            graph = self.graph
            nodes = sum(len(g.nodes) for g in _graphs(graph))
            count, params, nbytes = (now - then for now, then in zip(_constant_weights(graph), self._base_weights))
            base = self._base  # exact at the start; the changes since are counted on the graph
            self._stats = ModelStats(nodes, base.initializers + count, base.params + params,
                                     base.weight_bytes + nbytes, max(base.model_bytes + nbytes, 0))
        return self._stats


def _graphs(graph: gs.Graph):
    yield graph
    yield from graph.subgraphs(recursive=True)


def _constant_weights(graph: gs.Graph) -> tuple[int, int, int]:
    """Count, elements and bytes of the distinct constants the graph's nodes read."""
    import numpy as np

    seen: dict[int, gs.Constant] = {}
    for g in _graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    seen[id(t)] = t
    params = nbytes = 0
    for t in seen.values():
        n = int(np.prod(t.shape, dtype=np.int64)) if t.shape is not None else 0
        try:
            size = np.dtype(t.dtype).itemsize
        except TypeError:  # onnx-only types (4-bit): half a byte, rounded up per element here
            size = 1
        params += n
        nbytes += n * size
    return len(seen), params, nbytes


@dataclass
class _RunState:
    model: onnx.ModelProto
    records: list[PassRecord]
    warnings: list[str]
    _ops: tuple = (None, frozenset())
    _stats: dict = field(default_factory=dict)  # id(model) -> (model, its ModelStats)

    def remember_stats(self, model: onnx.ModelProto, stats: ModelStats) -> None:
        self._stats[id(model)] = (model, stats)

    def known_stats(self, model: onnx.ModelProto) -> ModelStats | None:
        entry = self._stats.get(id(model))
        return entry[1] if entry is not None and entry[0] is model else None

    def stats_of(self, model: onnx.ModelProto) -> ModelStats:
        """``model_stats(model)``, counted once per model of this run (models are never modified)."""
        stats = self.known_stats(model)
        if stats is None:
            from optimizer.stats import model_stats

            stats = model_stats(model)
            self.remember_stats(model, stats)
        return stats

    def op_types(self) -> frozenset[str]:
        """Op types in the current model, subgraphs included (cached per model)."""
        if self._ops[0] is not self.model:
            from optimizer.stats import op_histogram

            self._ops = (self.model, frozenset(op_histogram(self.model)))
        return self._ops[1]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]
