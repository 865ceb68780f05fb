"""The report as one self-contained HTML page: tables and inline SVG charts, no scripts, no network.

Written by hand (a few dozen lines of SVG) rather than with a plotting library: the page must
open offline, stay small, and this project should not depend on matplotlib for one report.
"""

from __future__ import annotations

import html
from pathlib import Path

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d232a;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2e7;padding-bottom:4px}
table{border-collapse:collapse;width:100%;margin:6px 0} th,td{padding:4px 8px;border-bottom:1px solid #eceff2;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f5f7f9;font-weight:600}
code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#f1f3f5;padding:1px 4px;border-radius:3px}
.ok{color:#17803d;font-weight:600}.bad{color:#c22;font-weight:600}.muted{color:#6b7785}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #dde2e7;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:20px}.warn{background:#fff6e0;border-left:3px solid #e0a000;padding:6px 10px;margin:4px 0}
svg text{font:11px system-ui,sans-serif;fill:#1d232a}
"""


def budget_source(budget: dict) -> str:
    """Where a budget came from: the user's ``--max-accuracy-drop`` or a pass's accuracy floor."""
    floor = budget.get("floor")
    if floor:
        return f"accuracy floor of {floor['pass']}: output cosine >= {floor['min_cosine']}"
    return f"budget {budget['max_accuracy_drop']}"



def _e(value) -> str:
    return html.escape(str(value))


def bar_chart(items: list[tuple[str, float]], *, unit: str = "", width: int = 760, color: str = "#3b7dd8",
              reference: float | None = None) -> str:
    """Horizontal bars, one per (label, value); an optional dashed reference line."""
    if not items:
        return '<p class="muted">nothing to chart</p>'
    row, label_w, pad = 18, 240, 70
    peak = max([abs(v) for _, v in items] + ([abs(reference)] if reference else []) + [1e-12])
    plot_w = width - label_w - pad
    height = row * len(items) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, (label, value) in enumerate(items):
        y = 5 + i * row
        w = max(1.0, plot_w * abs(value) / peak)
        short = label if len(label) <= 38 else "…" + label[-37:]
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end"><title>{_e(label)}</title>{_e(short)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{color}" rx="2"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 12}">{value:.4g}{_e(unit)}</text>')
    if reference:
        x = label_w + plot_w * abs(reference) / peak
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#c22" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(value, spec: str = ",") -> str:
    return "n/a" if value is None else format(value, spec)


def render_html(d: dict) -> str:
    """The page for a report dictionary (``Report.to_dict()``)."""
    s = d["summary"]
    status_class = "ok" if d["status"] == "ok" else "bad"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Optimization report: {_e(Path(d['model']['path']).name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Optimization report: <code>{_e(Path(d['model']['path']).name)}</code></h1>",
        f"<p>status <span class='{status_class}'>{_e(d['status'])}</span>"
        + (f" — {_e(d['error'])}" if d.get("error") else "")
        + f" · verification {_e(d['verify'])} · opset {d['model']['opset']} · tool {_e(d['tool_version'])}</p>",
        f"<p>pipeline <code>{_e(d['pipeline'] or '(empty)')}</code></p>",
        "<div class='cards'>",
        f"<div class='card'>nodes<b>{s['nodes']['before']:,} → {s['nodes']['after']:,}</b></div>",
        f"<div class='card'>parameters<b>{s['params']['before']:,} → {s['params']['after']:,}</b></div>",
        f"<div class='card'>model bytes<b>{s['model_bytes']['before']:,} → {s['model_bytes']['after']:,}</b></div>",
        f"<div class='card'>compression<b>{_num(s['compression']['bytes'], '.3f')}×</b>"
        f"<span class='muted'>weights {s['weight_bytes']['before']:,} → {s['weight_bytes']['after']:,} B</span></div>",
    ]
    acc = d.get("accuracy")
    if acc and acc.get("task"):
        t = acc["task"]
        parts.append(f"<div class='card'>task accuracy<b>{t['original']:.2f} → {t['optimized']:.2f} %</b>"
                     f"<span class='muted'>drop {t['drop']:.2f} points</span></div>")
    parts.append(f"<div class='card'>time<b>{s['time_s']:.2f} s</b></div></div>")

    # passes
    changed = [p for p in d["passes"] if p["changed"] or p["error"]]
    parts.append("<h2>Passes</h2>")
    parts.append(_table(
        ["pass", "round", "nodes", "model bytes", "ms", "verification", "stats"],
        [[f"<code>{_e(p['spec'])}</code>", p["iteration"], f"{p['nodes_before']:,} → {p['nodes_after']:,}",
          f"{p['bytes_before']:,} → {p['bytes_after']:,}", f"{p['time_s'] * 1000:.1f}",
          (f"<span class='bad'>{_e(p['verification'])} (rolled back: {_e(p['error'])})</span>" if p["rolled_back"]
           else _e(p["verification"])),
          _e(", ".join(f"{k}={v}" for k, v in p["stats"].items() if v))] for p in changed] or [["(no pass changed the model)", "", "", "", "", "", ""]],
    ))
    parts.append("<h2>Compression per pass</h2><p class='muted'>model bytes after each pass that changed the model (first bar: the original)</p>")
    sizes = [("original", s["model_bytes"]["before"])] + [(f"{p['spec']} #{p['iteration']}", p["bytes_after"]) for p in d["passes"] if p["changed"]]
    parts.append(bar_chart([(k, float(v)) for k, v in sizes], unit=" B"))
    nodes = [("original", s["nodes"]["before"])] + [(f"{p['spec']} #{p['iteration']}", p["nodes_after"]) for p in d["passes"] if p["changed"]]
    parts.append("<p class='muted'>node count after each changing pass</p>" + bar_chart([(k, float(v)) for k, v in nodes], color="#6a9f3a"))

    # accuracy
    if acc:
        kind = "synthetic inputs (not a real evaluation)" if acc["synthetic"] else _e(acc["data_source"])
        parts.append(f"<h2>Accuracy vs the original</h2><p>{acc['samples']} sample(s) from {kind}</p>")
        parts.append(_table(
            ["output", "max abs", "mean abs", "max rel", "cosine", "argmax agreement"],
            [[f"<code>{_e(n)}</code>", f"{m['max_abs']:.3g}", f"{m['mean_abs']:.3g}", f"{m['max_rel']:.3g}",
              _num(m["cosine"], ".6f"), _num(None if m["argmax_agreement"] is None else 100 * m["argmax_agreement"], ".2f") + " %"]
             for n, m in acc["outputs"].items()],
        ))
    # per-layer quantization / pruning details
    for p in d["passes"]:
        det = p.get("details") or {}
        if det.get("tensors") and det.get("calibration"):  # a pass that calibrated activation ranges
            cal = det.get("calibration", {})
            parts.append(f"<h2>INT8 quantization (<code>{_e(p['spec'])}</code>)</h2>")
            parts.append(f"<p>calibration: {_e(cal.get('source'))}, {cal.get('samples')} samples, method {_e(cal.get('method'))}"
                         + (" — <span class='bad'>synthetic data: not a real calibration</span>" if cal.get("synthetic") else "") + "</p>")
            parts.append("<p class='muted'>activation SQNR (dB) per quantized tensor, from the calibration data</p>")
            parts.append(bar_chart([(k, float(v["sqnr_db"] or 0)) for k, v in det["tensors"].items()], unit=" dB", color="#8a5cd1"))
            parts.append("<p class='muted'>weight SQNR (dB) per layer (per-channel INT8)</p>")
            parts.append(bar_chart([(k, float(v["sqnr_db"])) for k, v in det.get("weights", {}).items()], unit=" dB", color="#b05cd1"))
            parts.append(_table(["tensor", "method", "amax", "scale", "SQNR dB"],
                                [[f"<code>{_e(k)}</code>", _e(v["method"]), f"{v['amax']:.5g}", f"{v['scale']:.5g}", _num(v["sqnr_db"], ".2f")]
                                 for k, v in det["tensors"].items()]))
        if det.get("issues"):
            parts.append("<h2>Q/DQ placement issues</h2>")
            parts.append(_table(["node", "issue", "detail"], [[f"<code>{_e(i['node'])}</code>", _e(i["kind"]), _e(i["detail"])] for i in det["issues"]]))
        if det.get("groups") and not det.get("calibration"):
            layers = det.get("layers") or det.get("groups") or {}
            if isinstance(layers, dict) and layers:
                parts.append(f"<h2>Pruning (<code>{_e(p['spec'])}</code>)</h2>")
                items = []
                for k, v in layers.items():
                    removed = v.get("removed", v.get("channels_removed")) if isinstance(v, dict) else v
                    if isinstance(removed, list):
                        removed = len(removed)
                    if isinstance(removed, (int, float)):
                        items.append((k, float(removed)))
                parts.append("<p class='muted'>channels removed per layer group</p>" + bar_chart(items, color="#d17a2c"))
    budget = d.get("budget")
    if budget:
        parts.append("<h2>Accuracy budget</h2>")
        met = "<span class='ok'>met</span>" if budget["met"] else "<span class='bad'>NOT met</span>"
        parts.append(f"<p>{_e(budget['metric'])} drop {budget['drop']:.3f} points, {_e(budget_source(budget))}: {met}</p>")
        if budget["sensitivity"]:
            parts.append("<p class='muted'>per-layer sensitivity: points recovered when only this layer stays in float</p>")
            parts.append(bar_chart(sorted(budget["sensitivity"].items(), key=lambda kv: -kv[1]), unit=" pt", color="#d14b5c"))
        if budget["fallbacks"]:
            parts.append(_table(["layer kept in float", "by", "sensitivity (points)", "reason"],
                                [[f"<code>{_e(f['node'])}</code>", _e(f["pass_name"]), f"{f['gain']:.3f}", _e(f["reason"])] for f in budget["fallbacks"]]))
    engine = d.get("engine")
    if engine or d.get("trt_check"):
        parts.append("<h2>TensorRT</h2>")
        check = d.get("trt_check")
        if check:
            unsupported = check.get("unsupported") or []
            parts.append(f"<p>TensorRT-RTX parser: {'<span class=ok>every node supported</span>' if check.get('parsed') and not unsupported else '<span class=bad>unsupported nodes</span>'}</p>")
            if unsupported:
                parts.append(_table(["node", "op", "reason"], [[f"<code>{_e(u['name'])}</code>", _e(u["op_type"]), _e(u["reason"])] for u in unsupported]))
        if engine:
            if engine.get("error"):
                parts.append(f"<p class='bad'>engine not built: {_e(engine['error'])}</p>")
            else:
                rows = [[_e(k), _e(v)] for k, v in engine.items() if k not in ("accuracy", "unsupported", "errors", "warnings", "profile")]
                parts.append(_table(["engine", ""], rows))
    if d.get("warnings"):
        parts.append("<h2>Warnings</h2>" + "".join(f"<div class='warn'>{_e(w)}</div>" for w in d["warnings"]))
    parts.append(f"<p class='muted'>report schema {_e(d['schema'])}</p></body></html>")
    return "".join(parts)
