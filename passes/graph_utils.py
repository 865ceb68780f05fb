"""Small helpers shared by passes: graph walking, constant access, consumer checks."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs

# The passes' toolkit re-exports the kernel's graph <-> model helpers: pass authors find them here.
from optimizer.graph import fresh_name, graph_to_model, import_graph  # noqa: F401

#: Nodes that must never be folded, merged or removed by general-purpose passes.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Nondeterministic ops: folding or merging them would change what the model computes.
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


#: The numpy float types passes treat as float data (bfloat16 and float8 are opt-in per pass).
FLOAT_TYPES = (np.float16, np.float32, np.float64)


class UnionFind:
    """Disjoint sets over hashable, ordered keys (path halving). A set's root is its smallest key,
    so the partition and its roots do not depend on the order of the unions."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a, b):
        """Merge the sets of ``a`` and ``b``; returns ``(root, absorbed root)``, or None if already one."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return None
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        return ra, rb


def all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every nested subgraph (If branches, Loop and Scan bodies)."""
    yield graph
    for sub in graph.subgraphs(recursive=True):
        yield sub


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in ("", "ai.onnx", None)


def iter_sites(graph: gs.Graph, ops, min_inputs: int = 0) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """The site walker: ``(g, node)`` for every default-domain node whose op is in ``ops`` with at
    least ``min_inputs`` inputs, in ``graph`` and its subgraphs. Each graph's node list is read
    before its first site is handed out, so a rewrite may add or remove nodes as it goes."""
    for g in all_graphs(graph):
        for node in list(g.nodes):
            if node.op in ops and is_default_domain(node) and len(node.inputs) >= min_inputs:
                yield g, node


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        if producer.op == "Constant" and is_default_domain(producer) and "value" in producer.attrs:
            value = producer.attrs["value"]
            if isinstance(value, gs.Constant):
                return np.asarray(value.values)
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def detach(*nodes: gs.Node) -> None:
    """Cut ``nodes`` out of the graph (no inputs, no outputs): the manager's cleanup removes them."""
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()


