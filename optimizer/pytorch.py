"""From PyTorch in one call: ``from_torch(module, example_inputs, ...)``, and ``.pt2`` programs.

The module is exported with ``torch.onnx.export(..., dynamo=True)`` at opset 18 (when that fails,
with the TorchScript exporter, ``dynamo=False``, and the report names the failure) into a private
temporary folder, its IR version pinned as every model we write (``optimizer.io``), then runs
through the same ``optimizer.optimize`` pipeline. The report gains a ``torch`` section: the
module's own outputs against the exported and against the optimized ONNX model on the same inputs,
so an exporter problem is told apart from a pass problem.

torch is imported lazily: without it, calling these functions raises one ``InputError`` line
saying ``pip install torch``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from calibration.sources import batch_len
from optimizer.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 13
#: Samples of the evaluation data the PyTorch comparison runs on.
TORCH_SAMPLES = 8
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def import_torch():
    """torch, or an ``InputError`` with the install hint."""
    try:
        import torch
    except ImportError:
        raise InputError("this needs PyTorch, which is not installed: pip install torch") from None
    return torch


@dataclass
class Exported:
    """An ONNX model exported from PyTorch: where it is, which exporter wrote it and why."""

    path: Path
    exporter: str  # "dynamo" | "torchscript"
    fallback_reason: str | None
    input_names: list[str]
    output_names: list[str]
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# exporting


def summarize_error(exc: BaseException, limit: int = 300) -> str:
    """One line for an exporter's (long, multi-paragraph, colored) exception."""
    text = _ANSI.sub("", str(exc))
    lines = [line.strip() for line in text.splitlines()]
    line = ""
    if "## Exception summary" in lines:  # torch.onnx's TorchExportError / ConversionError layout
        rest = lines[lines.index("## Exception summary") + 1:]
        line = next((x for x in rest if x), "")
    line = line or next((x for x in lines if x), "") or type(exc).__name__
    line = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", line)
    if not line.startswith(type(exc).__name__) and ":" not in line[:60]:
        line = f"{type(exc).__name__}: {line}"
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


@contextlib.contextmanager
def quiet(scratch: Path):
    """Keep the exporters' progress lines, logs and warnings off our stdout/stderr (``--json`` owns
    stdout): Python-level streams and the file descriptors both go to a file in ``scratch``."""
    sink = open(scratch / "export.log", "w+b")
    saved: list[int] = []
    try:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            saved = [os.dup(1), os.dup(2)]
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if saved:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        sink.close()


