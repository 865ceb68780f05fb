"""One ``Report`` per run, rendered as JSON (stable keys, for CI), Markdown, or a terminal table."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from optimizer.evaluate import AccuracyReport
from optimizer.html_report import budget_source
from optimizer.manager import PassRecord
from optimizer.stats import ModelStats

SCHEMA = "onnx-trt-optimizer/report/v1"


def _ratio(before: int, after: int) -> float | None:
    return round(before / after, 4) if after else None


@dataclass
class Report:
    """Everything one run did: pipeline, per-pass records, sizes, accuracy, warnings."""

    model_path: str
    pipeline: str
    verify: str
    original: ModelStats
    optimized: ModelStats | None = None
    output_path: str | None = None
    passes: list[PassRecord] = field(default_factory=list)
    accuracy: AccuracyReport | None = None
    warnings: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | verification_failed | accuracy_failed | error
    error: str = ""
    total_time_s: float = 0.0
    engine: dict | None = None  # TensorRT / TensorRT-RTX build (and run) results
    trt_check: dict | None = None  # TensorRT-RTX parser support check of the optimized model
    budget: dict | None = None  # accuracy budget: metric, drop, fallbacks and per-layer sensitivity
    opset: int = 0
    ir_version: int = 0
    inputs: dict | None = None  # the shape plan: per input, the shape fed and where it came from
    samples: dict | None = None  # which samples verified, evaluated and calibrated (calibration.samples)
    verification: dict | None = None  # verification samples, the model's float noise, the lossless rule
    rolled_back: list[dict] = field(default_factory=list)  # passes undone: pass, iteration, why
    torch: dict | None = None  # from_torch / .pt2: exporter, fallback_reason, PyTorch vs exported / optimized
    precision: dict | None = None  # per layer: the precision it runs in and why; bytes stored per type
    time_breakdown: dict | None = None  # pass manager: seconds and calls per stage, replayed groups (issue 16)
    executor: dict | None = None  # where independent work ran: name, workers, nodes/CPUs, tasks and time per stage

    # -- derived -----------------------------------------------------------------------------
    @property
    def compression_bytes(self) -> float | None:
        return _ratio(self.original.model_bytes, self.optimized.model_bytes) if self.optimized else None

    @property
    def compression_params(self) -> float | None:
        return _ratio(self.original.params, self.optimized.params) if self.optimized else None

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        from optimizer import __version__

        opt = self.optimized or self.original
        return {
            "schema": SCHEMA,
            "tool_version": __version__,
            "status": self.status,
            "error": self.error,
            "model": {"path": self.model_path, "opset": self.opset, "ir_version": self.ir_version},
            "output": {"path": self.output_path},
            "pipeline": self.pipeline,
            "verify": self.verify,
            "inputs": self.inputs,
            "samples": self.samples,
            "verification": self.verification,
            "rolled_back": list(self.rolled_back),
            "summary": {
                "nodes": {"before": self.original.nodes, "after": opt.nodes},
                "initializers": {"before": self.original.initializers, "after": opt.initializers},
                "params": {"before": self.original.params, "after": opt.params},
                "weight_bytes": {"before": self.original.weight_bytes, "after": opt.weight_bytes},
                "model_bytes": {"before": self.original.model_bytes, "after": opt.model_bytes},
                "compression": {"bytes": self.compression_bytes, "params": self.compression_params},
                "time_s": round(self.total_time_s, 4),
            },
            "passes": [_pass_dict(r) for r in self.passes],
            "accuracy": self.accuracy.to_dict() if self.accuracy else None,
            "budget": self.budget,
            "engine": self.engine,
            "trt_check": self.trt_check,
            "torch": self.torch,
            "precision": self.precision,
            "time_breakdown": self.time_breakdown,
            "executor": self.executor,
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    # -- Markdown ----------------------------------------------------------------------------
    def to_markdown(self) -> str:
        d = self.to_dict()
        s = d["summary"]
        lines = [
            f"# Optimization report: `{Path(self.model_path).name}`",
            "",
            f"- status: **{self.status}**" + (f" — {self.error}" if self.error else ""),
            f"- pipeline: `{self.pipeline or '(empty)'}`",
            f"- verification: {self.verify}",
            f"- output: `{self.output_path or '(not saved)'}`",
        ] + _executor_lines(self.executor) + [
            "",
            "| | before | after | rate |",
            "|---|---:|---:|---:|",
            f"| nodes | {s['nodes']['before']} | {s['nodes']['after']} | |",
            f"| parameters | {s['params']['before']:,} | {s['params']['after']:,} | {_x(s['compression']['params'])} |",
            f"| model bytes | {s['model_bytes']['before']:,} | {s['model_bytes']['after']:,} | {_x(s['compression']['bytes'])} |",
            "",
            "## Passes",
            "",
            "| pass | iter | changed | nodes | bytes | time (ms) | verification | stats |",
            "|---|---:|---|---|---|---:|---|---|",
        ]
        for p in d["passes"]:
            stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items() if v)
            verification = p["verification"] + (" (rolled back)" if p["rolled_back"] else "")
            lines.append(
                f"| `{p['spec']}` | {p['iteration']} | {'yes' if p['changed'] else 'no'} | "
                f"{p['nodes_before']}→{p['nodes_after']} | {p['bytes_before']:,}→{p['bytes_after']:,} | "
                f"{p['time_s'] * 1000:.1f} | {verification} | {stats} |"
            )
        if self.inputs and self.inputs.get("inputs"):
            lines += ["", "## Input shapes used", "", "| input | declared | fed at | from |", "|---|---|---|---|"]
            for name, i in self.inputs["inputs"].items():
                lines.append(f"| `{name}` | {i['declared'] or ''} | {'x'.join(map(str, i['shape']))} | {i['source']} |")
            if not self.inputs.get("original_runs", True):
                lines.append(f"\nThe original model runs at no shape tried: {self.inputs.get('failure', '')}")
        if self.rolled_back:
            lines += ["", "## Rolled back", ""] + [f"- `{r['pass']}` (round {r['iteration']}): {r['why']}" for r in self.rolled_back]
        if self.accuracy:
            a = d["accuracy"]
            kind = ("**SYNTHETIC inputs — not a measure of real accuracy**" if a["synthetic"]
                    else a["data_source"] + (f" ({a['note']})" if a.get("note") else ""))
            lines += ["", "## Accuracy vs the original", "", f"{a['samples']} sample(s) from {kind}.", ""]
            lines += ["| output | max abs | mean abs | max rel | cosine | argmax agree |", "|---|---:|---:|---:|---:|---:|"]
            for name, m in a["outputs"].items():
                lines.append(
                    f"| `{name}` | {m['max_abs']:.3g} | {m['mean_abs']:.3g} | {m['max_rel']:.3g} | "
                    f"{_opt(m['cosine'], '.6f')} | {_opt(m['argmax_agreement'], '.2%')} |"
                )
            if a["task"]:
                t = a["task"]
                lines += [
                    "",
                    f"Task accuracy (`{t['output']}` vs labels): original {t['original']:.2f} %, "
                    f"optimized {t['optimized']:.2f} %, drop {t['drop']:.2f} points.",
                ]
        if self.budget:
            b = self.budget
            lines += ["", "## Accuracy budget", "",
                      f"{b['metric']} drop {b['drop']:.3f} points ({budget_source(b)}): " + ("met" if b["met"] else "NOT met")]
            lines += [f"- `{f['node']}` kept in float by {f['pass_name']}: sensitivity +{f['gain']:.3f} points ({f['reason']})"
                      for f in b["fallbacks"]]
        lines += _precision_lines(self.precision)
        lines += _engine_markdown(self.engine, self.trt_check)
        lines += _torch_lines(self.torch)
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """One self-contained page (inline SVG charts, no scripts, no network)."""
        from optimizer.html_report import render_html

        return render_html(json.loads(self.to_json()))

    # -- terminal ----------------------------------------------------------------------------
    def print_table(self, console=None) -> None:
        """A compact summary for humans, using rich. Every name, spec and message is escaped:
        node names such as ``[/conv/Conv]`` are text, never markup."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = console or Console(stderr=False)
        d = self.to_dict()
        table = Table(title=escape(f"{Path(self.model_path).name}: {self.pipeline or '(empty pipeline)'}"),
                      title_justify="left")
        for col, justify in (("pass", "left"), ("iter", "right"), ("nodes", "right"), ("bytes", "right"),
                             ("ms", "right"), ("verified", "left"), ("stats", "left")):
            table.add_column(col, justify=justify)
        for p in d["passes"]:
            if not p["changed"] and not p["error"] and p["iteration"] > 0:
                continue  # fixed-point rounds that found nothing more
            stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items() if v)
            verified = p["verification"] + (" ROLLED BACK" if p["rolled_back"] else "")
            table.add_row(
                escape(p["spec"]), str(p["iteration"]), f"{p['nodes_before']}→{p['nodes_after']}",
                f"{p['bytes_before']:,}→{p['bytes_after']:,}", f"{p['time_s'] * 1000:.1f}", escape(verified), escape(stats),
            )
        console.print(table)
        s = d["summary"]
        console.print(
            f"nodes {s['nodes']['before']} → {s['nodes']['after']}   "
            f"params {s['params']['before']:,} → {s['params']['after']:,} ({_x(s['compression']['params'])})   "
            f"bytes {s['model_bytes']['before']:,} → {s['model_bytes']['after']:,} "
            f"(compression {_x(s['compression']['bytes'])})   time {s['time_s']:.2f} s",
            highlight=False,
        )
        if self.inputs and self.inputs.get("inputs"):
            shapes = ", ".join(f"{name} {'x'.join(map(str, i['shape']))} ({i['source']})"
                               for name, i in self.inputs["inputs"].items())
            console.print(f"input shapes used: {escape(shapes)}", highlight=False)
        for r in self.rolled_back:
            console.print(f"[yellow]rolled back:[/yellow] {escape(r['pass'])}: {escape(r['why'])}", highlight=False)
        if self.accuracy:
            a = self.accuracy
            if a.synthetic:
                console.print(f"[bold red]accuracy vs original on {a.samples} SYNTHETIC sample(s) — not a measure of "
                              "real accuracy (give --data or --calib):[/bold red]", highlight=False)
            else:
                note = f" ({a.note})" if a.note else ""
                console.print(f"accuracy vs original on {a.samples} real sample(s) from {escape(a.data_source + note)}:",
                              highlight=False)
            for m in a.outputs:
                agree = f", argmax agreement {m.argmax_agreement:.2%}" if m.argmax_agreement is not None else ""
                console.print(f"  {escape(m.name)}: {m.describe()}{agree}", highlight=False)
            if a.task:
                console.print(
                    f"  task accuracy: original {a.task.original:.2f} %, optimized {a.task.optimized:.2f} % "
                    f"(drop {a.task.drop:.2f} points)", highlight=False,
                )
        for line in _engine_markdown(self.engine, self.trt_check) + _torch_lines(self.torch):
            if line:
                console.print(escape(line.lstrip("#- ").replace("`", "")), highlight=False)
        for w in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
        if self.status != "ok":
            console.print(f"[red]{escape(self.status)}[/red]: {escape(self.error)}", highlight=False)

    def save(self, path: str | Path) -> Path:
        """Write JSON (``.json``), Markdown (``.md``) or HTML (``.html``) by extension."""
        from optimizer.io import write_text_atomic

        path = Path(path)
        if path.suffix.lower() == ".json":
            write_text_atomic(path, self.to_json())
        elif path.suffix.lower() in (".md", ".markdown"):
            write_text_atomic(path, self.to_markdown())
        elif path.suffix.lower() in (".html", ".htm"):
            write_text_atomic(path, self.to_html())
        else:
            from optimizer.errors import InputError

            raise InputError(f"unknown report format '{path.suffix}' for {path}; use .json, .md or .html")
        return path