def only_consumer(graph: gs.Graph, tensor: gs.Tensor, node: gs.Node) -> bool:
    """True when ``node`` is the sole reader of ``tensor`` and the tensor is not a graph output."""
    return len(tensor.outputs) == 1 and tensor.outputs[0] is node and not is_graph_output(graph, tensor)


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not used in ``graph`` (or its subgraphs), reserved once returned.

    The set of used names is built once per graph object and cached on it, so a pass that creates
    many tensors stays linear in the graph size.
    """
    # graph.__dict__ directly: graphsurgeon's Graph.__getattr__ treats unknown names as op functions
    used = graph.__dict__.get("_unique_names_cache")
    if used is None:
        used = {t.name for g in all_graphs(graph) for t in g.tensors().values()}
        used |= {n.name for g in all_graphs(graph) for n in g.nodes if n.name}
        graph.__dict__["_unique_names_cache"] = used
    return fresh_name(base, used)


def is_constant_expression(tensor: gs.Tensor, _memo: dict[int, bool] | None = None) -> bool:
    """True when ``tensor`` is computed only from constants (e.g. ``ConstantOfShape`` weights).

    Such a tensor is fixed for every run, so exact rewrites may build on it with new nodes (which
    ONNX Runtime and TensorRT fold when they load the model). Q/DQ and random ops do not count:
    a dequantized weight must stay a Q/DQ pattern, and random values are not constant.
    """
    memo = {} if _memo is None else _memo
    key = id(tensor)
    if key in memo:
        return memo[key]
    memo[key] = False  # guards against cycles while recursing
    if isinstance(tensor, gs.Constant):
        memo[key] = True
    elif len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        memo[key] = (
            is_default_domain(node)
            and node.op not in QDQ_OPS
            and node.op not in RANDOM_OPS
            and not any(isinstance(v, gs.Graph) for v in node.attrs.values())
            and all(is_constant_expression(t, memo) for t in node.inputs if t.name)
        )
    return memo[key]


def evaluate_constant_expression(tensor: gs.Tensor, opset: int, max_bytes: int = 1 << 20) -> np.ndarray | None:
    """Compute a small constant-expression tensor (see ``is_constant_expression``), else None.

    Used for per-channel parameters generated at run time; evaluation runs just the nodes that
    produce ``tensor`` in ONNX Runtime, or onnx's reference evaluator for an op ONNX Runtime
    cannot run (the reference evaluator's first use costs 0.15 s of imports and set-up). Results
    over ``max_bytes`` are refused.
    """
    return evaluate_constant_expressions([tensor], opset, max_bytes)[0]


def evaluate_constant_expressions(tensors: list[gs.Tensor], opset: int, max_bytes: int = 1 << 20) -> list:
    """``evaluate_constant_expression`` of each of ``tensors``, in one ONNX Runtime session for all
    of them (one per tensor only if that fails)."""
    results = [constant_values(t) for t in tensors]
    todo = [i for i, (t, r) in enumerate(zip(tensors, results)) if r is None and is_constant_expression(t)]
    if not todo:
        return results
    values = _run_constant_model(_constant_model([tensors[i] for i in todo], opset)) if len(todo) > 1 else None
    if values is None:  # one of them cannot be evaluated: each on its own
        values = [_run_constant_model(_constant_model([tensors[i]], opset)) for i in todo]
        values = [v[0] if v is not None else None for v in values]
    for i, value in zip(todo, values):
        results[i] = value if value is not None and value.nbytes <= max_bytes else None
    return results


def _constant_model(tensors: list[gs.Tensor], opset: int):
    """An input-free model computing ``tensors`` (constant expressions) from the nodes producing them."""
    nodes: list[gs.Node] = []
    seen: set[int] = set()

    def collect(t: gs.Tensor) -> None:
        if isinstance(t, gs.Constant) or not t.inputs:
            return
        node = t.inputs[0]
        if id(node) in seen:
            return
        seen.add(id(node))
        for inp in node.inputs:
            if inp.name:
                collect(inp)
        nodes.append(node)

    for tensor in tensors:
        collect(tensor)
    try:
        sub = gs.Graph(nodes=nodes, inputs=[], outputs=list(tensors), opset=opset)
        model = gs.export_onnx(sub, do_type_check=False)
        model.ir_version = min(model.ir_version, 10)
    except Exception:  # a graph graphsurgeon cannot export: the caller skips the site
        return None
    return model


def _run_constant_model(model) -> list[np.ndarray] | None:
    """The outputs of an input-free ``model``: ONNX Runtime, else onnx's reference evaluator."""
    from optimizer.runtime import OrtRunner

    if model is None:
        return None
    try:
        return [np.asarray(v) for v in OrtRunner(model).run({}).values()]
    except Exception:  # an op ONNX Runtime lacks (or cannot load here): try the reference evaluator
        pass
    from onnx.reference import ReferenceEvaluator

    try:
        return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, {})]
    except Exception:  # an op the reference evaluator lacks too: the caller skips the site
        return None


#: What shape inference learned about a tensor: dims (``None`` for unknown or symbolic dims;
#: the whole shape ``None`` when even the rank is unknown) and element type (``None`` if unknown).
InferredType = tuple[tuple[int | None, ...] | None, np.dtype | None]


def infer_tensor_types(
    graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, InferredType]:
    """Shapes and element types of every tensor, by name, from onnx shape inference (``data_prop``).

    ``input_shapes`` overrides the dims of the named graph inputs for this inference only (the graph
    is not modified). Constants are always known. Inference that fails (custom ops, invalid
    models) leaves the affected tensors out of the result; it never raises. Asked again about the
    graph in the same state, it answers from memory (``passes.inference_cache``).
    """
    from passes.inference_cache import remembered

    return remembered(graph, "types", input_shapes, lambda: _infer_tensor_types(graph, input_shapes))


