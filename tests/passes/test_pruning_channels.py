"""prune-channels (passes/pruning/channels.py): kept counts, ratios, the pruning record,
importance, calibration compensation, and the digits sample."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import SAMPLES
from onnx import numpy_helper
from pruning_models import assert_valid, last_stats, zoo_model

from optimizer import PassContext, PassManager
from optimizer.errors import PipelineError
from optimizer.runtime import OrtRunner, input_specs
from optimizer.stats import model_stats
from passes.pruning.channels import PRUNING_KEY, PruneChannels, kept_count, read_pruning_record

DIGITS = SAMPLES / "digits_cnn"


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("original,ratio,multiple,minimum,kept", [
    (64, 0.3, 8, 8, 48), (128, 0.3, 8, 8, 96), (16, 0.9, 8, 8, 8), (10, 0.5, 8, 8, 8),
    (6, 0.5, 8, 8, 6), (64, 0.0, 8, 8, 64), (13, 0.5, 1, 1, 7), (3, 0.99, 1, 1, 1),
])
def test_kept_count_rounds_up_to_a_multiple_and_never_removes_everything(original, ratio, multiple, minimum, kept):
    assert kept_count(original, ratio, multiple, minimum) == kept


def test_per_group_ratios_override_and_unknown_names_are_reported():
    model = zoo_model()
    result = PassManager("prune-channels(ratio=0,ratios=[conv_c:0.5,nope:0.5],multiple=1,min_channels=1)").run(model)
    details = result.records[-1].details
    assert [(g["producers"], g["kept"]) for g in details["groups"]] == [(["conv_c"], 4)]
    assert details["ratios_unmatched"] == ["nope"]
    with pytest.raises(PipelineError, match="ratio of 'conv_c' must be in"):
        PassManager("prune-channels(ratios=[conv_c:1.5])")
    with pytest.raises(PipelineError, match="layer:ratio"):
        PassManager("prune-channels(ratios=[conv_c])")


def test_rerunning_is_a_no_op_and_ratios_stay_relative_to_the_original():
    model = zoo_model()
    first = PassManager("prune-channels(ratio=0.25,multiple=1,min_channels=1)").run(model)
    graph = gs.import_onnx(first.model)
    assert read_pruning_record(graph) == {"conv_a": 16, "conv_b": 16, "conv_c": 8, "conv_d": 16}
    assert PRUNING_KEY in first.model.graph.doc_string
    assert not PassManager("prune-channels(ratio=0.25,multiple=1,min_channels=1)").run(first.model).records[-1].changed
    second = PassManager("prune-channels(ratio=0.5,multiple=1,min_channels=1)").run(first.model)
    kept = {tuple(g["producers"]): (g["kept"], g["original"]) for g in second.records[-1].details["groups"]}
    assert kept == {("conv_a", "conv_b"): (8, 16), ("conv_c",): (4, 8), ("conv_d",): (8, 16)}
    assert_valid(second.model)


def test_global_scope_prunes_groups_with_weak_channels_harder():
    model = zoo_model()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # conv_c: half of its channels are 100x weaker than the rest; other groups are uniform
    wc = weights["wc"].copy()
    wc[:4] *= 0.01
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "wc"))
    model.graph.initializer.append(numpy_helper.from_array(wc, "wc"))
    result = PassManager("prune-channels(ratio=0.1,scope=global,multiple=1,min_channels=1)").run(model)
    removed = {tuple(g["producers"]): g["removed"] for g in result.records[-1].details["groups"]}
    assert removed.get(("conv_c",), 0) >= 4
    layer = PassManager("prune-channels(ratio=0.1,multiple=1,min_channels=1)").run(model)
    removed_layer = {tuple(g["producers"]): g["removed"] for g in layer.records[-1].details["groups"]}
    assert removed_layer == {("conv_a", "conv_b"): 1, ("conv_d",): 1}  # floor(8 * 0.1) = 0 for conv_c
    assert not PassManager("prune-channels(ratio=0.1,scope=global,multiple=1,min_channels=1)").run(result.model).records[-1].changed


def test_bn_gamma_importance_removes_the_channels_with_the_smallest_gamma():
    model = zoo_model()
    gamma = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "bna_g")).copy()
    gamma[[2, 5, 7, 12]] = 1e-3
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "bna_g"))
    model.graph.initializer.append(numpy_helper.from_array(gamma, "bna_g"))
    result = PassManager("prune-channels(importance=bn-gamma,ratio=0.25,multiple=1,min_channels=1)").run(model)
    bn_gamma = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization").input[1]
    kept = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == bn_gamma))
    assert kept.size == 12 and kept.min() > 0.1
    assert last_stats(result)["importance_fallback_l1"] == 3  # conv_b (tied to conv_a), conv_c, conv_d: no BN


def test_prune_channels_options_are_validated():
    with pytest.raises(PipelineError):
        PassManager("prune-channels(ratio=1.0)")
    with pytest.raises(PipelineError):
        PassManager("prune-channels(importance=l3)")
    assert PruneChannels(ratios=["a:0.5"]).spec() == "prune-channels(ratios=[a:0.5])"


# -- the sample model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from optimizer.io import load_model

    model = load_model(DIGITS / "model.onnx")[0]
    data = np.load(DIGITS / "eval.npz")
    return model, data["input"], data["labels"]


def accuracy(model, x, labels):
    return float((OrtRunner(model).run({"input": x})["logits"].argmax(1) == labels).mean())


def test_digits_after_default_preset_loses_a_quarter_of_its_parameters(digits):
    model, x, labels = digits
    result = PassManager("default,prune-channels(ratio=0.3)").run(model)
    record = result.records[-1]
    assert record.name == "prune-channels" and record.verification == "passed"
    assert_valid(result.model)
    before, after = model_stats(model).params, model_stats(result.model).params
    assert after <= 0.75 * before
    assert record.stats["macs_after"] < 0.75 * record.stats["macs_before"]
    assert record.stats["groups_pruned"] >= 3 and record.stats["blocked_graph_output"] == 1
    assert all(g["kept"] % 8 == 0 for g in record.details["groups"])
    assert accuracy(result.model, x, labels) > 0.1  # still a classifier; the budget search picks ratios


def test_pruned_and_sparse_digits_build_in_tensorrt_rtx(digits):
    from optimizer import tensorrt_rtx

    if not tensorrt_rtx.is_available():
        pytest.skip("tensorrt-rtx is not installed (the dev extra installs it)")
    model = digits[0]
    for spec in ("default,prune-channels(ratio=0.3)", "default,sparsify-2to4"):
        result = tensorrt_rtx.check_model(PassManager(spec, verify="off").run(model).model)
        assert result.ok and not result.unsupported and result.built, spec


def test_pruning_after_sparsify_2to4_reports_the_layers_it_made_dense_again(digits):
    result = PassManager("default,sparsify-2to4,prune-channels(ratio=0.3)", verify="structural").run(digits[0])
    assert result.records[-1].stats["layers_2to4_broken"] == 3
    assert "/res_conv1/Conv" in result.records[-1].details["layers_2to4_broken"]


def test_calibration_data_compensates_removed_channels(digits):
    model, x, labels = digits
    base = PassManager("default", verify="off").run(model).model
    specs = input_specs(base)

    def pruned(spec, with_data):
        from calibration.sources import open_source

        ctx = PassContext(calibration=open_source(DIGITS / "calib.npz", specs) if with_data else None)
        return PassManager(spec, verify="structural").run(base, ctx)

    plain = pruned("prune-channels(ratio=0.3)", with_data=False)
    compensated = pruned("prune-channels(ratio=0.3)", with_data=True)
    assert compensated.records[-1].stats["layers_compensated"] >= 3
    assert accuracy(compensated.model, x, labels) > accuracy(plain.model, x, labels) + 0.2
    ranked = pruned("prune-channels(ratio=0.2,importance=activation)", with_data=True)
    assert accuracy(ranked.model, x, labels) > 0.95
