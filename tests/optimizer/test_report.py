"""Reports: JSON keys are stable, Markdown and the self-contained HTML page render."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, SAMPLES

from optimizer.cli import main

DIGITS = SAMPLES / "digits_cnn"
TOP_KEYS = {"schema", "tool_version", "status", "error", "model", "output", "pipeline", "verify", "summary",
            "passes", "accuracy", "budget", "engine", "trt_check", "warnings", "inputs", "samples", "verification",
            "rolled_back", "torch", "precision", "time_breakdown", "executor"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    code = main([str(DIGITS / "model.onnx"), "-o", str(out / "m.onnx"), "--int8", "--calib", str(DIGITS / "calib.npz"),
                 "--data", str(DIGITS / "eval.npz"), "--max-accuracy-drop", "0.5",
                 "--report", str(out / "r.json"), "--report", str(out / "r.md"), "--report", str(out / "r.html")])
    assert code == 0
    return out


def test_json_has_the_documented_keys(reports):
    d = json.loads((reports / "r.json").read_text())
    assert set(d) == TOP_KEYS
    assert set(d["summary"]) == {"nodes", "initializers", "params", "weight_bytes", "model_bytes", "compression", "time_s"}
    q = next(p for p in d["passes"] if p["name"] == "quantize-int8")
    assert {"tensors", "weights", "calibration", "nodes"} <= set(q["details"])
    assert d["budget"]["met"] is True
    assert d["executor"]["name"] == "in-process" and d["executor"]["workers"] == 1
    assert "executor" not in d["samples"]
    assert "method selection" in {s["stage"] for s in d["executor"]["stages"]}  # auto: one task per candidate


def test_html_is_self_contained_with_charts(reports):
    page = (reports / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 4
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "<script" not in page
    for text in ("Compression per pass", "INT8 quantization", "Accuracy vs the original", "Accuracy budget"):
        assert text in page


def test_markdown_has_sections(reports):
    md = (reports / "r.md").read_text()
    assert md.startswith("# Optimization report") and "## Passes" in md and "## Accuracy budget" in md
    assert "- executor: in-process, 1 worker(s) (" in md


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(reports, tmp_path):
    png = tmp_path / "r.png"
    subprocess.run([sys.executable, str(ROOT / "bench" / "render_report.py"), str(reports / "r.html"), str(png)], check=True, timeout=180)
    data = Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
