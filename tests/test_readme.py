"""The README's Python example runs as written (on a copy of the digits sample)."""

import re
import shutil

from helpers import ROOT, SAMPLES

from optimizer import available_passes
from optimizer.registry import _REGISTRY


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has a Python example"
    shutil.copy(SAMPLES / "digits_cnn" / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(SAMPLES / "digits_cnn" / "eval.npz", tmp_path / "eval.npz")
    monkeypatch.chdir(tmp_path)
    saved = dict(available_passes())
    try:
        namespace: dict = {}
        exec(compile(blocks[0], "README.md", "exec"), namespace)
        assert (tmp_path / "model.opt.onnx").exists() and (tmp_path / "out.onnx").exists()
        assert namespace["result"].report.accuracy.task.drop == 0.0
        assert [r.name for r in namespace["run"].records] == ["cleanup", "dedupe-relu", "fuse-conv-bn"]
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
