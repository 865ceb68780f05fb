"""From PyTorch in one call (``from_torch``), ``optimize model.pt2``, and torch data as calibration data."""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np
import onnx
import pytest

from calibration.torch_data import TorchDataSource, adapt
from optimizer.errors import InputError
from optimizer.runtime import InputSpec

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from optimizer import from_torch  # noqa: E402
from optimizer.cli import main  # noqa: E402

#: the tests sharing the module-scoped INT8 run stay on one xdist worker, so it is built once
SHARED_RUN = pytest.mark.xdist_group("torch-cnn-int8")


class SmallCNN(torch.nn.Module):
    """Conv-BN-ReLU twice, a residual Add, global pooling and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, image):
        y = torch.relu(self.bn1(self.conv1(image)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


def trained_like(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics (fresh ones are the identity), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module.eval()


class Encoder(torch.nn.Module):
    """Token features (batch, sequence, 32) -> LayerNorm, MLP with GELU, mean over the sequence."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(32, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.out = torch.nn.Linear(64, 8)

    def forward(self, tokens):
        h = torch.nn.functional.gelu(self.norm(self.inp(tokens)))
        return self.out(h).mean(1)


class Branchy(torch.nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it, TorchScript's tracer can."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        if float(x.mean()) > 0:  # data-dependent branch
            x = x * 2.0
        return self.fc2(torch.relu(self.fc1(x)))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def metrics(report, kind: str) -> list[dict]:
    return list(report.torch[kind].values())


@pytest.fixture(scope="module")
def cnn_int8(tmp_path_factory):
    """One INT8 run of the CNN calibrated from a DataLoader (batch 7: items do not align with the
    model's batches), plus the same samples as an .npz."""
    out = tmp_path_factory.mktemp("cnn")
    module = trained_like(SmallCNN())
    calib = images(64, seed=1)
    loader = DataLoader(TensorDataset(calib), batch_size=7)
    result = from_torch(module, (images(2),), dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                        pipeline="int8", calibration=loader, output=out / "cnn.int8.onnx")
    np.savez(out / "calib.npz", image=calib.numpy())
    return module, result, out


@SHARED_RUN
def test_cnn_int8_from_a_dataloader_agrees_with_pytorch(cnn_int8):
    module, result, out = cnn_int8
    report = result.report
    assert report.status == "ok" and (out / "cnn.int8.onnx").exists()
    assert report.torch["exporter"] == "dynamo" and report.torch["fallback_reason"] is None
    assert report.torch["exporter_agrees"] is True
    assert all(m["max_rel"] < 1e-4 for m in metrics(report, "vs_exported"))
    assert all(m["cosine"] >= 0.99 for m in metrics(report, "vs_optimized"))
    quant = next(p for p in report.passes if p.name == "quantize-int8")
    assert quant.changed and quant.stats["quantized_nodes"] >= 3
    assert report.samples["calibration"]["source"].startswith("<torch DataLoader")
    assert report.samples["calibration"]["samples"] == 48 and report.samples["held_out"] == 16
    d = report.to_dict()
    assert set(d["torch"]) >= {"exporter", "fallback_reason", "vs_exported", "vs_optimized"}
    assert "## PyTorch vs ONNX" in report.to_markdown()
    json.dumps(d)
    model = onnx.load(str(out / "cnn.int8.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def _graph_bytes(model: onnx.ModelProto) -> tuple[list[bytes], list[bytes]]:
    return ([t.SerializeToString() for t in model.graph.initializer], [n.SerializeToString() for n in model.graph.node])


@SHARED_RUN
def test_int8_with_a_dataloader_equals_int8_with_the_npz(cnn_int8):
    module, result, out = cnn_int8
    from_npz = from_torch(module, (images(2),), dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                          pipeline="int8", calibration=str(out / "calib.npz"))
    assert from_npz.report.samples["calibration"]["samples"] == 48
    assert _graph_bytes(result.model) == _graph_bytes(from_npz.model)


@pytest.mark.parametrize("pipeline", ["default", "int8"])
def test_dynamic_sequence_length_stays_dynamic(pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    module = Encoder().eval()
    g = torch.Generator().manual_seed(3)
    seq = torch.export.Dim("seq", min=2, max=256)
    # evaluation data of two sequence lengths: batches close where the length changes
    data = [torch.randn(4, 12, 32, generator=g), torch.randn(4, 12, 32, generator=g), torch.randn(3, 20, 32, generator=g)]
    calib = DataLoader(TensorDataset(torch.randn(40, 16, 32, generator=g)), batch_size=8)
    result = from_torch(module, (torch.randn(2, 12, 32, generator=g),),
                        dynamic_shapes={"tokens": {0: torch.export.Dim("batch"), 1: seq}}, pipeline=pipeline,
                        data=data, calibration=calib if pipeline == "int8" else None)
    report = result.report
    assert report.status == "ok" and report.torch["exporter"] == "dynamo"
    assert report.torch["samples"] == 8 and "first 8 sample(s)" in report.torch["inputs"]
    assert all(m["max_rel"] < 1e-4 for m in metrics(report, "vs_exported"))
    if pipeline == "default":  # lossless: within the EXACT ceiling (1e-3 of the output's magnitude)
        assert all(m["max_rel"] < 1e-3 for m in metrics(report, "vs_optimized"))
    else:
        assert all(m["cosine"] >= 0.99 for m in metrics(report, "vs_optimized"))
        assert next(p for p in report.passes if p.name == "quantize-int8").changed
    assert report.accuracy.samples == 11
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:2]] == ["batch", "seq"]
    from optimizer.metrics import compare_outputs
    from optimizer.runtime import OrtRunner

    runner = OrtRunner(result.model)
    for length in (5, 40):
        x = torch.randn(2, length, 32, generator=g)
        with torch.no_grad():
            want = module(x).numpy()
        got = next(iter(runner.run({"tokens": x.numpy()}).values()))
        if pipeline == "default":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        else:
            assert compare_outputs({"y": want}, {"y": got})[0].cosine >= 0.99
    assert list(tmp_path.iterdir()) == [tmp_path / "tmp"]  # no scratch files left, in the cwd or the temp folder,
    # beside torch's own compile cache (torchinductor_<user>, which torch.export creates on first use)
    assert [p.name for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")] == []


def test_dynamo_failure_falls_back_to_torchscript(tmp_path):
    module = Branchy().eval()
    g = torch.Generator().manual_seed(5)
    calib = torch.rand(40, 24, generator=g) + 0.1  # positive: the branch the tracer records is the one taken
    loader = DataLoader(TensorDataset(calib, torch.zeros(40, dtype=torch.long)), batch_size=8)  # (x, labels)
    result = from_torch(module, calib[:4], dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, pipeline="int8",
                        calibration=loader, data=loader)
    report = result.report
    assert report.torch["exporter"] == "torchscript"
    assert "data-dependent" in report.torch["fallback_reason"].lower() or "guard" in report.torch["fallback_reason"].lower()
    assert any("TorchScript exporter" in w and report.torch["fallback_reason"][:40] in w for w in report.warnings)
    assert report.torch["exporter_agrees"] is True
    assert all(m["cosine"] >= 0.99 for m in metrics(report, "vs_optimized"))
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert [o.name for o in result.model.graph.output] == ["output"]
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert report.accuracy.task is not None  # the DataLoader's second element became labels


def test_opset_below_13_is_refused():
    with pytest.raises(InputError, match="opset"):
        from_torch(Encoder().eval(), torch.randn(1, 4, 32), opset=12)


def test_without_torch_one_clear_line(monkeypatch):
    import optimizer

    entry = optimizer.from_torch  # importing the name never needs torch
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(InputError, match="pip install torch"):
        entry(object(), ())


# -- optimize model.pt2 -------------------------------------------------------------------------


def test_optimize_pt2_end_to_end(tmp_path, capsys):
    module = trained_like(SmallCNN(), seed=2)
    program = torch.export.export(module, (images(2),), dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(tmp_path / "model.pt2"))
    np.savez(tmp_path / "eval.npz", image=images(20, seed=4).numpy())
    code = main([str(tmp_path / "model.pt2"), "--data", str(tmp_path / "eval.npz"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)  # stdout holds only the JSON: the exporter's chatter is kept off it
    assert report["status"] == "ok" and report["model"]["path"] == str(tmp_path / "model.pt2")
    assert report["output"]["path"] == str(tmp_path / "model.opt.onnx")
    assert report["torch"]["exporter"] == "dynamo" and report["torch"]["samples"] == 8
    assert all(m["max_rel"] < 1e-3 for m in report["torch"]["vs_optimized"].values())
    fused = [p for p in report["passes"] if p["name"] == "fuse-conv-bn" and p["changed"]]
    assert report["summary"]["nodes"]["after"] <= report["summary"]["nodes"]["before"]
    assert fused or "BatchNormalization" not in json.dumps(report["passes"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.npz", "model.opt.onnx", "model.pt2"]
    optimized = onnx.load(str(tmp_path / "model.opt.onnx"))
    assert optimized.ir_version <= 13 and optimized.graph.input[0].name == "image"


def test_a_bad_pt2_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(b"not a zip archive")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("optimize: error: cannot load") and "\n" not in err
    assert main([str(tmp_path / "missing.pt2")]) == 2
    assert "not found" in capsys.readouterr().err


# -- torch data as a CalibrationSource ----------------------------------------------------------

SPECS = [InputSpec("x", np.dtype("float32"), ("batch", 4)), InputSpec("m", np.dtype("int64"), ("batch", 4))]


def test_torch_data_rebatches_and_reads_labels():
    x, m, y = torch.randn(10, 4), torch.ones(10, 4, dtype=torch.int64), torch.arange(10)
    loader = DataLoader(TensorDataset(x, m, y), batch_size=3)
    source = TorchDataSource(loader, ["x", "m"])
    assert source.num_samples == 10
    batches = list(source.labelled_batches(SPECS, 4))
    assert [b["x"].shape[0] for b, _ in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b, _ in batches]), x.numpy())
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in batches]), y.numpy())
    assert batches[0][0]["m"].dtype == np.int64


def test_torch_data_dicts_single_samples_and_generators():
    items = [{"x": torch.randn(4), "m": torch.zeros(4, dtype=torch.int64)} for _ in range(5)]  # unbatched samples
    source = TorchDataSource(iter(items), ["x", "m"], specs=SPECS)  # a one-shot iterator: kept in a list
    assert source.num_samples == 5
    assert [b["x"].shape for b in source.batches(SPECS, 2)] == [(2, 4), (2, 4), (1, 4)]
    assert sum(b["x"].shape[0] for b in source.batches(SPECS, 8)) == 5
    fixed = [InputSpec("x", np.dtype("float32"), (2, 4)), InputSpec("m", np.dtype("int64"), (2, 4))]
    assert [b["x"].shape[0] for b in source.batches(fixed, 8)] == [2, 2]
    assert any("dropped" in w for w in source.warnings)
    with pytest.raises(InputError, match="no entry for input"):
        TorchDataSource([{"x": torch.randn(2, 4)}], ["x", "m"]).check(SPECS)
    with pytest.raises(InputError, match="4 element"):
        list(TorchDataSource([(torch.randn(2, 4),) * 4], ["x", "m"]).batches(SPECS, 2))


def test_adapt_leaves_paths_and_arrays_alone():
    assert adapt("calib.npz", ["x"]) == "calib.npz"
    arrays = {"x": np.zeros((2, 4), np.float32)}
    assert adapt(arrays, ["x"]) is arrays
    assert adapt(None, ["x"]) is None
    converted = adapt({"x": torch.zeros(2, 4)}, ["x"])
    assert isinstance(converted["x"], np.ndarray)
    assert isinstance(adapt(DataLoader(TensorDataset(torch.zeros(2, 4))), ["x"]), TorchDataSource)
    shuffled = adapt(DataLoader(TensorDataset(torch.zeros(2, 4)), shuffle=True), ["x"])
    assert any("shuffle" in w for w in shuffled.warnings)
