"""Streaming statistics collection: exact running stats, growing histograms, reservoir, memory."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import onnx
import pytest
from helpers import parse_model, run
from onnx import TensorProto, helper, numpy_helper

from calibration.collect import (
    CalibrationStatistics,
    TensorStats,
    augment_model,
    canonical_range,
    collect_channel_means,
    collect_statistics,
)
from calibration.executor import InProcessExecutor
from calibration.sources import SyntheticSource
from optimizer.errors import InputError


def mlp(inputs: int = 16, hidden: int = 32, outputs: int = 4, batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> MatMul -> Add -> y, with a Shape side output (int64)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (inputs, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.5, (hidden, outputs)).astype(np.float32), "w2")
    bias = numpy_helper.from_array(rng.normal(0, 1, (outputs,)).astype(np.float32), "bias")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "bias"], ["y"], name="add"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, outputs]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [w1, w2, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_values(model, data, names):
    """Every requested tensor over all of ``data`` at once (the non-streaming answer)."""
    outputs = run(augment_model(model, names), {"x": data})
    values = {n: outputs[n] for n in names if n in outputs}
    values["x"] = data
    return values


def test_running_stats_match_numpy_over_all_data():
    model = mlp()
    data = np.random.default_rng(1).normal(0, 2, (100, 16)).astype(np.float32)
    stats = collect_statistics(model, ["x", "h", "r", "y"], {"x": data}, batch_size=7, num_bins=256)
    assert isinstance(stats, CalibrationStatistics) and list(stats) == ["x", "h", "r", "y"]
    assert stats.samples == 100 and stats.batches == 15 and stats.synthetic is False and stats.skipped == {}
    ref = reference_values(model, data, ["h", "r", "y"])
    for name, s in stats.items():
        values = ref[name].astype(np.float64)
        assert s.count == values.size
        assert s.min == pytest.approx(values.min(), rel=1e-6) and s.max == pytest.approx(values.max(), rel=1e-6)
        assert s.amax == pytest.approx(np.abs(values).max(), rel=1e-6)
        assert s.hist.sum() == values.size
        assert s.hist_range / 2 <= s.amax < s.hist_range  # the data spans more than half the bins
        # re-binning is exact: the grown histogram equals one computed over all values at once
        expected, _ = np.histogram(np.abs(ref[name]), bins=256, range=(0.0, s.hist_range))
        np.testing.assert_array_equal(s.hist, expected, err_msg=name)
        assert 0 < s.sample.size <= 4096 and np.isin(s.sample, ref[name]).all()


def test_histogram_range_doubles_and_merges_bins_pairwise():
    s = TensorStats("t", num_bins=8, sample_size=0)
    s.update(np.array([0.1, 0.6, 0.9], np.float32))  # range 1.0 (the power of two above 0.9), bin width 0.125
    assert s.hist_range == 1.0 and s.hist.tolist() == [1, 0, 0, 0, 1, 0, 0, 1]
    s.update(np.array([3.5], np.float32))  # 1 -> 2 -> 4: bins merged twice
    assert s.hist_range == 4.0
    # [1,0,0,0,1,0,0,1] -> [1,0,1,1,0,0,0,0] -> [1,2,0,0,0,0,0,0], then 3.5 lands in bin 7
    assert s.hist.tolist() == [1, 2, 0, 0, 0, 0, 0, 1]
    s.update(np.array([-0.3, 2.1], np.float32))
    assert s.hist.tolist() == [2, 2, 0, 0, 1, 0, 0, 1] and s.min == pytest.approx(-0.3) and s.amax == 3.5
    # a power of two is the lower edge of the next range: the range stays half-open
    assert TensorStats.from_array("p", np.array([1.0], np.float32), num_bins=8).hist_range == 2.0
    assert canonical_range(0.75) == 1.0 and canonical_range(1.0) == 2.0 and canonical_range(3e-9) == 2.0**-28


def test_zeros_before_the_first_nonzero_batch_and_nonfinite_values():
    s = TensorStats("t", num_bins=4)
    s.update(np.zeros(5, np.float32))
    assert s.hist_range == 0.0 and s.hist.tolist() == [5, 0, 0, 0]
    s.update(np.array([2.0, np.nan, np.inf, -1.0], np.float32))
    assert s.hist_range == 4.0 and s.hist.tolist() == [5, 1, 1, 0]
    assert s.nonfinite == 2 and s.count == 7 and s.min == -1.0 and s.max == 2.0
    for bad in (7, 6):
        with pytest.raises(InputError, match="power of two"):
            TensorStats("t", num_bins=bad)


def _stats_in_batches(values: np.ndarray, cuts, seed: int = 0, start: int = 0, **options) -> TensorStats:
    """``values`` [samples, ...] folded in as batches split at ``cuts`` (sample indices), the first
    sample having global index ``start``."""
    s = TensorStats("t", seed=seed, **options)
    for chunk in np.array_split(values, cuts):
        s.update(chunk, start, chunk.shape[0])
        start += chunk.shape[0]
    return s


def test_sample_is_keyed_by_position_uniform_and_batch_independent():
    values = np.arange(100_000, dtype=np.float32).reshape(1000, 100)  # 1000 samples of 100 values
    a = _stats_in_batches(values, [1, 500, 501, 900], sample_size=500).sample  # very uneven batches
    b = _stats_in_batches(values, list(range(7, 1000, 7)), sample_size=500).sample
    np.testing.assert_array_equal(a, b)  # same values in the same (key) order
    assert a.size == 500 and np.unique(a).size == 500  # without replacement
    assert not np.array_equal(np.sort(a), np.sort(_stats_in_batches(values, [10], seed=1, sample_size=500).sample))
    # uniform over the whole stream: each decile holds ~10 %
    pooled = np.concatenate([_stats_in_batches(values, [300], seed=seed, sample_size=500).sample for seed in range(20)])
    deciles = np.histogram(pooled, bins=10, range=(0, 100_000))[0] / pooled.size
    assert np.all(np.abs(deciles - 0.1) < 0.015), deciles


def _same_stats(a: TensorStats, b: TensorStats) -> None:
    assert (a.count, a.nonfinite, a.min, a.max, a.amax, a.hist_range) == (b.count, b.nonfinite, b.min, b.max, b.amax, b.hist_range)
    np.testing.assert_array_equal(a.hist, b.hist)
    np.testing.assert_array_equal(a.sample, b.sample)
    np.testing.assert_array_equal(a._keys, b._keys)


def test_merging_shards_in_any_order_equals_one_pass():
    rng = np.random.default_rng(3)
    # shards of very different magnitude, so their histogram ranges differ by many doublings
    values = np.concatenate([rng.normal(0, 0.01, (40, 30)), rng.normal(0, 50, (25, 30)), rng.normal(0, 1, (35, 30))]).astype(np.float32)
    values[50, 3] = np.nan
    one_pass = _stats_in_batches(values, [16, 32, 48, 64, 80, 96], num_bins=256, sample_size=300)
    bounds = [(0, 40), (40, 65), (65, 100)]
    shards = [_stats_in_batches(values[lo:hi], [7], start=lo, num_bins=256, sample_size=300) for lo, hi in bounds]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        merged = TensorStats("t", 256, 300)
        for i in order:
            merged.merge(shards[i])
        _same_stats(merged, one_pass)
    with pytest.raises(InputError, match="cannot merge"):
        TensorStats("t", 128).merge(one_pass)


def test_collect_statistics_is_identical_for_every_batch_size_and_sharding():
    model = mlp()
    data = np.random.default_rng(5).normal(0, 2, (45, 16)).astype(np.float32)
    results = [collect_statistics(model, ["x", "h", "r", "y"], {"x": data}, batch_size=b, num_bins=256) for b in (1, 7, 32)]
    executor = InProcessExecutor(workers=3)
    sharded = collect_statistics(model, ["x", "h", "r", "y"], {"x": data}, 5, num_bins=256, executor=executor)
    assert sharded.shards == 6 and executor.stages[0].tasks == 6
    for stats in results[1:] + [sharded]:
        assert list(stats) == list(results[0]) and stats.samples == 45
        for name in stats:
            _same_stats(stats[name], results[0][name])


def test_channel_means_are_exact_for_every_batch_size():
    model = mlp()
    data = np.random.default_rng(6).normal(0, 2, (45, 16)).astype(np.float32)
    means = [collect_channel_means(model, {"x": -1, "r": -1}, {"x": data}, batch_size=b) for b in (1, 7, 32)]
    for m in means[1:]:
        for name in ("x", "r"):
            np.testing.assert_array_equal(m.means[name], means[0].means[name])
    exact = [math.fsum(col) / 45 for col in data.astype(np.float64).T]  # fsum: the correctly rounded sum
    np.testing.assert_allclose(means[0].means["x"], exact, rtol=1e-15, atol=0)


def test_channel_mean_squares_are_exact_for_every_batch_size():
    # what prune-channels' activation statistics (mean and std per channel) are built on
    model = mlp()
    data = np.random.default_rng(7).normal(1, 3, (45, 16)).astype(np.float32)
    stats = [collect_channel_means(model, {"x": -1}, {"x": data}, batch_size=b, squares=True) for b in (1, 7, 32)]
    for m in stats[1:]:
        np.testing.assert_array_equal(m.mean_squares["x"], stats[0].mean_squares["x"])
    exact = [math.fsum(v * v for v in col) / 45 for col in data.astype(np.float64).T]
    np.testing.assert_allclose(stats[0].mean_squares["x"], exact, rtol=1e-15, atol=0)
    assert not collect_channel_means(model, {"x": -1}, {"x": data}).mean_squares  # only when asked


def test_skips_tensors_it_cannot_expose_and_says_why():
    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 4] x, bool c) => (float[N, 4] y) {
            w = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
            a = Mul(x, w)
            y = If(c) <
                then_branch = t () => (float[N, 4] t1) { t1 = Relu(a) },
                else_branch = e () => (float[N, 4] e1) { e1 = Neg(a) }
            >
            s = Shape(x)
        }
        """
    )
    model.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "unused_weight"))
    stats = collect_statistics(
        model, ["a", "t1", "s", "missing", "unused_weight", "y", "a"], SyntheticSource(6), batch_size=4
    )
    assert list(stats) == ["a", "y"]
    assert "subgraph" in stats.skipped["t1"]
    assert "no tensor" in stats.skipped["missing"] and "initializer" in stats.skipped["unused_weight"]
    assert "INT64" in stats.skipped["s"]
    assert stats.synthetic and any("synthetic" in w for w in stats.warnings)


