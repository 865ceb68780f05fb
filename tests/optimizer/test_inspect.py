"""``optimize inspect``: stable JSON keys on every sample and zoo model, and dry-run counts that match
what ``optimize`` then does."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from helpers import SAMPLE_MODELS, SAMPLES

from optimizer.cli import main
from optimizer.inspect import KEYS

ZOO_MODELS = sorted((SAMPLES / "zoo").glob("*.onnx"))
ALL_MODELS = SAMPLE_MODELS + ZOO_MODELS
IDS = [p.parent.name if p.name == "model.onnx" else p.stem for p in ALL_MODELS]

MODEL_KEYS = {"path", "file_bytes", "ir_version", "opset", "opset_imports", "producer", "graph_name", "metadata"}
IO_KEYS = {"name", "dtype", "dims", "dynamic"}
OPS_KEYS = {"nodes", "main_graph_nodes", "subgraphs", "subgraph_nodes", "histogram", "custom_domains", "functions"}
PARAM_KEYS = {"params", "bytes", "tensors", "by_dtype"}
EXTERNAL_KEYS = {"tensors", "bytes", "files"}
SHAPES_KEYS = {"runs", "inputs", "source", "failure"}
DRY_KEYS = {"pipeline", "passes", "nodes", "params", "bytes", "rolled_back", "note", "time_s"}
PASS_KEYS = {"name", "spec", "iteration", "changed", "stats", "time_s", "nodes_before", "nodes_after",
             "params_before", "params_after", "bytes_before", "bytes_after", "rolled_back", "error"}
INT8_KEYS = {"quantized_layers", "quantized_activations", "quantized_weights", "float_reasons", "float_layers",
             "error", "note"}
TRT_KEYS = {"available", "parsed", "unsupported", "errors", "note"}


def inspect_json(path, capsys, *extra) -> dict:
    code = main(["inspect", str(path), "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _pass_rows(passes: list[dict]) -> list[tuple]:
    return [(p["spec"], p["iteration"], p["changed"], p["nodes_before"], p["nodes_after"]) for p in passes]


@pytest.mark.parametrize("path", ALL_MODELS, ids=IDS)
def test_inspect_keys_and_dry_run_match_optimize(path, tmp_path, capsys):
    before = sorted(p.name for p in path.parent.iterdir())
    info = inspect_json(path, capsys)
    assert tuple(info) == KEYS
    assert set(info["model"]) == MODEL_KEYS and info["model"]["opset"] > 0
    assert all(set(v) == IO_KEYS for v in info["inputs"] + info["outputs"]) and info["outputs"]
    assert set(info["ops"]) == OPS_KEYS and sum(info["ops"]["histogram"].values()) == info["ops"]["nodes"]
    assert set(info["parameters"]) == PARAM_KEYS and set(info["external_data"]) == EXTERNAL_KEYS
    assert set(info["shapes"]) == SHAPES_KEYS and set(info["int8"]) == INT8_KEYS
    assert set(info["tensorrt"]) == TRT_KEYS
    assert set(info["dry_run"]) == {"default", "int8", "fp16"}
    for entry in info["dry_run"].values():
        if entry is not None:
            assert set(entry) == DRY_KEYS and all(set(p) == PASS_KEYS for p in entry["passes"])
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing written

    # what `optimize` (default pipeline, numeric verification) then does, pass by pass
    code = main([str(path), "-o", str(tmp_path / "out.onnx"), "--json", "--no-eval"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert not report["rolled_back"], report["rolled_back"]
    assert _pass_rows(info["dry_run"]["default"]["passes"]) == _pass_rows(report["passes"])
    assert info["dry_run"]["default"]["nodes"]["after"] == report["summary"]["nodes"]["after"]
    assert [p["stats"] for p in info["dry_run"]["default"]["passes"]] == [p["stats"] for p in report["passes"]]


def test_int8_layer_count_matches_optimize_int8(tmp_path, capsys):
    digits = SAMPLES / "digits_cnn"
    info = inspect_json(digits / "model.onnx", capsys)
    code = main([str(digits / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--int8", "--calib-method", "minmax",
                 "--calib", str(digits / "calib.npz"), "--json", "--no-eval"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    quant = next(p for p in report["passes"] if p["name"] == "quantize-int8")
    assert info["int8"]["quantized_layers"] == quant["stats"]["quantized_nodes"] > 0
    dry = next(p for p in info["dry_run"]["int8"]["passes"] if p["name"] == "quantize-int8")
    assert dry["nodes_after"] == quant["nodes_after"]
    assert "SYNTHETIC" in info["int8"]["note"]
    assert info["tensorrt"]["available"] is False or info["tensorrt"]["parsed"] is True


def test_float_layers_name_their_reason(capsys):
    info = inspect_json(SAMPLES / "zoo" / "yolo_dynamic.onnx", capsys)
    reasons = {layer["reason"] for layer in info["int8"]["float_layers"]}
    assert reasons and all(isinstance(r, str) and r for r in reasons)
    assert info["inputs"][0]["dynamic"]  # dynamic dims are named
    transformer = inspect_json(SAMPLES / "transformer" / "model.onnx", capsys)
    assert any(layer["reason"] == "matmul_without_constant_weight" for layer in transformer["int8"]["float_layers"])


def test_subgraphs_and_custom_domains_are_counted(capsys):
    loop = inspect_json(SAMPLES / "zoo" / "loop_rnn.onnx", capsys)
    assert loop["ops"]["subgraphs"] >= 1 and loop["ops"]["subgraph_nodes"] > 0
    custom = [inspect_json(p, capsys)["ops"]["custom_domains"] for p in ZOO_MODELS]
    assert any(custom), "some zoo model uses a custom domain"
    for domains in custom:
        for domain, hist in domains.items():
            assert domain not in ("", "ai.onnx") and all(n > 0 for n in hist.values())


def test_external_data_and_parameters_by_dtype(tmp_path, capsys):
    model = onnx.load(str(SAMPLES / "digits_cnn" / "model.onnx"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=1024)
    info = inspect_json(tmp_path / "ext.onnx", capsys)
    assert info["external_data"]["files"] == ["ext.onnx.data"] and info["external_data"]["tensors"] > 0
    assert info["parameters"]["by_dtype"]["float32"]["params"] == info["parameters"]["params"] == 152_586
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]


def test_text_output_and_bad_input(tmp_path, capsys):
    assert main(["inspect", str(SAMPLES / "digits_cnn" / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "dry run default" in out and "INT8:" in out and "opset 17" in out
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("optimize inspect: error:") and "\n" not in err
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    assert main(["inspect", str(tmp_path / "junk.onnx"), "--json"]) == 2
    assert capsys.readouterr().out == ""
    shutil.copy(SAMPLES / "digits_cnn" / "model.onnx", tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx"), "--shapes", "nope:1x2"]) == 2
