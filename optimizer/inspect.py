"""``optimize inspect model.onnx``: what is in a model, and what the passes would do to it.

Fast and read-only: no evaluation, no calibration, nothing written. The dry runs execute the
default pipeline, then the steps ``--int8`` and ``--fp16`` append, on the graph with verification
off (``PassManager(..., verify="off")``) and report each pass's stats. INT8 and FP16 need ranges:
the dry run feeds ``quantize-int8(method=minmax, bias_correction=off)`` and ``convert-fp16`` two
synthetic samples (uniform in [-1, 1)) at the shapes the original runs at, so *placement* (which
layers are quantized, which stay float and why) is what ``optimize`` would do, while scales are not.

JSON keys (``--json``; schema ``onnx-trt-optimizer/inspect/v1``) are listed in ``KEYS`` and the
README, and are stable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from optimizer.errors import OptimizerError
from optimizer.events import skip_reasons

SCHEMA = "onnx-trt-optimizer/inspect/v1"
#: Top-level keys of the JSON, always all present.
KEYS = ("schema", "tool_version", "model", "inputs", "outputs", "ops", "parameters", "external_data", "shapes",
        "dry_run", "int8", "tensorrt", "warnings", "time_s")
#: Synthetic samples the INT8/FP16 dry runs take their ranges from.
DRY_RUN_SAMPLES = 2
RANGES_NOTE = (f"ranges from minmax on {DRY_RUN_SAMPLES} SYNTHETIC samples (uniform [-1, 1)) at the resolved shapes: "
               "placement is what optimize --int8/--fp16 does, scales and accuracy are not")


# ---------------------------------------------------------------------------------------------
# static facts


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:  # bfloat16, float8 ...: onnx's own name
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _value_info(value: onnx.ValueInfoProto) -> dict:
    t = value.type
    if not t.HasField("tensor_type"):
        return {"name": value.name, "dtype": t.WhichOneof("value") or "unknown", "dims": None, "dynamic": []}
    tensor = t.tensor_type
    dims: list | None = None
    dynamic: list[str] = []
    if tensor.HasField("shape"):
        dims = []
        for axis, d in enumerate(tensor.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                label = d.dim_param or None
                dims.append(label)
                dynamic.append(label or f"?{axis}")
    return {"name": value.name, "dtype": _dtype_name(tensor.elem_type), "dims": dims, "dynamic": dynamic}


def model_facts(raw: onnx.ModelProto, path: Path) -> dict:
    """``model``, ``inputs``, ``outputs``, ``ops``, ``parameters``, ``external_data`` of ``raw``
    (a model loaded without its external data)."""
    from optimizer.io import _external_tensors, _location
    from optimizer.stats import tensor_elements_and_bytes, iter_graphs

    initializers = {t.name for t in raw.graph.initializer}
    opsets = {o.domain or "ai.onnx": int(o.version) for o in raw.opset_import}
    facts: dict = {
        "model": {
            "path": str(path),
            "file_bytes": path.stat().st_size,
            "ir_version": int(raw.ir_version),
            "opset": opsets.get("ai.onnx", 0),
            "opset_imports": opsets,
            "producer": {"name": raw.producer_name, "version": raw.producer_version},
            "graph_name": raw.graph.name,
            "metadata": {p.key: p.value for p in raw.metadata_props},
        },
        "inputs": [_value_info(v) for v in raw.graph.input if v.name not in initializers],
        "outputs": [_value_info(v) for v in raw.graph.output],
    }
    histogram: Counter = Counter()
    custom: dict[str, Counter] = {}
    graphs = list(iter_graphs(raw.graph))
    for g in graphs:
        for node in g.node:
            if node.domain in ("", "ai.onnx"):
                histogram[node.op_type] += 1
            else:
                histogram[f"{node.domain}::{node.op_type}"] += 1
                custom.setdefault(node.domain, Counter())[node.op_type] += 1
    main_nodes = len(raw.graph.node)
    facts["ops"] = {
        "nodes": sum(histogram.values()),
        "main_graph_nodes": main_nodes,
        "subgraphs": len(graphs) - 1,
        "subgraph_nodes": sum(histogram.values()) - main_nodes,
        "histogram": dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        "custom_domains": {d: dict(sorted(c.items())) for d, c in sorted(custom.items())},
        "functions": [f"{f.domain}::{f.name}" if f.domain else f.name for f in raw.functions],
    }
    by_dtype: dict[str, dict] = {}

    def count(tensor: onnx.TensorProto) -> None:
        n, b = tensor_elements_and_bytes(tensor)
        row = by_dtype.setdefault(_dtype_name(tensor.data_type), {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += n
        row["bytes"] += b

    for g in graphs:
        for tensor in g.initializer:
            count(tensor)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        count(attr.t)
    facts["parameters"] = {
        "params": sum(r["params"] for r in by_dtype.values()),
        "bytes": sum(r["bytes"] for r in by_dtype.values()),
        "tensors": sum(r["tensors"] for r in by_dtype.values()),
        "by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"])),
    }
    external = _external_tensors(raw)
    files = sorted({_location(t) for t in external})
    facts["external_data"] = {
        "tensors": len(external),
        "bytes": sum(tensor_elements_and_bytes(t)[1] for t in external),
        "files": files,
    }
    return facts


# ---------------------------------------------------------------------------------------------
# dry runs


def _records(run) -> list[dict]:
    from optimizer.report import _pass_dict

    keep = ("name", "spec", "iteration", "changed", "stats", "time_s", "nodes_before", "nodes_after",
            "params_before", "params_after", "bytes_before", "bytes_after", "rolled_back", "error")
    return [{k: d[k] for k in keep} for d in map(_pass_dict, run.records)]


def _dry_run(model: onnx.ModelProto, pipeline: str, ctx, note: str = "") -> tuple[dict, onnx.ModelProto]:
    from optimizer.manager import PassManager
    from optimizer.stats import model_stats

    start = time.perf_counter()
    manager = PassManager(pipeline, verify="off")
    run = manager.run(model, ctx)
    before, after = model_stats(model), model_stats(run.model)
    entry = {
        "pipeline": manager.pipeline_text,
        "passes": _records(run),
        "nodes": {"before": before.nodes, "after": after.nodes},
        "params": {"before": before.params, "after": after.params},
        "bytes": {"before": before.model_bytes, "after": after.model_bytes},
        "rolled_back": [{"pass": r.spec, "why": r.error} for r in run.records if r.rolled_back],
        "note": note,
        "time_s": round(time.perf_counter() - start, 4),
    }
    return entry, run.model


def _context(shapes: dict | None):
    """A pass context like ``optimize``'s (no --static-shapes), with a tiny synthetic calibration set."""
    from calibration.sources import SyntheticSource
    from optimizer.pass_base import PassContext

    ctx = PassContext()
    if shapes is not None:
        ctx.calibration = SyntheticSource(DRY_RUN_SAMPLES, shapes=dict(shapes), seed=0)
    return ctx