def test_integer_tensors_are_skipped():
    stats = collect_statistics(mlp(), ["shape", "r"], SyntheticSource(4), batch_size=4)
    assert list(stats) == ["r"] and "INT64" in stats.skipped["shape"]


def test_progress_and_fixed_batch():
    model = mlp(batch=3)
    calls, advanced = [], []

    def progress(description, total):
        calls.append((description, total))
        return lambda n=1: advanced.append(n)

    stats = collect_statistics(model, ["h"], SyntheticSource(10), batch_size=16, progress=progress)
    assert calls == [("calibrating", 9)] and advanced == [3, 3, 3]
    assert stats.samples == 9 and any("dropped" in w for w in stats.warnings)


def test_max_samples_and_empty_sources():
    stats = collect_statistics(mlp(), ["r"], SyntheticSource(50), batch_size=8, max_samples=20)
    assert stats.samples == 20 and stats["r"].count == 20 * 32
    with pytest.raises(InputError, match="no calibration samples"):
        collect_statistics(mlp(), ["r"], {"x": np.zeros((0, 16), np.float32)})


def test_model_is_not_modified():
    model = mlp()
    before = model.SerializeToString()
    collect_statistics(model, ["h", "r"], SyntheticSource(4))
    assert model.SerializeToString() == before


