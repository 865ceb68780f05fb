"""Shape resolution (calibration/shapes.py): order of sources, a search that makes the original run,
refusal of absurd sizes, and engine profiles from the plan."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import parse_model

from calibration.data import ShapeSpec, synthetic_inputs
from calibration.shapes import dim_kinds, engine_profile, metadata_size, resolve_shapes
from optimizer.errors import InputError
from optimizer.runtime import InputSpec, OrtRunner, input_specs

#: Runs only when H and W are multiples of 64: pool by 64, upsample by 64, add to the input
#: (at 224 the upsampled map is 192 wide: the Add fails, as a real FPN neck does at a bad size).
NECK = """
<ir_version: 10, opset_import: ["" : 13]>
neck (float[batch, 3, height, width] x) => (float[batch, 3, height, width] y) {
    p = MaxPool <kernel_shape = [64, 64], strides = [64, 64]> (x)
    scales = Constant <value = float[4] {1.0, 1.0, 64.0, 64.0}> ()
    up = Resize <mode = "nearest"> (p, , scales)
    y = Add (x, up)
}
"""

TOKENS = """
<ir_version: 10, opset_import: ["" : 13]>
bert (int64[batch, sequence] input_ids, int64[batch, sequence] attention_mask) => (float[batch, sequence] y) {
    s = Add (input_ids, attention_mask)
    y = Cast <to = 1> (s)
}
"""


def _try_run(model):
    runner = OrtRunner(model)
    specs = input_specs(model)

    def try_run(shapes):
        try:
            runner.run(synthetic_inputs(specs, shapes))
        except InputError as exc:
            return str(exc)
        return None

    return try_run


def test_search_finds_a_size_the_original_runs_at():
    model = parse_model(NECK)
    plan = resolve_shapes(model, input_specs(model), try_run=_try_run(model))
    assert plan.runs, plan.failure
    shape = plan.shapes["x"]
    assert shape[0] == 1 and shape[2] % 64 == 0 and shape[3] % 64 == 0, shape
    assert plan.tried >= 2 and plan.inputs["x"].source == "search"
    assert _try_run(model)(plan.shapes) is None


def test_nothing_runs_is_reported_not_raised():
    model = parse_model(NECK)
    plan = resolve_shapes(model, input_specs(model), try_run=lambda shapes: "always fails")
    assert not plan.runs and plan.failure == "always fails"
    assert "--shapes x:" in plan.hint()


def test_given_shapes_win_then_data_then_model():
    model = parse_model(TOKENS)
    specs = input_specs(model)
    plan = resolve_shapes(
        model, specs, {"input_ids": ShapeSpec((2, 7))},
        observed={"attention_mask": ((4, 9), "--data")},
    )
    assert plan.inputs["input_ids"].shape == (2, 7) and plan.inputs["input_ids"].source == "--shapes"
    assert plan.inputs["attention_mask"].shape == (4, 9) and plan.inputs["attention_mask"].source == "--data"


def test_shared_dim_param_gets_one_value():
    model = parse_model(TOKENS)
    plan = resolve_shapes(model, input_specs(model), {"input_ids": ShapeSpec((1, 33))}, try_run=_try_run(model))
    assert plan.shapes["attention_mask"] == (1, 33)
    assert "shared dim" in plan.inputs["attention_mask"].source
    default = resolve_shapes(model, input_specs(model), try_run=_try_run(model))
    assert default.shapes["input_ids"] == default.shapes["attention_mask"] == (1, 16)  # sequence default


def test_metadata_imgsz_sets_height_and_width():
    model = parse_model(NECK)
    model.metadata_props.add(key="imgsz", value="[640, 384]")
    assert metadata_size(model) == (640, 384)
    plan = resolve_shapes(model, input_specs(model), try_run=_try_run(model))
    assert plan.shapes["x"] == (1, 3, 640, 384) and plan.inputs["x"].source.startswith("metadata")


def test_dim_kinds():
    f32 = np.dtype(np.float32)
    assert dim_kinds(InputSpec("x", f32, ("N", 3, "H", "W"))) == ["batch", "static", "spatial", "spatial"]
    assert dim_kinds(InputSpec("x", f32, ("N", "H", "W", 3))) == ["batch", "spatial", "spatial", "static"]
    assert dim_kinds(InputSpec("t", np.dtype(np.int64), ("N", "S"))) == ["batch", "sequence"]
    assert dim_kinds(InputSpec("a", f32, ("N", "T"))) == ["batch", "signal"]
    assert dim_kinds(InputSpec("f", f32, ("N", "T", 80))) == ["batch", "sequence", "static"]
    assert dim_kinds(InputSpec("x", f32, (1, 3, 48, "w"))) == ["static", "static", "static", "spatial"]


def test_absurd_static_dim_is_refused_with_a_hint():
    model = parse_model(NECK.replace("float[batch, 3, height, width] x", "float[1, 3, 1048576, 1048576] x")
                        .replace("float[batch, 3, height, width] y", "float[1, 3, 1048576, 1048576] y"))
    with pytest.raises(InputError, match=r"input 'x' .* GiB .*--shapes x:"):
        resolve_shapes(model, input_specs(model), try_run=lambda s: None)


def test_engine_profile_spans_the_batch_and_fixes_the_rest():
    model = parse_model(NECK)
    specs = input_specs(model)
    plan = resolve_shapes(model, specs, {"x": ShapeSpec((2, 3, 128, 192))})
    profile = engine_profile(plan, specs)
    assert profile["x"] == ShapeSpec((2, 3, 128, 192), (1, 3, 128, 192), (8, 3, 128, 192))


def test_static_model_needs_no_search():
    model = parse_model(NECK.replace("batch, 3, height, width", "1, 3, 64, 64"))
    plan = resolve_shapes(model, input_specs(model), try_run=_try_run(model))
    assert plan.runs and plan.shapes == {"x": (1, 3, 64, 64)} and plan.inputs["x"].source == "model"
    assert plan.tried == 1 and not plan.warnings
    assert isinstance(onnx.ModelProto, type)