def float_layers(model: onnx.ModelProto) -> list[dict]:
    """Layers ``quantize-int8`` has a weighted handler for (Conv, ConvTranspose, Gemm, MatMul) that it
    would leave in float, with the placement table's reason (``passes.quantization.HANDLERS``)."""
    from passes.graph_utils import import_graph, is_default_domain
    from passes.match import producer
    from passes.quantization import HANDLERS, PlacementOptions, QuantizeInt8

    defaults = QuantizeInt8()
    opts = PlacementOptions(defaults.min_weight_elements, defaults.pooling, defaults.residual)
    graph = import_graph(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    out = []
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        reasons: list[str] = []
        if opset < 10:
            reasons.append("opset_below_10")
        elif not is_default_domain(node):
            reasons.append("custom_domain")
        elif any(p is not None and p.op in ("QuantizeLinear", "DequantizeLinear") for p in map(producer, node.inputs)):
            reasons.append("already_quantized")
        elif not HANDLERS[node.op](node, opts, reasons.append) and not reasons:
            reasons.append("no_site")
        if reasons:
            out.append({"node": node.name, "op": node.op, "reason": reasons[0]})
    for node in graph.nodes:
        if any(True for _ in node.subgraphs()):
            out.append({"node": node.name, "op": node.op, "reason": "subgraphs_left_in_float"})
    return out


def _int8_summary(entry: dict, before_quantize: onnx.ModelProto | None) -> dict:
    from optimizer.registry import available_passes

    calibrating = {name for name, cls in available_passes().items() if cls.calibrates_ranges}
    record = next((p for p in entry["passes"] if p["name"] in calibrating), None) if entry else None
    stats = record["stats"] if record else {}
    summary = {
        "quantized_layers": int(stats.get("quantized_nodes", 0)) if record and record["changed"] else 0,
        "quantized_activations": int(stats.get("quantized_activations", 0)) if record and record["changed"] else 0,
        "quantized_weights": int(stats.get("quantized_weights", 0)) if record and record["changed"] else 0,
        "float_reasons": skip_reasons(stats),
        "float_layers": [],
        "error": record["error"] if record else (entry or {}).get("error", ""),
        "note": RANGES_NOTE,
    }
    if before_quantize is not None:
        try:
            summary["float_layers"] = float_layers(before_quantize)
        except Exception as exc:  # a diagnostic: never fail inspect over it
            summary["float_layers"] = None
            summary["error"] = summary["error"] or f"float layer listing failed: {exc}"
    return summary


def dry_runs(model: onnx.ModelProto, shapes: dict | None) -> tuple[dict, dict, list[str]]:
    """``(dry_run, int8, warnings)``: the default pipeline, then what ``--int8`` and ``--fp16`` append."""
    from optimizer.pipeline import DRY_RUN_STEPS, PRESETS

    warnings: list[str] = []
    default, optimized = _dry_run(model, PRESETS["default"], _context(None),
                                  "optimize's default pipeline, verification off")
    result: dict = {"default": default, "int8": None, "fp16": None}
    int8 = _int8_summary({}, None)
    if shapes is None:
        warnings.append("INT8/FP16 dry runs skipped: the model does not run in ONNX Runtime at any shape tried "
                        "(give --shapes)")
        int8["error"] = "not run: no shapes under which the model runs"
        return result, int8, warnings
    upgrade, quantize = DRY_RUN_STEPS["int8"]
    opset, upgraded = _dry_run(optimized, upgrade, _context(shapes))
    quant, _ = _dry_run(upgraded, quantize, _context(shapes), RANGES_NOTE)
    quant["passes"] = opset["passes"] + quant["passes"]
    quant["nodes"]["before"] = opset["nodes"]["before"]
    quant["time_s"] = round(opset["time_s"] + quant["time_s"], 4)
    quant["pipeline"] = "default," + opset["pipeline"] + "," + quant["pipeline"]
    quant["note"] = "after the default pipeline; " + RANGES_NOTE
    result["int8"] = quant
    int8 = _int8_summary(quant, upgraded)
    fp16, _ = _dry_run(optimized, ",".join(DRY_RUN_STEPS["fp16"]), _context(shapes),
                       "after the default pipeline; " + RANGES_NOTE)
    fp16["pipeline"] = "default," + fp16["pipeline"]
    result["fp16"] = fp16
    return result, int8, warnings


# ---------------------------------------------------------------------------------------------
# TensorRT-RTX


def tensorrt_check(path: Path) -> dict:
    """The TensorRT-RTX parser's verdict (no engine build), or why it was not asked."""
    entry = {"available": False, "parsed": None, "unsupported": [], "errors": [], "note": ""}
    try:
        from optimizer.tensorrt_rtx import TensorRTUnavailableError, check_model
    except Exception as exc:  # pragma: no cover - broken install
        entry["note"] = f"TensorRT-RTX check unavailable: {exc}"
        return entry
    try:
        result = check_model(path, build=False).to_dict()
    except TensorRTUnavailableError as exc:
        entry["note"] = str(exc)
        return entry
    except OptimizerError as exc:
        entry.update(available=True, note=f"check failed: {exc}")
        return entry
    entry.update(available=True, parsed=result.get("parsed"), unsupported=result.get("unsupported", []),
                 errors=result.get("errors", []), note=f"TensorRT-RTX {result.get('trt_version', '')} ONNX parser")
    return entry


# ---------------------------------------------------------------------------------------------
# the whole inspection


def inspect_model(path: str | Path, shapes=None, *, tensorrt: bool = True) -> dict:
    """Everything ``optimize inspect`` reports, as a dict with the ``KEYS`` (see the module docstring)."""
    from calibration.data import parse_shapes
    from calibration.samples import prepare
    from optimizer import __version__
    from optimizer.io import load_model
    from optimizer.runtime import input_specs
    from optimizer.validate import validate_model

    start = time.perf_counter()
    path = Path(path)
    model, source = load_model(path)  # refuses missing, truncated, non-ONNX files and unsafe external data
    raw = onnx.load_model(str(path), load_external_data=False)
    warnings = list(validate_model(model, source.path))
    facts = model_facts(raw, path)
    specs = input_specs(model)
    given = parse_shapes(shapes) if not isinstance(shapes, dict) else shapes
    unknown = [n for n in given if n not in {s.name for s in specs}]
    if unknown:
        from optimizer.errors import InputError

        raise InputError(f"--shapes names unknown input(s) {', '.join(unknown)}; model inputs: "
                         f"{', '.join(s.name for s in specs)}")
    prepared = prepare(model, specs, given)
    plan = prepared.shapes
    runs = prepared.samples is not None
    shape_info = {
        "runs": runs,
        "inputs": {n: list(map(int, s)) for n, s in plan.shapes.items()},
        "source": {n: i.get("source") for n, i in (plan.to_dict().get("inputs") or {}).items()},
        "failure": "" if runs else str(plan.failure),
    }
    if not runs:
        warnings.append(f"the model does not run in ONNX Runtime at any shape tried: {plan.failure}")
    dry, int8, dry_warnings = dry_runs(model, dict(plan.shapes) if runs else None)
    warnings += dry_warnings
    out = {
        "schema": SCHEMA,
        "tool_version": __version__,
        **facts,
        "shapes": shape_info,
        "dry_run": dry,
        "int8": int8,
        "tensorrt": tensorrt_check(path) if tensorrt else {"available": False, "parsed": None, "unsupported": [],
                                                             "errors": [], "note": "not checked (--no-trt)"},
        "warnings": list(dict.fromkeys(warnings)),
        "time_s": 0.0,
    }
    out["time_s"] = round(time.perf_counter() - start, 3)
    return {k: out[k] for k in KEYS}


def render_text(info: dict) -> str:
    """A human summary of ``inspect_model``'s dict."""
    m = info["model"]
    lines = [
        f"{m['path']}: opset {m['opset']}, IR {m['ir_version']}, producer {m['producer']['name'] or '?'} "
        f"{m['producer']['version']}".rstrip(),
    ]
    others = {d: v for d, v in m["opset_imports"].items() if d != "ai.onnx"}
    if others:
        lines.append("  other opsets: " + ", ".join(f"{d} {v}" for d, v in others.items()))

    def dims(v):
        return "x".join("?" if d is None else str(d) for d in v["dims"]) if v["dims"] is not None else "(unknown)"

    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        for v in info[kind]:
            dyn = f"  dynamic: {', '.join(v['dynamic'])}" if v["dynamic"] else ""
            lines.append(f"  {v['name']}: {v['dtype']} {dims(v)}{dyn}")
    ops = info["ops"]
    lines.append(f"ops: {ops['nodes']} nodes ({ops['subgraph_nodes']} in {ops['subgraphs']} subgraph(s))")
    lines.append("  " + ", ".join(f"{k} {v}" for k, v in ops["histogram"].items()))
    for domain, hist in ops["custom_domains"].items():
        lines.append(f"  custom domain {domain}: " + ", ".join(f"{k} {v}" for k, v in hist.items()))
    p = info["parameters"]
    lines.append(f"parameters: {p['params']:,} in {p['tensors']} tensor(s), {p['bytes']:,} bytes: "
                 + ", ".join(f"{d} {r['params']:,} ({r['bytes']:,} B)" for d, r in p["by_dtype"].items()))
    e = info["external_data"]
    if e["tensors"]:
        lines.append(f"external data: {e['tensors']} tensor(s), {e['bytes']:,} bytes in {', '.join(e['files'])}")
    s = info["shapes"]
    if s["inputs"]:
        lines.append("dry-run shapes: " + ", ".join(f"{n} {'x'.join(map(str, v))} ({s['source'].get(n)})"
                                                    for n, v in s["inputs"].items()))
    for name in ("default", "int8", "fp16"):
        entry = info["dry_run"][name]
        if entry is None:
            continue
        lines.append(f"dry run {name}: nodes {entry['nodes']['before']} -> {entry['nodes']['after']}, "
                     f"bytes {entry['bytes']['before']:,} -> {entry['bytes']['after']:,}")
        for r in entry["passes"]:
            if not r["changed"] and not r["error"] and r["iteration"] > 0:
                continue
            stats = ", ".join(f"{k}={v}" for k, v in r["stats"].items() if v)
            state = "changed" if r["changed"] else ("FAILED: " + r["error"] if r["error"] else "no change")
            lines.append(f"  {r['spec']} [{r['iteration']}]: {state}" + (f" ({stats})" if stats else ""))
    q = info["int8"]
    lines.append(f"INT8: {q['quantized_layers']} layer(s) quantized"
                 + (", float: " + ", ".join(f"{k} {v}" for k, v in q["float_reasons"].items()) if q["float_reasons"] else ""))
    for layer in (q["float_layers"] or [])[:20]:
        lines.append(f"  float: {layer['node']} ({layer['op']}): {layer['reason']}")
    if q["float_layers"] and len(q["float_layers"]) > 20:
        lines.append(f"  ... {len(q['float_layers']) - 20} more")
    lines.append(f"  ({q['note']})")
    t = info["tensorrt"]
    if t["available"]:
        status = "parsed" if t["parsed"] else "did not parse"
        lines.append(f"TensorRT-RTX: {status}, {len(t['unsupported'])} unsupported node(s)")
        lines += [f"  UNSUPPORTED {u['name']} ({u['op_type']}): {u['reason']}" for u in t["unsupported"]]
        lines += [f"  error: {x}" for x in t["errors"][:5]]
    else:
        lines.append(f"TensorRT-RTX: not checked ({t['note']})")
    lines += [f"warning: {w}" for w in info["warnings"]]
    lines.append(f"({info['time_s']:.2f} s)")
    return "\n".join(lines)


def inspect_main(argv: list[str]) -> int:
    """``optimize inspect``: 0 on success, 2 for bad input (one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="optimize inspect",
        description="Show a model's opset, I/O, ops, parameters and external data, and what the default "
                    "pipeline, --int8 and --fp16 would do (a dry run: nothing is written).",
    )
    parser.add_argument("model", help="an ONNX model")
    parser.add_argument("--shapes", action="append", metavar="NAME:DIMS", help="shapes for dynamic inputs")
    parser.add_argument("--no-trt", action="store_true", help="skip the TensorRT-RTX parser check")
    parser.add_argument("--json", action="store_true", help="print JSON (stable keys) and nothing else")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    import logging

    logging.captureWarnings(True)  # library warnings reach the user in the JSON's warnings, not on stderr
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    from optimizer.cli import _quiet_graphsurgeon

    _quiet_graphsurgeon()
    try:
        with np.errstate(all="ignore"):
            info = inspect_model(args.model, args.shapes, tensorrt=not args.no_trt)
    except OptimizerError as exc:
        print(f"optimize inspect: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, default=_json_default) if args.json else render_text(info))
    return 0


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
