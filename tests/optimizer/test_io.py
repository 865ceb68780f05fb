"""Loading and saving: bad files, external data, atomic writes, never overwriting the input."""

import hashlib
import shutil

import numpy as np
import onnx
import pytest
from helpers import SAMPLES, assert_same_outputs, parse_model
from onnx import TensorProto, helper, numpy_helper

from optimizer import InputError, load_model, save_model
from optimizer.io import default_output_path, pin_ir_version

DIGITS = SAMPLES / "digits_cnn" / "model.onnx"


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weighted_model(n=64):
    w = numpy_helper.from_array(np.arange(n * n, dtype=np.float32).reshape(n, n) / 1000, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b"this is certainly not an onnx model\n" * 10, "not a valid ONNX model"),
        (b"\x08\x07\x12\x04test", "not a valid ONNX model"),
    ],
    ids=["empty", "text", "no-graph"],
)
def test_bad_files_raise_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_truncated_model_is_refused(tmp_path):
    data = DIGITS.read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 100):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(InputError, match="not a valid ONNX model"):
            load_model(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(InputError, match="directory"):
        load_model(tmp_path)


def test_external_data_round_trip(tmp_path):
    model = weighted_model()
    path = tmp_path / "ext.onnx"
    save_model(model, path, external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size == 64 * 64 * 4
    loaded, source = load_model(path)
    assert source.file_bytes > 64 * 64 * 4
    assert_same_outputs(model, loaded)


def test_external_data_outside_model_folder_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    model = weighted_model()
    save_model(model, tmp_path / "victim.onnx", external_data=True)
    proto = onnx.load(str(tmp_path / "victim.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../victim.onnx.data"
    onnx.save(proto, str(inner / "evil.onnx"))
    with pytest.raises(InputError, match="outside the model's folder"):
        load_model(inner / "evil.onnx")
    # ...and through a symlink that points outside
    proto2 = onnx.load(str(tmp_path / "victim.onnx"), load_external_data=False)
    (inner / "link.data").symlink_to(tmp_path / "victim.onnx.data")
    for tensor in proto2.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "link.data"
    onnx.save(proto2, str(inner / "evil2.onnx"))
    with pytest.raises(InputError, match="outside the model's folder"):
        load_model(inner / "evil2.onnx")


def test_missing_external_data_file(tmp_path):
    save_model(weighted_model(), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "m.onnx")


def test_save_refuses_to_overwrite_input_and_is_atomic(tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copy(DIGITS, path)
    before = digest(path)
    model, source = load_model(path)
    with pytest.raises(InputError, match="refusing to overwrite the input model"):
        save_model(model, path, protect=(source.path,))
    assert digest(path) == before
    out = save_model(model, tmp_path / "out.onnx", protect=(source.path,))
    assert out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]  # no scratch left


def test_save_into_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="output folder does not exist"):
        save_model(weighted_model(), tmp_path / "no" / "such" / "m.onnx")


def test_ir_version_is_pinned_to_what_onnx_runtime_reads():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 13]>
        g (float[2] x) => (float[2] y) { y = Relu(x) }
        """
    )
    model.ir_version = 14
    pin_ir_version(model)
    assert model.ir_version == 13
    model.ir_version = 3
    pin_ir_version(model)
    assert model.ir_version == 7  # opset 13 needs IR 7


def test_default_output_path():
    from pathlib import Path

    assert default_output_path(Path("/a/b/model.onnx")) == Path("/a/b/model.opt.onnx")
    assert default_output_path(Path("/a/b/weird")) == Path("/a/b/weird.opt.onnx")


def test_models_over_the_protobuf_limit_use_external_data(tmp_path, monkeypatch):
    """Simulate a >2 GB model by lowering the limit: saving, verifying and running all switch paths."""
    import optimizer.io as model_io
    from optimizer.cli import main

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    shutil.copy(DIGITS, tmp_path / "model.onnx")
    code = main([str(tmp_path / "model.onnx"), "-o", str(tmp_path / "out.onnx"), "--json"])
    assert code == 0
    assert (tmp_path / "out.onnx.data").stat().st_size > 30_000
    assert (tmp_path / "out.onnx").stat().st_size < 10_000
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 2**31)
    loaded, _ = load_model(tmp_path / "out.onnx")
    assert_same_outputs(onnx.load(str(DIGITS)), loaded)
