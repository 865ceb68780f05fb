"""Input validation: invalid models are refused (exit 2, one line naming the problem and the node);
valid ones, including custom-domain ops, ONNX Runtime contrib ops and unsorted graphs, are not."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from helpers import SAMPLES
from onnx import TensorProto, helper, numpy_helper

from optimizer import optimize
from optimizer.cli import main
from optimizer.errors import InputError
from optimizer.validate import validate_model

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
PREFIX = "the model is not valid ONNX: "


def make(nodes, inputs=(X,), outputs=(Y,), opsets=(("", 17),), initializers=()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10)


def relu(src, dst, name):
    return helper.make_node("Relu", [src], [dst], name=name)


def refused(model, *fragments):
    with pytest.raises(InputError) as info:
        validate_model(model)
    message = str(info.value)
    assert message.startswith(PREFIX), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize(
    "path", sorted(SAMPLES.glob("*/model.onnx")) + sorted(SAMPLES.glob("zoo/*.onnx")), ids=lambda p: p.stem
)
def test_sample_and_zoo_models_are_valid(path):
    model = onnx.load(str(path))
    before = model.SerializeToString()
    assert validate_model(model) == []
    assert model.SerializeToString() == before


# --- refused -----------------------------------------------------------------------------------


def test_dangling_graph_output():
    refused(make([relu("x", "a", "r")]), "graph output 'y' is not produced by any node")


def test_node_reads_undefined_tensor():
    refused(make([relu("missing", "y", "r")]), "node 'r' (Relu) reads tensor 'missing'")


def test_two_nodes_write_one_name():
    refused(make([relu("x", "y", "r1"), relu("x", "y", "r2")]),
            "tensor 'y' is produced twice: by node 'r1' (Relu) and by node 'r2' (Relu)")


def test_node_writes_a_graph_input():
    refused(make([relu("x", "x", "r"), relu("x", "y", "r2")]), "tensor 'x' is produced twice: by a graph input")


def test_unknown_default_domain_op():
    refused(make([helper.make_node("Frobnicate", ["x"], ["y"], name="f")]),
            "node 'f' (Frobnicate): op 'Frobnicate' does not exist in the default ONNX domain")


def test_unknown_ai_onnx_ml_op():
    model = make([helper.make_node("Frob", ["x"], ["y"], name="f", domain="ai.onnx.ml")],
                 opsets=(("", 17), ("ai.onnx.ml", 3)))
    refused(model, "op 'Frob' does not exist in the 'ai.onnx.ml' domain")


def test_op_newer_than_the_imported_opset():
    model = make([helper.make_node("Gelu", ["x"], ["y"], name="g")])
    refused(model, "node 'g' (Gelu): op 'Gelu' does not exist at opset 17", "added in opset 20")


def test_opset_the_installed_onnx_does_not_know():
    high = onnx.defs.onnx_opset_version()
    refused(make([relu("x", "y", "r")], opsets=(("", 99),)), "opset 99", f"1 to {high}")


def test_opset_zero():
    refused(make([relu("x", "y", "r")], opsets=(("", 0),)), "opset 0")


def test_empty_graph():
    refused(make([]), "the graph is empty", "'y'")


def test_empty_graph_passing_its_input_through_is_valid():
    assert validate_model(make([], outputs=(X,))) == []


def test_negative_input_dim():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])
    refused(make([relu("x", "y", "r")], inputs=(x,)), "graph input 'x' has dimension -1 on axis 0", "dim_param")


@pytest.mark.parametrize("elem_type", [0, 99])
def test_input_without_a_known_element_type(elem_type):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    x.type.tensor_type.elem_type = elem_type
    refused(make([relu("x", "y", "r")], inputs=(x,)), "graph input 'x'")


def test_custom_domain_without_opset_import():
    model = make([helper.make_node("MyOp", ["x"], ["y"], name="c", domain="com.example")])
    refused(model, "node 'c' (com.example:MyOp) uses domain 'com.example', which the model does not import")


def test_cycle():
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"), relu("a", "b", "r1"), relu("a", "y", "r2")]
    refused(make(nodes), "cycle", "node 'add' (Add)")


def test_graph_input_listed_twice():
    refused(make([relu("x", "y", "r")], inputs=(X, X)), "graph input 'x' is listed twice")


def test_initializer_bytes_do_not_match_its_type():
    weight = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    weight.data_type = TensorProto.DOUBLE
    model = make([helper.make_node("Add", ["x", "w"], ["y"], name="a")], initializers=[weight])
    refused(model, "tensor name: w")


@pytest.mark.parametrize("elements", [4, 4096], ids=["small", "large"])  # checked by onnx / by us (LIGHT_ELEMENTS)
def test_initializer_bytes_too_few_for_its_shape_small_or_large(elements):
    weight = numpy_helper.from_array(np.ones((1, elements), np.float32), "w")
    weight.raw_data = weight.raw_data[:-4]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, elements])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, elements])
    model = make([helper.make_node("Add", ["x", "w"], ["y"], name="a")], inputs=(x,), outputs=(y,), initializers=[weight])
    with pytest.raises(onnx.checker.ValidationError) as onnx_says:
        onnx.checker.check_model(model)
    message = refused(model, "tensor name: w", f"raw_data size ({4 * elements - 4} bytes) is too small")
    assert " ".join(str(onnx_says.value).split()) in message  # the checker's own words
    weight.raw_data += b"\0" * 8  # more bytes than needed: the checker accepts that, and so do we
    model = make([helper.make_node("Add", ["x", "w"], ["y"], name="a")], inputs=(x,), outputs=(y,), initializers=[weight])
    assert validate_model(model) == []


def test_type_error_that_onnx_runtime_also_rejects():
    weight = numpy_helper.from_array(np.ones((1, 4), np.float64), "w")
    model = make([helper.make_node("Add", ["x", "w"], ["y"], name="add")], initializers=[weight])
    refused(model, "node name: add", "ONNX Runtime cannot load it either")


def test_checker_message_is_one_line_naming_the_node():
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", training_mode=0)
    model = make([node], opsets=(("", 7),), initializers=[
        numpy_helper.from_array(np.ones(1, np.float32), n) for n in "sbmv"])
    message = refused(model, "training_mode", "(in node 'bn', BatchNormalization)")
    assert "==>" not in message


def test_truncated_if_branch():
    model = onnx.load(str(SAMPLES / "zoo" / "if_branch.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "If")
    del node.attribute[0].g.node[-1]
    refused(model, f"body of node '{node.name}' (If)", "is not produced by any node")


def test_dangling_name_in_a_loop_body():
    model = onnx.load(str(SAMPLES / "zoo" / "loop_rnn.onnx"))
    loop = next(n for n in model.graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    body.node[0].input[0] = "nowhere"
    refused(model, "'body' body of node '/Loop' (Loop)", "reads tensor 'nowhere'")


def test_path_prefixes_the_message():
    with pytest.raises(InputError, match=r"^m\.onnx: the model is not valid ONNX: "):
        validate_model(make([]), "m.onnx")


# --- accepted ----------------------------------------------------------------------------------


def custom_model():
    nodes = [relu("x", "a", "r"), helper.make_node("MyOp", ["a"], ["b"], name="custom", domain="com.example"),
             relu("b", "y", "r2")]
    return make(nodes, opsets=(("", 17), ("com.example", 1)))


def test_custom_domain_op_onnx_runtime_lacks_is_accepted():
    assert validate_model(custom_model()) == []


def test_custom_domain_op_with_strict_inference_failure_is_a_warning():
    model = custom_model()
    model.graph.value_info.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 5]))  # really [1, 4]
    warnings = validate_model(model)
    assert len(warnings) == 1 and "strict shape inference" in warnings[0]


def test_custom_domain_model_is_optimized_structurally(tmp_path):
    path = tmp_path / "custom.onnx"
    onnx.save(custom_model(), str(path))
    result = optimize(str(path), "default", output=tmp_path / "out.onnx")
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "MyOp", "Relu"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))


def microsoft_model():
    node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], name="fmm", domain="com.microsoft", alpha=0.5)
    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    return make([node], opsets=(("", 17), ("com.microsoft", 1)), initializers=[weight])


def test_onnx_runtime_contrib_op_keeps_working(tmp_path):
    model = microsoft_model()
    assert validate_model(model) == []
    path = tmp_path / "ms.onnx"
    onnx.save(model, str(path))
    result = optimize(str(path), "default", output=tmp_path / "out.onnx")
    assert [(n.domain, n.op_type) for n in result.model.graph.node] == [("com.microsoft", "FusedMatMul")]
    assert not [w for w in result.report.warnings if "numeric verification unavailable" in w]


def test_unsorted_valid_graph_is_accepted_and_sorted():
    model = make([relu("a", "y", "second"), relu("x", "a", "first")])
    warnings = validate_model(model)
    assert any("topological order" in w for w in warnings)
    assert [n.name for n in model.graph.node] == ["first", "second"]
    onnx.checker.check_model(model)


def test_unsorted_graph_with_a_subgraph_optimizes(tmp_path):
    """An If whose branches read outer names must come after their producers once sorted."""
    model = onnx.load(str(SAMPLES / "zoo" / "if_branch.onnx"))
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = tmp_path / "unsorted.onnx"
    onnx.save(model, str(path))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    result = optimize(str(path), "default", output=tmp_path / "out.onnx")
    assert any("topological order" in w for w in result.report.warnings)
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_strict_inference_failure_alone_is_a_warning(tmp_path):
    """Real exports often carry value_info that strict inference rejects; ONNX Runtime runs them."""
    model = make([relu("x", "a", "r1"), relu("a", "y", "r2")])
    model.graph.value_info.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 5]))
    warnings = validate_model(model)
    assert len(warnings) == 1 and "strict shape inference" in warnings[0] and "r2" in warnings[0]


def test_duplicate_graph_output_is_a_warning():
    warnings = validate_model(make([relu("x", "y", "r")], outputs=(Y, Y)))
    assert warnings == ["graph output(s) listed more than once: y"]


def test_model_local_function_is_not_an_unknown_op():
    function = helper.make_function("local.fn", "Double", ["a"], ["b"],
                                    [helper.make_node("Add", ["a", "a"], ["b"])], [helper.make_opsetid("", 17)])
    model = make([helper.make_node("Double", ["x"], ["y"], name="d", domain="local.fn")],
                 opsets=(("", 17), ("local.fn", 1)))
    model.functions.append(function)
    assert validate_model(model) == []


# --- through the command and the regression check -----------------------------------------------


def test_cli_refuses_with_exit_2_one_line_and_no_output(tmp_path, capfd):
    path = tmp_path / "bad.onnx"
    onnx.save(make([relu("x", "a", "r")]), str(path))
    before = path.read_bytes()
    code = main([str(path), "-o", str(tmp_path / "out.onnx"), "--json"])
    captured = capfd.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == [f"optimize: error: {path}: {PREFIX}graph output 'y' is not produced by any node"]
    assert not (tmp_path / "out.onnx").exists()
    assert path.read_bytes() == before


def test_regression_check_validates_both_models(tmp_path, capfd):
    good = SAMPLES / "digits_cnn" / "model.onnx"
    bad = tmp_path / "bad.onnx"
    onnx.save(make([relu("x", "a", "r")]), str(bad))
    assert main(["check", str(good), "--optimized", str(bad), "--min-cosine", "0.9"]) == 2
    err = capfd.readouterr().err
    assert f"{bad}: {PREFIX}" in err and len(err.strip().splitlines()) == 1


def test_first_version_of_every_op_matches_onnxs_schema_history():
    from optimizer.validate import _first_version

    first: dict[tuple[str, str], int] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        key = (schema.domain, schema.name)
        first[key] = min(first.get(key, schema.since_version), schema.since_version)
    assert {key: _first_version(*key) for key in first} == first
    assert _first_version("", "NoSuchOp") is None


def test_defined_at_agrees_with_the_first_version_for_every_op():
    from optimizer.validate import _defined_at, _first_version

    names = {(s.domain, s.name) for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx.ml")}
    for domain, op in sorted(names):
        first = _first_version(domain, op)
        for version in (first - 1, first, first + 3):
            assert _defined_at(domain, op, version) == (version >= first), (domain, op, version)