def _engine_markdown(engine: dict | None, trt_check: dict | None) -> list[str]:
    lines: list[str] = []
    if trt_check:
        unsupported = trt_check.get("unsupported") or []
        lines += ["", "## TensorRT-RTX parser check", ""]
        if unsupported:
            lines += [f"- unsupported: `{u['name']}` ({u['op_type']}): {u['reason']}" for u in unsupported]
        else:
            lines.append("- every node is supported" if trt_check.get("parsed") else "- parsing failed: " + "; ".join(trt_check.get("errors", [])[:3]))
    if engine:
        lines += ["", "## Engine", ""]
        if engine.get("error"):
            lines.append(f"- not built: {engine['error']}")
        else:
            lines.append(
                f"- {engine.get('backend')}: `{engine.get('path') or engine.get('engine_path')}`, "
                f"{engine.get('engine_bytes', 0):,} bytes, built in {engine.get('build_time_s', 0):.2f} s"
            )
            if engine.get("latency_ms") is not None:
                lines.append(f"- latency (median): {engine['latency_ms']:.3f} ms")
            for kind, outputs in (engine.get("accuracy") or {}).items():
                for name, m in outputs.items():
                    lines.append(f"- {kind} `{name}`: max abs {m['max_abs']:.3g}, cosine {m['cosine']}")
    return lines


