"""Per-channel statistics (calibration/channel_stats.py): exact against numpy, batch-size independent."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from helpers import run
from onnx import TensorProto, helper, numpy_helper

from calibration.channel_stats import ChannelStatistics, collect_channel_stats
from calibration.collect import augment_model
from calibration.sources import SyntheticSource
from optimizer.errors import InputError


def block(channels: int = 16, hidden: int = 24, seed: int = 0) -> onnx.ModelProto:
    """x [N,S,C] -> MatMul -> h [N,S,H] -> Relu -> r -> Reshape [N*S, H] -> flat; plus an int64 Shape."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (channels, hidden)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, hidden], np.int64), "flat_shape")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
    ]
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, channels])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [None, hidden]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
        [w, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def data(n: int = 50, channels: int = 16, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 1, (n, 5, channels)).astype(np.float32)
    x[..., 3] *= 40.0  # an outlier channel
    return x


def full_values(model, x, names):
    out = run(augment_model(model, [n for n in names if n != "x"]), {"x": x})
    out["x"] = x
    return {n: out[n].reshape(-1, out[n].shape[-1]).astype(np.float64) for n in names}


def test_statistics_match_numpy_on_all_the_data():
    model, x = block(), data()
    names = ["x", "h", "r", "flat"]
    stats = collect_channel_stats(model, names, {"x": x}, max_rows=64, batch_size=7)
    assert isinstance(stats, ChannelStatistics) and list(stats) == names
    assert stats.samples == 50 and stats.batches == 8 and stats.skipped == {} and not stats.synthetic
    ref = full_values(model, x, names)
    for name, s in stats.items():
        rows = ref[name]
        assert s.rows == rows.shape[0] == 250 and s.channels == rows.shape[1]
        np.testing.assert_allclose(s.amax, np.abs(rows).max(axis=0), rtol=1e-7, err_msg=name)
        np.testing.assert_allclose(s.mean_abs, np.abs(rows).mean(axis=0), rtol=1e-12, err_msg=name)
        assert s.sample.shape == (64, rows.shape[1]) and s.sample.dtype == np.float32
        # every kept row is a real row of the tensor, and they come in data order
        positions = [int(np.flatnonzero((rows == r.astype(np.float64)).all(axis=1))[0]) for r in s.sample]
        assert positions == sorted(positions) and len(set(positions)) == 64
    assert stats["x"].amax[3] > 20 * np.median(stats["x"].amax)  # the outlier channel shows


def test_batch_size_does_not_change_the_result():
    model, x = block(), data(37)
    one = collect_channel_stats(model, ["x", "r", "flat"], {"x": x}, max_rows=40, batch_size=1)
    seven = collect_channel_stats(model, ["x", "r", "flat"], {"x": x}, max_rows=40, batch_size=7)
    assert one.batches == 37 and seven.batches == 6
    for name in one:
        a, b = one[name], seven[name]
        assert a.rows == b.rows
        assert np.array_equal(a.amax, b.amax) and np.array_equal(a.mean_abs, b.mean_abs), name
        assert np.array_equal(a.sample, b.sample), name


def test_all_rows_kept_when_there_are_fewer_than_max_rows_and_none_with_zero():
    model, x = block(), data(4)
    stats = collect_channel_stats(model, ["x"], {"x": x}, max_rows=1000)
    np.testing.assert_array_equal(stats["x"].sample, x.reshape(-1, 16))
    assert collect_channel_stats(model, ["x"], {"x": x}, max_rows=0)["x"].sample.shape == (0, 16)
    with pytest.raises(InputError, match="max_rows"):
        collect_channel_stats(model, ["x"], {"x": x}, max_rows=-1)


def test_skips_with_reasons_and_counts_nonfinite_rows():
    model = block()
    x = data(6)
    x[2, 1, 0] = np.nan
    stats = collect_channel_stats(model, ["x", "w", "shape", "nope"], {"x": x}, max_rows=100)
    assert list(stats) == ["x"]
    assert "initializer" in stats.skipped["w"] and "floating-point" in stats.skipped["shape"]
    assert "no tensor" in stats.skipped["nope"]
    s = stats["x"]
    assert s.nonfinite == 1 and s.rows == 30 and s.sample.shape == (29, 16) and np.isfinite(s.sample).all()
    finite = np.delete(x.reshape(-1, 16), 2 * 5 + 1, axis=0).astype(np.float64)
    np.testing.assert_allclose(s.amax, np.abs(finite).max(axis=0))
    np.testing.assert_allclose(s.mean_abs, np.abs(finite).mean(axis=0), rtol=1e-12)


def _peak(model, source) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        collect_channel_stats(model, ["x", "h", "r", "flat"], source, max_rows=128, batch_size=16)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_samples():
    model = block(channels=128, hidden=256)
    _peak(model, SyntheticSource(32))  # warm-up: lazy imports and caches are not ours to count
    peak_32 = _peak(model, SyntheticSource(32))
    peak_512 = _peak(model, SyntheticSource(512))
    assert peak_512 <= 1.2 * peak_32 + 64 * 1024, (peak_32, peak_512)
    assert peak_512 < 512 * 5 * (128 + 3 * 256) * 4  # far below holding the activations
