"""The executor interface (``calibration.executor``), shard planning, the Ray flags without Ray,
and ``optimize batch`` in-process (the Ray runs are in test_ray.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from calibration.executor import InProcessExecutor, check_calib_batch_size, fans_out
from calibration.shards import shard_bounds, source_paths
from optimizer.batch import load_items
from optimizer.cli import main
from optimizer.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "sample_models" / "zoo"


def _square(x: int) -> int:
    return x * x


def test_in_process_executor_maps_in_order_and_records_the_stage():
    executor = InProcessExecutor()
    assert executor.map(_square, [(3,), (1,), (2,)], stage="squares") == [9, 1, 4]
    (stage,) = executor.stages
    assert stage.stage == "squares" and stage.tasks == 3 and 0 <= stage.task_s <= stage.wall_s
    assert executor.describe()["stages"][0]["tasks"] == 3
    assert executor.share(b"abc") == b"abc"


def test_calib_batch_size_is_checked_and_only_real_executors_fan_out():
    assert check_calib_batch_size(None) == 16 and check_calib_batch_size(4) == 4
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="calib_batch_size"):
            check_calib_batch_size(bad)
    assert not fans_out(None) and not fans_out(InProcessExecutor()) and fans_out(InProcessExecutor(workers=3))


def test_optimize_refuses_a_bad_calib_batch_size_and_passes_read_the_context():
    from optimizer.api import optimize

    with pytest.raises(InputError, match="calib_batch_size"):
        optimize(ROOT / "sample_models" / "digits_cnn" / "model.onnx", "int8", calib_batch_size=0)
    executor = InProcessExecutor(workers=2)
    result = optimize(ROOT / "sample_models" / "digits_cnn" / "model.onnx", "int8", executor=executor,
                      calibration=ROOT / "sample_models" / "digits_cnn" / "calib.npz", evaluate_accuracy=False)
    # the quantize pass read PassContext.executor: its calibration and method selection ran as tasks
    assert {"calibration", "method selection"} <= {s.stage for s in executor.stages}
    assert result.report.executor["workers"] == 2


def test_shard_bounds_cover_every_sample_once_on_the_fixed_batch_grid():
    for total, shards, align in [(100, 4, 1), (10, 4, 1), (3, 8, 1), (96, 5, 8), (1, 2, 1)]:
        bounds = shard_bounds(total, shards, align)
        covered = [i for lo, hi in bounds for i in range(lo, hi)]
        assert covered == list(range(total)) and len(bounds) <= shards
        assert all(lo % align == 0 for lo, _ in bounds)
    assert source_paths(object()) == []


def test_workers_and_ray_flags_say_how_to_install_ray(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    model = str(ZOO / "norm_act.onnx")
    for flags in (["--workers", "2"], ["--ray", "auto"]):
        assert main([model, "--no-eval", "-o", "/dev/null", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and 'pip install "onnx-trt-optimizer[ray]"' in err
    assert main([model, "--workers", "2", "--ray", "auto"]) == 2  # one or the other
    assert main([model, "--no-eval", "--calib-batch-size", "0"]) == 2
    assert "--calib-batch-size must be a positive integer" in capsys.readouterr().err


def test_manifest_gives_each_model_its_own_options(tmp_path):
    (tmp_path / "manifest.toml").write_text(
        '[defaults]\nargs = ["--no-eval"]\n\n'
        '[[model]]\npath = "a.onnx"\ncalib = "a.npz"\nprecision = "int8"\nargs = ["--calib-method", "minmax"]\n\n'
        '[[model]]\npath = "sub/a.onnx"\n'
    )
    first, second = load_items(tmp_path / "manifest.toml", ["--verify", "structural"])
    assert first.path == str(tmp_path / "a.onnx") and first.name == "a"
    assert first.args == ["--no-eval", "--verify", "structural", "--calib", str(tmp_path / "a.npz"), "--int8",
                          "--calib-method", "minmax"]
    assert second.name == "a-2" and second.args == ["--no-eval", "--verify", "structural"]
    (tmp_path / "bad.toml").write_text('[[model]]\npath = "a.onnx"\nprecison = "int8"\n')
    with pytest.raises(InputError, match="unknown key"):
        load_items(tmp_path / "bad.toml", [])
    with pytest.raises(InputError, match="holds no .onnx"):
        load_items(tmp_path, [])


def test_batch_in_process_keeps_going_past_a_broken_model(tmp_path, capsys):
    (tmp_path / "manifest.toml").write_text(
        f'[[model]]\npath = "{ZOO / "norm_act.onnx"}"\ncalib = "{ZOO / "norm_act.npz"}"\nprecision = "int8"\n\n'
        '[[model]]\npath = "missing.onnx"\n\n'
        f'[[model]]\npath = "{ZOO / "hf_bert.onnx"}"\nname = "bert"\nargs = ["--fp16"]\n'
    )
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "manifest.toml"), "-o", str(out), "--no-eval"]) == 1
    captured = capsys.readouterr()
    assert "2 of 3 model(s) optimized" in captured.out and "missing failed" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["ok", "failed", "ok"]
    assert summary["results"][1]["exit_code"] == 2 and (out / "bert.opt.onnx").is_file()
    assert json.loads((out / "norm_act.report.json").read_text())["status"] == "ok"
    # a manifest that does not exist is bad usage
    assert main(["batch", str(tmp_path / "manifest.toml").replace("manifest", "none"), "-o", str(out)]) == 2
