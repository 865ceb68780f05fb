"""Verification that holds on real inputs and still catches real bugs (optimizer/hooks.py, noise.py).

Both sides are proven: correct rewrites pass on the user's real samples (judged against the
model's own float noise), and deliberately broken passes -- a BatchNorm folded along the wrong
channels, a dropped bias, a swapped Transpose perm -- are rolled back and named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import SAMPLES, parse_model

from optimizer import Pass, PassManager, PassResult, available_passes, register_pass
from optimizer.cli import main
from optimizer.metrics import OutputMetrics
from optimizer.pass_base import EXACT, PassContext, Tolerance
from optimizer.registry import _REGISTRY

DIGITS = SAMPLES / "digits_cnn"
CHANNEL_LAST = SAMPLES / "channel_last"


@dataclass
class WrongBnChannels(Pass):
    """fuse-conv-bn with the BN scale applied to the output channels in reverse order."""

    name = "test-wrong-bn-channels"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            conv = bn.i()
            if conv.op != "Conv" or not isinstance(conv.inputs[1], gs.Constant):
                continue
            scale, bias, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
            k = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
            w = conv.inputs[1].values.astype(np.float64)
            b = conv.inputs[2].values.astype(np.float64) if len(conv.inputs) > 2 else np.zeros(w.shape[0])
            wrong = k[::-1]  # the bug: channel order
            conv.inputs[1] = gs.Constant(conv.inputs[1].name + "_bad", (w * wrong[:, None, None, None]).astype(np.float32))
            new_b = gs.Constant(conv.name + "_bias_bad", ((b - mean) * k + bias).astype(np.float32))
            conv.inputs = [conv.inputs[0], conv.inputs[1], new_b]
            conv.outputs = bn.outputs
            bn.outputs = []
            return PassResult(True)
        return PassResult(False)


@dataclass
class DropBias(Pass):
    """Removes the bias of the first Conv that has one."""

    name = "test-drop-bias"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        for conv in graph.nodes:
            if conv.op == "Conv" and len(conv.inputs) == 3:
                conv.inputs = conv.inputs[:2]
                return PassResult(True)
        return PassResult(False)


@dataclass
class SwapPerm(Pass):
    """Swaps the H and W axes of the first NHWC->NCHW Transpose (shape-valid on square images)."""

    name = "test-swap-perm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        for node in graph.nodes:
            if node.op == "Transpose" and list(node.attrs.get("perm", [])) == [0, 3, 1, 2]:
                node.attrs["perm"] = [0, 3, 2, 1]
                return PassResult(True)
        return PassResult(False)


@pytest.fixture
def broken_passes():
    saved = dict(available_passes())
    for cls in (WrongBnChannels, DropBias, SwapPerm):
        register_pass(cls)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


@pytest.mark.parametrize("model_dir, broken", [
    (DIGITS, "test-wrong-bn-channels"),
    (DIGITS, "test-drop-bias"),
    (CHANNEL_LAST, "test-swap-perm"),
])
def test_broken_pass_is_rolled_back_and_named_on_real_data(model_dir, broken, broken_passes, tmp_path, capfd):
    out = tmp_path / "out.onnx"
    code = main([str(model_dir / "model.onnx"), "-o", str(out), "--passes", f"cleanup,{broken},fuse-conv-bn",
                 "--data", str(model_dir / "eval.npz"), "--json"])
    captured = capfd.readouterr()
    report = json.loads(captured.out)
    assert code == 0, captured.err
    record = next(p for p in report["passes"] if p["name"] == broken)
    assert record["changed"] is False and record["rolled_back"] and record["verification"] == "failed", record
    assert "diverges from the original" in record["error"]
    assert report["rolled_back"][0]["pass"] == broken
    assert broken in captured.err and len(captured.err.strip().splitlines()) == 1
    # the correct pass after it still ran, and the result matches the original
    assert any(p["name"] == "fuse-conv-bn" and p["verification"] == "passed" for p in report["passes"]) or \
        model_dir == CHANNEL_LAST
    assert report["accuracy"]["outputs"][next(iter(report["accuracy"]["outputs"]))]["max_rel"] < 1e-4


@pytest.mark.parametrize("broken", ["test-wrong-bn-channels", "test-drop-bias"])
def test_strict_makes_a_broken_pass_exit_1(broken, broken_passes, tmp_path, capfd):
    code = main([str(DIGITS / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--passes", broken, "--strict",
                 "--data", str(DIGITS / "eval.npz")])
    err = capfd.readouterr().err
    assert code == 1 and f"pass '{broken}' failed" in err and "diverges" in err
    assert not (tmp_path / "o.onnx").exists()


def test_report_states_samples_noise_and_rule(tmp_path, capsys, broken_passes):
    code = main([str(DIGITS / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--data", str(DIGITS / "eval.npz"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    v = report["verification"]
    assert v["samples"] == 8 and "10 x noise" in v["lossless_rule"]
    # Every check passed within the bound without noise, so the noise probe never ran (lazily measured).
    assert v["noise"] == {"measured": False, "why": "every check passed within the bound without noise"}
    assert "noise" not in report["time_breakdown"]["stages"]
    assert report["samples"]["origin"] == "data" and report["accuracy"]["synthetic"] is False
    # A check that fails the zero-noise bound measures the noise, and the report has it per output.
    code = main([str(DIGITS / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--data", str(DIGITS / "eval.npz"), "--json",
                 "--passes", "cleanup,test-wrong-bn-channels"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["rolled_back"][0]["pass"] == "test-wrong-bn-channels"
    v = report["verification"]
    assert v["noise"]["probes"] and "logits" in v["noise"]["max_abs"]


ZERO = """
<ir_version: 10, opset_import: ["" : 13]>
zero (float[batch, 4] x) => (float[batch, 4] y, float[batch, 4] z) {
    c = Constant <value = float[1] {0.0}> ()
    y = Mul (x, c)
    z = Relu (x)
}
"""


class Perturb(Pass):
    """Adds ``delta`` to output y (all zeros in the original)."""

    name = "test-perturb-zero"
    delta: float = 1e-3

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        mul = next(n for n in graph.nodes if n.op == "Mul")
        mul.inputs[1] = gs.Constant("c_perturbed", np.array([self.delta], np.float32))
        return PassResult(True)


class LossyPerturb(Perturb):
    """The same, declared lossy with no absolute bound."""

    name = "test-lossy-perturb-zero"
    lossy = True
    tolerance = Tolerance(rtol=float("inf"), atol=float("inf"), min_cosine=None)


def test_all_zero_reference_output_is_judged_without_nan():
    saved = dict(available_passes())
    register_pass(dataclass(Perturb))
    register_pass(dataclass(LossyPerturb))
    try:
        model = parse_model(ZERO)
        result = PassManager("test-perturb-zero").run(model)
        record = result.records[0]
        assert record.rolled_back and "output 'y' diverges" in record.error and "nan" not in record.error.lower()
        lossy = PassManager("test-lossy-perturb-zero").run(model)
        assert not lossy.records[0].rolled_back, lossy.records[0].error  # inf bounds: no inf * 0
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def _metrics(max_abs: float, max_ref: float, mismatch: float = 0.0, cosine: float | None = 1.0) -> OutputMetrics:
    return OutputMetrics("o", max_abs, max_abs, max_ref, cosine, None, mismatch, 100)


def test_lossless_bound_grows_with_noise_up_to_the_ceiling():
    noise = _metrics(2e-6, 1.0)
    assert _metrics(1.5e-5, 1.0).within(EXACT, noise)  # 10 x noise = 2e-5 covers BN folding's rounding
    assert not _metrics(1.5e-5, 1.0).within(EXACT, None)  # without noise: the fixed floor 1.1e-5
    huge = _metrics(1.0, 1.0)
    assert _metrics(9e-4, 1.0).within(EXACT, huge) and not _metrics(2e-3, 1.0).within(EXACT, huge)  # ceiling 1e-3
    assert _metrics(5e-7, 0.0).within(EXACT) and not _metrics(2e-6, 0.0).within(EXACT)  # all-zero reference
    ints = _metrics(0.0, 0.0, mismatch=0.01, cosine=None)
    assert not ints.within(EXACT) and ints.within(EXACT, _metrics(0, 0, mismatch=0.002, cosine=None))