def _precision_lines(precision: dict | None) -> list[str]:
    """Layers per precision (with the commonest reasons for float) and bytes stored per type."""
    if not precision or not precision.get("layers"):
        return []
    lines = ["", "## Precision per layer", "", "| precision | layers | why (float layers: the reasons) |", "|---|---:|---|"]
    for name, count in sorted(precision["counts"].items(), key=lambda kv: -kv[1]):
        whys = Counter(layer["why"] or "not quantized" for layer in precision["layers"] if layer["precision"] == name)
        lines.append(f"| {name} | {count} | " + ", ".join(f"{w} ({n})" for w, n in whys.most_common(4)) + " |")
    lines += ["", "Bytes stored per type: " + ", ".join(f"{k} {v:,}" for k, v in precision["bytes"].items()) + "."]
    return lines


def _torch_lines(torch: dict | None) -> list[str]:
    """Markdown lines of the ``torch`` section: which exporter, and PyTorch vs each ONNX model."""
    if not torch:
        return []
    lines = ["", "## PyTorch vs ONNX", "", f"- exporter: {torch['exporter']}"
             + (f" (dynamo failed: {torch['fallback_reason']})" if torch.get("fallback_reason") else "")]
    if torch.get("error"):
        return lines + [f"- not compared: {torch['error']}"]
    for kind in ("vs_exported", "vs_optimized"):
        for name, m in (torch.get(kind) or {}).items():
            lines.append(f"- PyTorch {kind.replace('_', ' ')} `{name}`: max abs {m['max_abs']:.3g}, "
                         f"max rel {m['max_rel']:.3g}, cosine {_opt(m['cosine'], '.6f')} ({torch['inputs']})")
    return lines


