"""Shared test helpers: build models from text, run them, and compare outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser

from calibration.data import synthetic_inputs
from optimizer.runtime import OrtRunner, input_specs

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SAMPLE_MODELS = sorted(SAMPLES.glob("*/model.onnx"))
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(LIGHT_DIR.glob("light_*.onnx"))


def parse_model(text: str, ir_version: int = 10) -> onnx.ModelProto:
    """A model from ONNX's textual syntax, checked, with an IR version ONNX Runtime runs."""
    model = onnx.parser.parse_model(text)
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def random_inputs(model: onnx.ModelProto, seed: int = 0, shapes=None) -> dict[str, np.ndarray]:
    return synthetic_inputs(input_specs(model), shapes or {}, seed=seed)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return OrtRunner(model).run(feeds)


def assert_same_outputs(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    inputs: dict[str, np.ndarray] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Run both models in ONNX Runtime on the same inputs; outputs must agree within rtol/atol."""
    inputs = inputs if inputs is not None else random_inputs(original)
    ref = run(original, inputs)
    new = run(optimized, inputs)
    assert list(ref) == list(new), f"output names changed: {list(ref)} -> {list(new)}"
    for name in ref:
        assert ref[name].shape == new[name].shape, f"{name}: shape {ref[name].shape} -> {new[name].shape}"
        assert ref[name].dtype == new[name].dtype, f"{name}: dtype {ref[name].dtype} -> {new[name].dtype}"
        scale = float(np.max(np.abs(ref[name]))) if ref[name].size else 0.0
        np.testing.assert_allclose(new[name], ref[name], rtol=0, atol=atol + rtol * scale, err_msg=name)


def op_types(model: onnx.ModelProto) -> list[str]:
    from optimizer.stats import iter_graphs

    return [n.op_type for g in iter_graphs(model.graph) for n in g.node]


def run_pass(model: onnx.ModelProto, pass_spec: str, verify: str = "numeric"):
    """Run one pipeline text on ``model``; return the RunResult."""
    from optimizer import PassManager

    return PassManager(pass_spec, verify=verify).run(model)