def _infer_tensor_types(graph: gs.Graph, input_shapes) -> dict[str, InferredType]:
    import logging

    import onnx

    # Weights become typed inputs: inference needs only their types and shapes (data propagation
    # only small integer tensors), and exporting every weight for each call dominated the passes'
    # time on large models (1.9 s of 2.1 s on a 55 MB BERT encoder).
    from passes.inference_model import export_light, override_input_shapes

    model = export_light(graph)
    override_input_shapes(model, input_shapes)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # custom ops, invalid models: what was not inferred stays unknown
        logging.getLogger(__name__).debug("shape inference failed: %s", exc)
    types, _ = inferred_types(model, graph)
    return types


def inferred_types(model, graph: gs.Graph) -> tuple[dict[str, InferredType], dict[str, tuple]]:
    """From an inferred ``model`` of ``graph``: per tensor name ``(static dims or None, numpy dtype
    or None)``, and the dims with symbols kept (``int | str | None``); ``graph``'s constants always
    known."""
    import onnx

    from optimizer.stats import iter_graphs

    types: dict[str, InferredType] = {}
    symbols: dict[str, tuple] = {}
    for g in iter_graphs(model.graph):
        for value in list(g.input) + list(g.value_info) + list(g.output):
            if value.name in types or not value.type.HasField("tensor_type"):
                continue
            t = value.type.tensor_type
            dtype = None
            if t.elem_type:
                try:
                    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
                except Exception:  # an element type numpy cannot describe
                    dtype = None
            shape = None
            if t.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
                symbols[value.name] = tuple(
                    int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
                )
            types[value.name] = (shape, dtype)
    for g in all_graphs(graph):
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Constant):
                types[tensor.name] = (tuple(int(d) for d in tensor.shape), numpy_dtype(tensor.dtype))
    return types, symbols


def numpy_dtype(dtype) -> np.dtype | None:
    """A graphsurgeon tensor's dtype as numpy's, or None. graphsurgeon keeps types numpy lacks
    (bfloat16, float8) as ONNX ``TensorProto`` enum ints; those map through onnx's ml_dtypes."""
    import onnx

    if dtype is None:
        return None
    try:
        if isinstance(dtype, int):
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        return np.dtype(dtype)
    except Exception:  # a type neither numpy nor onnx can describe
        return None


def infer_static_shapes(
    graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The tensors whose shape (every dim) and element type shape inference can tell, by name."""
    return {
        name: (shape, dtype)
        for name, (shape, dtype) in infer_tensor_types(graph, input_shapes).items()
        if shape is not None and dtype is not None and all(d is not None for d in shape)
    }


def count_macs(graph: gs.Graph, shapes: dict[str, tuple[int | None, ...]]) -> int:
    """Multiply-accumulates of the Conv, ConvTranspose, Gemm and MatMul nodes (subgraphs included).

    ``shapes`` maps tensor names to dims (e.g. ``{n: s for n, (s, _) in infer_tensor_types(g).items()
    if s is not None}``); unknown dims (a dynamic batch) count as 1, so the result is per sample
    for batch-dynamic models. Layers whose shapes are unknown are left out.
    """

    def dims(tensor: gs.Tensor) -> tuple[int, ...] | None:
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        known = shapes.get(tensor.name)
        if known is None:
            return None
        return tuple(d if isinstance(d, int) and d >= 0 else 1 for d in known)

    total = 0
    for g in all_graphs(graph):
        for node in g.nodes:
            if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
                continue
            a, b = dims(node.inputs[0]), dims(node.inputs[1])
            out = dims(node.outputs[0]) if node.outputs else None
            if node.op == "Conv" and b is not None and out is not None and len(b) >= 2:
                total += int(np.prod(out, dtype=np.int64)) * int(np.prod(b[1:], dtype=np.int64))
            elif node.op == "ConvTranspose" and a is not None and b is not None and len(b) >= 2:
                total += int(np.prod(a, dtype=np.int64)) * int(np.prod(b[1:], dtype=np.int64))
            elif node.op == "Gemm" and a is not None and b is not None and len(a) == 2 and len(b) == 2:
                m, k = (a[1], a[0]) if node.attrs.get("transA", 0) else a
                n = b[0] if node.attrs.get("transB", 0) else b[1]
                total += m * n * k
            elif node.op == "MatMul" and a is not None and out is not None and len(a) >= 1:
                total += int(np.prod(out, dtype=np.int64)) * a[-1]
    return total
