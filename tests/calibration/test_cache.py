"""Range caches: our JSON cache (tied to the model) and TensorRT's calibration cache."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from helpers import parse_model
from onnx import numpy_helper

from calibration import cache
from calibration.cache import (
    hex_to_scale,
    load_ranges,
    model_fingerprint,
    parse_trt_cache,
    read_trt_cache,
    save_ranges,
    scale_to_hex,
    write_trt_cache,
)
from calibration.ranges import TensorRange
from optimizer.errors import InputError

MODEL_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {{
    w = Constant <value = float[4] {{{w}}}> ()
    a = {op}(x, w)
    y = Relu(a)
}}
"""


def model(op="Mul", w="1.0, 2.0, 3.0, 4.0"):
    return parse_model(MODEL_TEXT.format(op=op, w=w))


RANGES = {
    "x": TensorRange("x", 2.64, "entropy", 38.25),
    "a": TensorRange("a", 1e-7, "mse", math.inf),
    "input:0": TensorRange("input:0", 0.0, "minmax", None),
}


def test_fingerprint_follows_structure_not_weights():
    assert model_fingerprint(model()) == model_fingerprint(model(w="9.0, 9.0, 9.0, 9.0"))
    assert model_fingerprint(model()) != model_fingerprint(model(op="Add"))
    renamed = model()
    renamed.graph.node[1].name = "scale"
    assert model_fingerprint(renamed) != model_fingerprint(model())
    with_initializer = model()
    with_initializer.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "extra"))
    assert model_fingerprint(with_initializer) == model_fingerprint(model())
    assert len(model_fingerprint(model())) == 64


def test_json_cache_round_trip(tmp_path):
    path = save_ranges(tmp_path / "ranges.json", RANGES, model())
    loaded = load_ranges(path, model(w="5.0, 5.0, 5.0, 5.0"))  # same structure, other weights: accepted
    assert list(loaded) == list(RANGES)
    assert loaded["x"] == RANGES["x"]
    assert loaded["a"].amax == 1e-7 and loaded["a"].sqnr_db is None  # inf is stored as null
    assert loaded["input:0"].scale == 0.0
    # a fingerprint string works as well as the model
    assert load_ranges(save_ranges(tmp_path / "r2.json", list(RANGES.values()), model_fingerprint(model())), model()) == loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r2.json", "ranges.json"]  # no temporary files left


def test_json_cache_refuses_another_model(tmp_path):
    path = save_ranges(tmp_path / "ranges.json", RANGES, model())
    with pytest.raises(InputError, match="made for a different model.*calibrate again"):
        load_ranges(path, model(op="Add"))


def test_json_cache_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_ranges(tmp_path / "missing.json", model())
    (tmp_path / "bad.json").write_text("{ nope")
    with pytest.raises(InputError, match="not a readable"):
        load_ranges(tmp_path / "bad.json", model())
    (tmp_path / "other.json").write_text('{"schema": "something/else"}')
    with pytest.raises(InputError, match="schema"):
        load_ranges(tmp_path / "other.json", model())
    (tmp_path / "neg.json").write_text(
        '{"schema": "%s", "model_fingerprint": "%s", "ranges": {"x": {"amax": -1, "method": "minmax"}}}'
        % (cache.RANGES_SCHEMA, model_fingerprint(model()))
    )
    with pytest.raises(InputError, match="amax -1"):
        load_ranges(tmp_path / "neg.json", model())


def test_known_scale_bit_pattern():
    assert struct.unpack(">f", bytes.fromhex("3caa54fc"))[0] == pytest.approx(0.020792, abs=1e-6)
    assert hex_to_scale("3caa54fc") == pytest.approx(0.020792, abs=1e-6)
    assert scale_to_hex(hex_to_scale("3caa54fc")) == "3caa54fc"
    assert scale_to_hex(0.020792) == struct.pack(">f", 0.020792).hex()
    assert hex_to_scale("0") == 0.0 and hex_to_scale("3f800000") == 1.0 and hex_to_scale("3F80") == hex_to_scale("00003f80")


