"""Scale-out on a real local Ray cluster (issue 14): sharded calibration is bit-identical to the
in-process run, failed tasks are retried, ``--workers`` and ``optimize batch`` work end to end.
Marked ``ray`` (deselect with ``-m 'not ray'``); one cluster of 2 CPUs for the whole module."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibration.collect import collect_statistics
from optimizer.cli import main

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "sample_models" / "zoo"


@pytest.fixture(scope="module")
def cluster():
    from optimizer.ray_executor import RayExecutor

    import sys

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # workers cannot import this test module: ship its task functions (_flaky) by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield RayExecutor()
    finally:
        ray.shutdown()


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _same(a, b) -> None:
    assert list(a) == list(b) and a.samples == b.samples
    for name in a:
        x, y = a[name], b[name]
        assert (x.count, x.min, x.max, x.amax, x.hist_range) == (y.count, y.min, y.max, y.amax, y.hist_range), name
        np.testing.assert_array_equal(x.hist, y.hist)
        np.testing.assert_array_equal(x.sample, y.sample)


def test_sharded_statistics_equal_the_in_process_ones(cluster):
    model = onnx.load(ROOT / "sample_models" / "digits_cnn" / "model.onnx")
    names = [o for node in model.graph.node for o in node.output]
    calib = ROOT / "sample_models" / "digits_cnn" / "calib.npz"
    local = collect_statistics(model, names, calib)
    sharded = collect_statistics(model, names, calib, 7, executor=cluster)
    assert sharded.shards == 4 and cluster.stages[-1].stage == "calibration" and cluster.stages[-1].tasks == 4
    _same(local, sharded)


@pytest.mark.parametrize("model, calib", [
    ("sample_models/digits_cnn/model.onnx", "sample_models/digits_cnn/calib.npz"),
    ("sample_models/zoo/mobilenet_v2_tiny.onnx", "sample_models/zoo/mobilenet_v2_tiny.npz"),
])
def test_workers_2_writes_a_byte_identical_model(cluster, tmp_path, model, calib):
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    base = [str(ROOT / model), "--int8", "--calib", str(ROOT / calib), "--no-eval"]
    assert main(base + ["-o", str(one), "--calib-batch-size", "32"]) == 0
    assert main(base + ["-o", str(two), "--workers", "2", "--report", str(tmp_path / "r.json")]) == 0
    assert _digest(one) == _digest(two)
    executor = json.loads((tmp_path / "r.json").read_text())["executor"]
    assert executor["name"] == "ray" and executor["workers"] == 2 and executor["cpus"] == 2 and executor["nodes"] == 1
    assert executor["stages"] and executor["stages"][0]["tasks"] >= 2


def _flaky(marker: str, value: int) -> int:
    """Fails on its first attempt (a marker file remembers), succeeds on the retry."""
    path = Path(marker)
    attempts = int(path.read_text()) if path.exists() else 0
    path.write_text(str(attempts + 1))
    if attempts == 0:
        raise RuntimeError("transient failure")
    return value * 2


def test_a_failed_task_is_retried(cluster, tmp_path):
    markers = [str(tmp_path / f"m{i}") for i in range(3)]
    assert cluster.map(_flaky, [(m, i) for i, m in enumerate(markers)], stage="flaky") == [0, 2, 4]
    assert [Path(m).read_text() for m in markers] == ["2", "2", "2"]  # each failed once, then ran again


def _die_once(marker: str) -> str:
    """Kills its worker process on the first attempt; Ray starts another and retries the task."""
    import os

    path = Path(marker)
    if not path.exists():
        path.write_text("died")
        os._exit(1)
    return "survived"


def test_a_task_whose_worker_dies_is_retried(cluster, tmp_path):
    assert cluster.map(_die_once, [(str(tmp_path / "marker"),)], stage="die") == ["survived"]


def test_a_user_error_in_a_task_is_not_retried_and_reaches_the_caller(cluster, tmp_path):
    from calibration.shards import check_readable
    from calibration.sources import NpyFolderSource
    from optimizer.errors import InputError

    gone = NpyFolderSource(tmp_path / "not-mounted-here", "per-input", {})
    with pytest.raises(InputError, match="not readable on worker node"):
        cluster.map(check_readable, [(gone,)], stage="check")


def test_batch_over_zoo_models_with_one_broken(cluster, tmp_path):
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    for name in ("mobilenet_v2_tiny", "hf_bert", "norm_act"):
        (fleet / f"{name}.onnx").write_bytes((ZOO / f"{name}.onnx").read_bytes())
    (fleet / "broken.onnx").write_bytes(b"not an onnx model")
    out = tmp_path / "out"
    assert main(["batch", str(fleet), "-o", str(out), "--workers", "2", "--int8", "--no-eval"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {r["name"]: r["status"] for r in summary["results"]}
    assert status == {"broken": "failed", "hf_bert": "ok", "mobilenet_v2_tiny": "ok", "norm_act": "ok"}
    assert summary["executor"]["name"] == "ray" and summary["executor"]["stages"][0]["tasks"] == 4
    for name in ("hf_bert", "mobilenet_v2_tiny", "norm_act"):
        onnx.checker.check_model(str(out / f"{name}.opt.onnx"))
        assert json.loads((out / f"{name}.report.json").read_text())["status"] == "ok"
    assert "not a valid ONNX model" in next(r["error"] for r in summary["results"] if r["name"] == "broken")


DIGITS = ROOT / "sample_models" / "digits_cnn"


def test_evaluation_on_two_workers_equals_one_process(cluster):
    from optimizer.api import optimize
    from optimizer.evaluate import evaluate

    original = onnx.load(DIGITS / "model.onnx")
    optimized = optimize(DIGITS / "model.onnx", "int8", calibration=DIGITS / "calib.npz", evaluate_accuracy=False).model
    single = evaluate(original, optimized, DIGITS / "eval.npz", metric="top1")
    sharded = evaluate(original, optimized, DIGITS / "eval.npz", metric="top1", executor=cluster)
    assert cluster.stages[-1].stage == "evaluation" and cluster.stages[-1].tasks == 4
    assert sharded.to_dict() == single.to_dict() and single.samples == 450


def test_budget_on_ray_equals_the_in_process_run(cluster):
    from optimizer.api import optimize

    data = np.load(DIGITS / "calib.npz")
    calibration = {"input": data["input"][:4] * 0.1}  # a poor calibration: INT8 costs accuracy
    args = dict(data=DIGITS / "eval.npz", calibration=calibration, max_accuracy_drop=0.0)
    local = optimize(DIGITS / "model.onnx", "default,quantize-int8(method=minmax)", **args)
    first = len(cluster.stages)
    remote = optimize(DIGITS / "model.onnx", "default,quantize-int8(method=minmax)", executor=cluster, **args)
    assert local.report.budget["fallbacks"] and local.report.budget == remote.report.budget
    assert local.model.SerializeToString() == remote.model.SerializeToString()
    assert local.report.accuracy.to_dict() == remote.report.accuracy.to_dict()
    stages = {s.stage for s in cluster.stages[first:]}
    assert {"layer ranking", "budget search", "evaluation"} <= stages


def test_bisect_on_ray_names_the_in_process_pass(cluster, tmp_path):
    from optimizer.regression import check_regression

    data = np.load(DIGITS / "calib.npz")
    np.savez(tmp_path / "one.npz", input=data["input"][:1] * 0.05)
    args = dict(calibration=str(tmp_path / "one.npz"), data=str(DIGITS / "eval.npz"), max_accuracy_drop=0.5, bisect=True)
    pipeline = "cleanup,fuse-conv-bn,quantize-int8(method=minmax),cleanup"
    local = check_regression(DIGITS / "model.onnx", pipeline, **args)
    remote = check_regression(DIGITS / "model.onnx", pipeline, executor=cluster, **args)
    assert local.first_bad_pass == remote.first_bad_pass == "quantize-int8(method=minmax)"
    assert local.to_dict()["bounds"] == remote.to_dict()["bounds"]
    assert any(s.stage == "bisect" and s.tasks == 2 for s in cluster.stages)
