"""Shape inference on a weight-free copy of a graph (issue 16: inference was serializing every weight).

``onnx.shape_inference.infer_shapes`` serializes the whole model to hand it to C++ and parses the
result back; on a 50 MB model that is ~0.2 s per call. Shapes need only the initializers' types
and shapes, and data propagation only small integer tensors, so ``light_model`` exports the graph
with every initializer over ``max_elements`` elements turned into a graph input of the same type and shape.
``infer`` returns what ``passes.graph_utils.infer_tensor_types`` returns (static dims, dtypes) and,
from the same inference, the symbolic shapes (dim_param names kept) ``passes.symbolic_shapes`` needs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

Dim = int | str | None
#: The opset from which onnx's Reshape inference uses the propagated values of its shape input.
DATA_PROP_OPSET = 14
#: Initializers with more elements than this become typed graph inputs for inference (shape
#: tensors are tiny).
LIGHT_ELEMENTS = 1024


def export_light(graph: gs.Graph, max_elements: int = LIGHT_ELEMENTS, value_info: bool = True) -> onnx.ModelProto:
    """``gs.export_onnx(graph)`` without the data of the main graph's constants over ``max_elements``
    elements: they become graph inputs of the same type and shape, and their values are never
    copied (a full export copies every weight: 0.05 s per call on a 55 MB model). Initializers
    listed as graph inputs (IR < 4) are not inputs here; ``value_info``: also export the shapes the
    graph's tensors carry."""
    from optimizer.graph import export_model
    from optimizer.io import pin_ir_version

    model = export_model(graph, do_type_check=False, value_info=value_info, weights_as_inputs_over=max_elements)
    pin_ir_version(model)
    return model


def light_model(graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]] | None = None,
                max_elements: int = LIGHT_ELEMENTS) -> onnx.ModelProto:
    """``graph`` exported for shape inference: big initializers as typed inputs, no ``value_info``
    (inference starts afresh: shapes a pass left stale must not steer it), ``input_shapes``
    overriding the named inputs' dims."""
    from optimizer.stats import iter_graphs

    model = export_light(graph, max_elements, value_info=False)
    for g in iter_graphs(model.graph):
        del g.value_info[:]
    override_input_shapes(model, input_shapes)
    return model


def override_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None) -> None:
    """Set the dims of the named graph inputs (same rank only) to ``input_shapes``, in place."""
    for value in model.graph.input:
        given = (input_shapes or {}).get(value.name)
        dims = value.type.tensor_type.shape.dim
        if given is not None and value.type.tensor_type.HasField("shape") and len(dims) == len(given):
            for dim, size in zip(dims, given):
                dim.dim_value = int(size)  # clears dim_param (a oneof)


def without_weights(model: onnx.ModelProto, max_elements: int = LIGHT_ELEMENTS, movable=None) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers over ``max_elements`` elements are typed
    graph inputs instead (their data is not copied): for the checker and shape inference, when
    ONNX Runtime loads the real model anyway (and with it, checks the weights). ``movable``: a
    predicate on the ``TensorProto``; initializers it refuses stay in the copy."""
    light = onnx.ModelProto(
        ir_version=model.ir_version, producer_name=model.producer_name, producer_version=model.producer_version,
        domain=model.domain, model_version=model.model_version, doc_string=model.doc_string,
    )
    light.opset_import.extend(model.opset_import)
    light.metadata_props.extend(model.metadata_props)
    light.functions.extend(model.functions)
    graph = model.graph
    g = light.graph
    g.name, g.doc_string = graph.name, graph.doc_string
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(graph.sparse_initializer)
    g.quantization_annotation.extend(graph.quantization_annotation)
    declared = {v.name for v in graph.input}
    for t in graph.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= max_elements or (movable is not None and not movable(t)):
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def infer(graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]] | None = None):
    """``(types, symbols)``: per tensor name ``(static dims or None, numpy dtype or None)`` as
    ``infer_tensor_types`` gives them, and the dims with symbols kept (``int | str | None``);
    remembered for the graph in its current state (``passes.inference_cache``)."""
    from passes.inference_cache import remembered

    return remembered(graph, "symbols", input_shapes, lambda: _infer(graph, input_shapes))


def _infer(graph: gs.Graph, input_shapes):
    from passes.graph_utils import inferred_types

    model = light_model(graph, input_shapes)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if 0 < opset < DATA_PROP_OPSET:
        # Reshape feeds propagated shape values into its output shape only from opset 14 on: infer on
        # the same model in opset 14 (onnx's version converter; tensor names are kept).
        try:
            model = onnx.version_converter.convert_version(model, DATA_PROP_OPSET)
        except Exception as exc:  # no adapter for some op: infer in the model's own opset
            log.debug("version conversion for shape inference failed: %s", exc)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # custom ops, invalid models: what was not inferred stays unknown
        log.debug("shape inference failed: %s", exc)
    return inferred_types(model, graph)


def ort_symbolic_shapes(graph: gs.Graph) -> dict[str, tuple[Dim, ...]]:
    """Shapes from ONNX Runtime's symbolic shape inference (``onnxruntime.tools.symbolic_shape_infer``),
    which keeps symbols where onnx's loses them (a ``Range`` over a dim, broadcasting a symbol
    against a fresh one). Run without ``auto_merge`` (which would *assume* conflicting dims equal)
    and without guessing ranks; it stops at the first node it cannot infer, and what it inferred
    before that is kept. Dims are ints or symbol expressions (``"batch*sequence"``)."""
    from optimizer.stats import iter_graphs

    try:
        SymbolicShapeInference = _ort_symbolic_module().SymbolicShapeInference
        # The class's own steps: its ``infer_shapes`` raises on partial results and writes a file.
        infer_impl = SymbolicShapeInference(2**31 - 1, False, False, 0)
        infer_impl._preprocess(light_model(graph))
        while infer_impl.run_:
            infer_impl._infer_impl()
        infer_impl._update_output_from_vi()
        model = infer_impl.out_mp_
    except Exception as exc:  # an op it does not know, an onnxruntime without the tool
        log.debug("symbolic shape inference (onnxruntime) failed: %s", exc)
        return {}
    shapes: dict[str, tuple[Dim, ...]] = {}
    for g in iter_graphs(model.graph):
        for value in list(g.value_info) + list(g.output):
            t = value.type.tensor_type
            if value.name in shapes or not value.type.HasField("tensor_type") or not t.HasField("shape"):
                continue
            shapes[value.name] = tuple(
                int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            )
    return shapes


def _ort_symbolic_module():
    """``onnxruntime/tools/symbolic_shape_infer.py`` loaded by path: the ``onnxruntime.tools``
    package's ``__init__`` imports torch (1.6 s here); the module itself needs only onnx and sympy."""
    import importlib.util
    import os
    import sys

    name = "_ort_symbolic_shape_infer"
    if name not in sys.modules:
        import onnxruntime

        path = os.path.join(os.path.dirname(onnxruntime.__file__), "tools", "symbolic_shape_infer.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