def forward_names(module, count: int) -> list[str]:
    """The first ``count`` positional parameter names of ``module.forward`` (``input_<i>`` when the
    signature does not name them, e.g. ``*args``)."""
    try:
        params = list(inspect.signature(module.forward if hasattr(module, "forward") else module).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        else:
            break
    names = names[:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


def example_args(module, example_inputs) -> tuple:
    """``example_inputs`` as positional arguments: a tensor, a tuple/list, or a dict by parameter name."""
    if isinstance(example_inputs, Mapping):
        order = forward_names(module, 10_000)
        unknown = [k for k in example_inputs if k not in order]
        if unknown:
            raise InputError(f"example_inputs names {', '.join(map(str, unknown))}, which forward() does not take "
                             "positionally")
        keys = sorted(example_inputs, key=order.index)
        if keys != order[: len(keys)]:
            raise InputError(f"example_inputs must give forward()'s first parameters ({', '.join(order[:len(keys)])}); "
                             f"got {', '.join(keys)}")
        return tuple(example_inputs[k] for k in keys)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def dynamic_axes(dynamic_shapes, arg_names: list[str], input_names: list[str]) -> dict | None:
    """``torch.export`` dynamic shapes (``{arg: {axis: Dim}}`` or positional) as the TorchScript
    exporter's ``dynamic_axes`` (``{input name: {axis: dim name}}``)."""
    if not dynamic_shapes:
        return None
    rename = dict(zip(arg_names, input_names))
    if isinstance(dynamic_shapes, Mapping):
        items = [(rename.get(k, k), v) for k, v in dynamic_shapes.items()]
    else:
        items = list(zip(input_names, dynamic_shapes))
    axes: dict[str, dict[int, str]] = {}
    for name, spec in items:
        if spec is None:
            continue
        dims = spec.items() if isinstance(spec, Mapping) else enumerate(spec)
        for axis, dim in dims:
            if dim is None:
                continue
            label = getattr(dim, "__name__", None) or f"{name}_dim{axis}"
            if not isinstance(label, str) or not label.isidentifier():
                label = f"{name}_dim{axis}"
            axes.setdefault(name, {})[int(axis)] = label
    return axes or None


def _finish(raw: Path, path: Path) -> tuple[list[str], list[str]]:
    """Load the exporter's file (and its external data), pin the IR version, save to ``path``."""
    from optimizer.io import load_model, pin_ir_version, save_model

    model, _ = load_model(raw)
    pin_ir_version(model, model.ir_version)
    save_model(model, path)
    from optimizer.runtime import input_specs

    return [s.name for s in input_specs(model)], [o.name for o in model.graph.output]


def export_module(module, args: tuple, path: Path, *, dynamic_shapes=None, input_names=None, output_names=None,
                  opset: int = DEFAULT_OPSET) -> Exported:
    """Export ``module`` to ONNX at ``path`` (dynamo, else TorchScript with the reason recorded)."""
    torch = import_torch()
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise InputError(f"opset must be an integer >= {MIN_OPSET} (TensorRT's parser and per-channel INT8 need it); "
                         f"got {opset!r}")
    arg_names = forward_names(module, len(args))
    names = list(input_names) if input_names else arg_names
    if len(names) != len(args):
        raise InputError(f"input_names has {len(names)} name(s) for {len(args)} example input(s)")
    scratch = path.parent
    raw = scratch / "exported" / "model.onnx"
    raw.parent.mkdir(exist_ok=True)
    notes: list[str] = []
    try:
        with quiet(scratch):
            torch.onnx.export(module, args, str(raw), dynamo=True, opset_version=opset, input_names=names,
                              output_names=list(output_names) if output_names else None,
                              dynamic_shapes=dynamic_shapes, verbose=False, artifacts_dir=str(raw.parent))
        exporter, reason = "dynamo", None
    except Exception as exc:  # the exporter raises many types; the TorchScript path may still work
        reason = summarize_error(exc)
        log.info("dynamo export failed (%s); trying the TorchScript exporter", reason)
        outputs = list(output_names) if output_names else _default_output_names(module, args, torch)
        try:
            with quiet(scratch):
                torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset, input_names=names,
                                  output_names=outputs, dynamic_axes=dynamic_axes(dynamic_shapes, arg_names, names),
                                  verbose=False)
        except Exception as exc2:
            raise InputError(f"torch.onnx.export failed with both exporters: dynamo: {reason}; "
                             f"TorchScript: {summarize_error(exc2)}") from None
        exporter = "torchscript"
        notes.append(f"torch.onnx.export(dynamo=True) failed ({reason}); exported with the TorchScript exporter "
                     "(dynamo=False) instead: it traces one path through Python control flow")
    ins, outs = _finish(raw, path)
    return Exported(path, exporter, reason, ins, outs, notes)


def _default_output_names(module, args, torch) -> list[str]:
    """``output`` / ``output_<i>`` for the TorchScript exporter, which would otherwise number them."""
    try:
        with torch.no_grad():
            count = len(_flatten(module(*args), torch))
    except Exception:
        return None
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def load_program(path: str | os.PathLike):
    """A ``torch.export`` program saved with ``torch.export.save`` (a ``.pt2`` file)."""
    torch = import_torch()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as exc:
        raise InputError(f"cannot load {path} as a torch.export program (.pt2): {summarize_error(exc)}") from None


def export_program(program, path: Path, opset: int = DEFAULT_OPSET) -> Exported:
    """Export a ``torch.export.ExportedProgram`` (its example inputs and dynamic shapes included) to ``path``."""
    torch = import_torch()
    raw = path.parent / "exported" / "model.onnx"
    raw.parent.mkdir(exist_ok=True)
    try:
        with quiet(path.parent):
            torch.onnx.export(program, (), str(raw), dynamo=True, opset_version=opset, verbose=False,
                              artifacts_dir=str(raw.parent))
    except Exception as exc:
        raise InputError(f"torch.onnx.export could not convert the program: {summarize_error(exc)}") from None
    ins, outs = _finish(raw, path)
    return Exported(path, "dynamo", None, ins, outs)


# ---------------------------------------------------------------------------------------------
# PyTorch vs the ONNX models


def _flatten(outputs, torch) -> list:
    from torch.utils._pytree import tree_flatten

    leaves, _ = tree_flatten(outputs)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def torch_outputs(call, args: tuple, output_names: list[str]) -> dict:
    """Run ``call(*args)`` without gradients; its flattened tensor outputs by ONNX output name."""
    torch = import_torch()
    from calibration.torch_data import to_numpy

    with torch.no_grad():
        leaves = _flatten(call(*args), torch)
    if len(leaves) != len(output_names):
        raise InputError(f"the module returns {len(leaves)} tensor(s), the ONNX model has {len(output_names)} output(s)")
    return {name: to_numpy(t) for name, t in zip(output_names, leaves)}


def comparison_batches(data, specs, example: tuple | None, input_names: list[str]) -> tuple[list[dict], str]:
    """Feeds for the comparison: the first ``TORCH_SAMPLES`` samples of ``data``, else the example inputs."""
    import numpy as np

    if data is not None:
        from calibration.samples import SliceSource
        from calibration.sources import effective_batch_size, open_source

        source = open_source(data, specs)
        batches = list(SliceSource(source, 0, TORCH_SAMPLES).batches(specs, effective_batch_size(specs, TORCH_SAMPLES)))
        n = sum(batch_len(b) for b in batches if b)
        return batches, f"the first {n} sample(s) of {source.description}"
    from calibration.torch_data import to_numpy

    feeds = {name: np.ascontiguousarray(to_numpy(a)) for name, a in zip(input_names, example or ())}
    return [feeds], "the example inputs"


def compare_with_torch(call, batches: list[dict], input_names: list[str], exported, optimized) -> dict:
    """``vs_exported`` / ``vs_optimized``: metrics per output of each ONNX model against the module."""
    torch = import_torch()
    from optimizer.metrics import compare_batches
    from optimizer.runtime import OrtRunner, run_like

    output_names = [o.name for o in exported.graph.output]
    reference, exported_out, optimized_out = [], [], []
    exported_runner = OrtRunner(exported)
    optimized_runner = OrtRunner(optimized) if optimized is not None else None
    for feeds in batches:
        missing = [n for n in input_names if n not in feeds]
        if missing:
            raise InputError(f"no data for forward() argument(s) {', '.join(missing)}")
        args = tuple(torch.from_numpy(feeds[n].copy()) for n in input_names)
        reference.append(torch_outputs(call, args, output_names))
        exported_out.append(exported_runner.run(feeds))
        if optimized_runner is not None:
            optimized_out.append(run_like(exported, optimized, optimized_runner, feeds))

    def table(outputs):
        return {m.name: m.to_dict() for m in compare_batches(reference, outputs)} if outputs else None

    vs_exported = table(exported_out)
    agrees = all(
        (m["mismatch"] == 0.0) if m["cosine"] is None else (m["max_rel"] <= 1e-3 and m["mismatch"] == 0.0)
        for m in vs_exported.values()
    )
    return {"vs_exported": vs_exported, "vs_optimized": table(optimized_out), "exporter_agrees": agrees}


def torch_section(exported: Exported, call, batches, source: str, input_names, exported_model, optimized_model,
                  warnings_out: list[str]) -> dict:
    """The report's ``torch`` section (``compare_with_torch`` plus which exporter and inputs)."""
    section = {"exporter": exported.exporter, "fallback_reason": exported.fallback_reason,
               "inputs": source, "samples": sum(batch_len(b) for b in batches if b),
               "vs_exported": None, "vs_optimized": None, "exporter_agrees": None, "error": None}
    try:
        section.update(compare_with_torch(call, batches, input_names, exported_model, optimized_model))
    except Exception as exc:  # the comparison is a diagnostic: never fail the run over it
        section["error"] = summarize_error(exc)
        warnings_out.append(f"PyTorch comparison not made: {section['error']}")
        return section
    if not section["exporter_agrees"]:
        worst = max(section["vs_exported"].values(), key=lambda m: m["max_rel"])
        warnings_out.append(
            f"the exported ONNX model differs from the PyTorch module (output '{worst['name']}': max rel "
            f"{worst['max_rel']:.3g}, cosine {worst['cosine']}) on {source}: an exporter problem, not a pass problem"
        )
    return section


# ---------------------------------------------------------------------------------------------
# the entry point


def from_torch(
    module,
    example_inputs,
    *,
    dynamic_shapes=None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    pipeline="default",
    calibration=None,
    data=None,
    opset: int = DEFAULT_OPSET,
    output: str | os.PathLike | None = None,
    **optimize_options,
):
    """Export a PyTorch ``module`` to ONNX and optimize it: the same pipeline and ``OptimizeResult``
    as ``optimizer.optimize``.

    ``example_inputs``: a tensor, a tuple of tensors (``forward``'s positional arguments) or a dict
    by parameter name. ``dynamic_shapes``: as for ``torch.export`` (``{"x": {0: Dim("batch")}}``).
    ``input_names`` default to ``forward``'s parameter names. ``calibration`` / ``data``: a torch
    ``DataLoader``, an iterable of tensors, tuples (inputs, then optional labels) or dicts, or
    anything ``optimize`` takes (a path, arrays). ``opset`` (>= 13, default 18) is the export opset.
    ``output``: where to save the optimized ONNX model (nothing else is written; the export lives in
    a temporary folder). Other keyword arguments go to ``optimize`` (``shapes``, ``strict``,
    ``max_accuracy_drop``, ``metric`` ...). The report's ``torch`` section compares the module's own
    outputs with the exported and the optimized model on the first 8 samples of ``data`` (else the
    example inputs); ``torch.exporter`` says which exporter ran and ``fallback_reason`` why dynamo did not.
    """
    import_torch()
    from calibration.torch_data import adapt
    from optimizer.api import optimize
    from optimizer.io import load_model

    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise InputError(f"opset must be an integer >= {MIN_OPSET}; got {opset!r}")
    args = example_args(module, example_inputs)
    was_training = bool(getattr(module, "training", False))
    notes = []
    if was_training:
        module.eval()
        notes.append("the module was in training mode: exported and compared in eval mode (module.eval())")
    try:
        with tempfile.TemporaryDirectory(prefix="onnx-trt-optimizer-torch-") as scratch:
            exported = export_module(module, args, Path(scratch) / "model.onnx", dynamic_shapes=dynamic_shapes,
                                     input_names=input_names, output_names=output_names, opset=opset)
            names = list(input_names) if input_names else forward_names(module, len(args))
            from optimizer.runtime import input_specs

            exported_model, _ = load_model(exported.path)
            specs = input_specs(exported_model)
            data_source = adapt(data, names, name="data", specs=specs)
            calib_source = adapt(calibration, names, name="calibration", specs=specs)
            result = optimize(exported.path, pipeline, output=output, data=data_source, calibration=calib_source,
                              **optimize_options)
            report = result.report
            report.model_path = f"<torch {type(module).__name__}>"
            extra = notes + exported.warnings
            for source in (data_source, calib_source):
                extra += [w for w in getattr(source, "warnings", []) if "shuffle" in w]
            batches, where = comparison_batches(data_source, specs, args, names)
            report.torch = torch_section(exported, module, batches, where, names, exported_model, result.model, extra)
            report.warnings = [w for w in dict.fromkeys(extra + report.warnings)]
            return result
    finally:
        if was_training:
            module.train()


def pt2_session(path: str | os.PathLike, scratch: Path, opset: int = DEFAULT_OPSET) -> Pt2Session:
    """Load a ``.pt2`` program and export it to ONNX in ``scratch`` (for ``optimize model.pt2``)."""
    program = load_program(path)
    exported = export_program(program, scratch / "model.onnx", opset)
    return Pt2Session(Path(path), program, exported)


@dataclass
class Pt2Session:
    """A loaded ``.pt2`` program and its ONNX export; ``annotate`` adds the ``torch`` report section."""

    source: Path
    program: object
    exported: Exported

    def annotate(self, report, optimized_model, data=None) -> None:
        from optimizer.io import load_model
        from optimizer.runtime import input_specs

        exported_model, _ = load_model(self.exported.path)
        args, kwargs = self.program.example_inputs or ((), {})
        example = tuple(args) + tuple((kwargs or {}).values())
        names = self.exported.input_names
        batches, where = comparison_batches(data, input_specs(exported_model), example, names)
        extra: list[str] = []
        report.torch = torch_section(self.exported, self.program.module(), batches, where, names, exported_model,
                                     optimized_model, extra)
        report.warnings += [w for w in extra if w not in report.warnings]