def _executor_lines(executor: dict | None) -> list[str]:
    """One Markdown line: where independent work ran, and its tasks."""
    if not executor:
        return []
    where = f"{executor.get('name')}, {executor.get('workers')} worker(s)"
    if executor.get("nodes") is not None:
        where += f" on {executor['nodes']} node(s), {executor.get('cpus')} CPU(s)"
    stages = ", ".join(f"{s['stage']} {s['tasks']} task(s) {s['wall_s']:.2f} s" for s in executor.get("stages", []))
    return [f"- executor: {where}" + (f" ({stages})" if stages else "")]


def _pass_dict(r: PassRecord) -> dict:
    before = r.before or ModelStats(0, 0, 0, 0, 0)
    after = r.after or before
    return {
        "name": r.name,
        "spec": r.spec,
        "iteration": r.iteration,
        "changed": r.changed,
        "stats": dict(r.stats),
        "details": dict(r.details),
        "time_s": round(r.time_s, 6),
        "nodes_before": before.nodes,
        "nodes_after": after.nodes,
        "params_before": before.params,
        "params_after": after.params,
        "bytes_before": before.model_bytes,
        "bytes_after": after.model_bytes,
        "compression_bytes": _ratio(before.model_bytes, after.model_bytes),
        "verification": r.verification,
        "verification_detail": r.verification_detail,
        "rolled_back": r.rolled_back,
        "error": r.error,
    }


def _x(value: float | None) -> str:
    return f"{value:.3f}x" if value else "n/a"


def _opt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "n/a"


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