def test_trt_cache_text_and_round_trip(tmp_path):
    ranges = {"x": TensorRange("x", 0.020792 * 127, "entropy"), "input:0": TensorRange("input:0", 1.0, "mse")}
    path = write_trt_cache(tmp_path / "calib.cache", ranges)
    lines = path.read_text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    assert lines[1] == f"x: {struct.pack('>f', 0.020792).hex()}"
    assert lines[2] == f"input:0: {struct.pack('>f', 1.0 / 127).hex()}"
    parsed = read_trt_cache(path)
    assert parsed.version == 8601 and parsed.algorithm == "EntropyCalibration2"
    for name, original in ranges.items():
        assert parsed.ranges[name].scale == np.float32(original.scale)  # float32 exactly
        assert parsed.ranges[name].method == "entropy"
    # re-writing what was read gives the same bytes
    again = write_trt_cache(tmp_path / "again.cache", parsed.ranges)
    assert again.read_text() == path.read_text()


def test_trt_cache_header_by_method_and_version(tmp_path):
    only_minmax = [TensorRange("a", 1.0, "minmax")]
    assert write_trt_cache(tmp_path / "m", only_minmax, version=100300).read_text().startswith("TRT-100300-MinMaxCalibration\n")
    mixed = only_minmax + [TensorRange("b", 1.0, "percentile")]
    assert write_trt_cache(tmp_path / "e", mixed).read_text().startswith("TRT-8601-EntropyCalibration2\n")
    assert write_trt_cache(tmp_path / "l", mixed, algorithm="LegacyCalibration").read_text().startswith("TRT-8601-LegacyCalibration\n")


def test_trt_cache_reader_accepts_unpadded_values_and_spacing():
    parsed = parse_trt_cache("TRT-8601-MinMaxCalibration\ndata: 0\n(Unnamed Layer* 3) [Activation]_output:3caa54fc\n\n")
    assert parsed.algorithm == "MinMaxCalibration"
    assert parsed.ranges["data"].amax == 0.0 and parsed.ranges["data"].method == "minmax"
    assert parsed.ranges["(Unnamed Layer* 3) [Activation]_output"].scale == pytest.approx(0.020792, abs=1e-6)


def test_trt_cache_reader_errors(tmp_path):
    with pytest.raises(InputError, match="empty"):
        parse_trt_cache("")
    with pytest.raises(InputError, match="header"):
        parse_trt_cache("x: 3caa54fc\n")
    with pytest.raises(InputError, match="line 2"):
        parse_trt_cache("TRT-8601-EntropyCalibration2\nno value here\n")
    with pytest.raises(InputError, match="line 3.*hex"):
        parse_trt_cache("TRT-8601-EntropyCalibration2\na: 0\nb: 3caa54fc00\n")
    with pytest.raises(InputError, match="finite"):
        parse_trt_cache("TRT-8601-EntropyCalibration2\na: 7fc00000\n")  # NaN
    with pytest.raises(InputError, match="finite"):
        parse_trt_cache("TRT-8601-EntropyCalibration2\na: bf800000\n")  # -1.0
    with pytest.raises(InputError, match="not found"):
        read_trt_cache(tmp_path / "missing.cache")
    with pytest.raises(InputError, match="cannot be written"):
        write_trt_cache(tmp_path / "bad.cache", [TensorRange("a\nb", 1.0, "minmax")])


def test_writes_are_atomic(tmp_path, monkeypatch):
    calls = []
    real = cache.write_text_atomic
    monkeypatch.setattr(cache, "write_text_atomic", lambda path, text: calls.append(path) or real(path, text))
    write_trt_cache(tmp_path / "c.cache", RANGES)
    save_ranges(tmp_path / "r.json", RANGES, "f" * 64)
    assert calls == [tmp_path / "c.cache", tmp_path / "r.json"]
    with pytest.raises(InputError, match="output folder"):
        write_trt_cache(tmp_path / "no" / "c.cache", RANGES)