def _peak_bytes(model, tensors, source) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        collect_statistics(model, tensors, source, batch_size=16)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["synthetic", "npy"])
def test_memory_does_not_grow_with_the_number_of_samples(tmp_path, kind):
    """Peak traced memory (numpy buffers included) over 512 samples stays at the 32-sample level."""
    model = mlp(inputs=256, hidden=512, outputs=64)
    tensors = ["x", "h", "r", "m", "y"]

    def source(n):
        if kind == "synthetic":
            return SyntheticSource(n)
        folder = tmp_path / str(n)
        folder.mkdir()
        np.save(folder / "x.npy", np.random.default_rng(n).normal(size=(n, 256)).astype(np.float32))
        return str(folder)

    small, large = source(32), source(512)
    _peak_bytes(model, tensors, small)  # warm-up: lazy imports and caches are not ours to count
    peak_32 = _peak_bytes(model, tensors, small)
    peak_512 = _peak_bytes(model, tensors, large)
    print(f"tracemalloc peak ({kind}): 32 samples {peak_32:,} B, 512 samples {peak_512:,} B")
    assert peak_512 <= 1.2 * peak_32 + 64 * 1024, (peak_32, peak_512)
    # and 512 samples of activations would be far more than the peak: nothing accumulates
    assert peak_512 < 512 * (256 + 512 + 512 + 64 + 64) * 4
