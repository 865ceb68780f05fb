"""Refuse models that are not valid ONNX before any pass touches them.

``validate_model`` runs the onnx checker (plus a few checks the checker does not make) and raises
``InputError`` (exit code 2) with one line naming the problem and the node. What it accepts:

* ops in custom domains (anything but ``""``/``ai.onnx``/``ai.onnx.ml``): the checker has no schema
  for them and skips them; ONNX Runtime contrib ops (``com.microsoft``) run as before, and custom
  ops ONNX Runtime lacks are still optimized structurally (the manager says so in the report);
* graphs whose nodes are not topologically sorted (some exporters write them so): they are sorted
  (the in-memory model, never the file) and a warning says so;
* models that fail only strict shape inference (``full_check=True``) but load in ONNX Runtime,
  which is common for real exports: that is a warning, returned to the caller.
"""

from __future__ import annotations

import functools
import heapq
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import checker, helper

from optimizer.errors import InputError

#: Domains the onnx package defines; everything else is a custom domain.
DEFAULT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
#: Messages are one line; the checker's can be long (it quotes nodes).
MAX_MESSAGE = 400


def validate_model(model: onnx.ModelProto, path: str | Path | None = None) -> list[str]:
    """Check ``model``; raise ``InputError`` for an invalid one, else return warnings (may be empty).

    The one change made to ``model`` (pass the loaded copy, as ``optimize`` does): nodes that are not
    in topological order are sorted in place, which ONNX, ONNX Runtime and the passes require; the
    computation is unchanged and a warning says so. ``path`` only prefixes the messages.
    """
    prefix = f"{path}: " if path else ""

    def refuse(problem: str) -> InputError:
        return InputError(f"{prefix}the model is not valid ONNX: {_one_line(problem)}")

    _check_opsets(model, refuse)
    _check_graph(model.graph, outer=frozenset(), where="", refuse=refuse, top=True,
                 functions=_local_functions(model), imported=_imports(model))
    _check_inputs(model, refuse)
    warnings: list[str] = []
    repeated = sorted(n for n, k in Counter(o.name for o in model.graph.output).items() if k > 1)
    if repeated:  # valid ONNX, and ONNX Runtime returns the value twice; most likely a mistake
        warnings.append(f"graph output(s) listed more than once: {', '.join(repeated)}")
    if _needs_sort(model.graph):
        # ONNX requires topological order and so do ONNX Runtime (for subgraphs reading outer
        # names) and the passes; the order does not change what the model computes.
        _sort_graph(model.graph)
        warnings.append("the model's nodes were not in topological order; they were sorted (the input file is unchanged)")
    checkable = _checkable(model, refuse)
    try:
        _check(checkable, full_check=True)  # the checker, then strict shape inference
    except Exception as exc:  # onnx raises ValidationError, InferenceError, ValueError...
        strict = _one_line(str(exc))
        try:
            _check(checkable, full_check=False)
        except Exception as hard:
            raise refuse(str(hard)) from None
        runtime = _runtime_load_error(model)
        if runtime is not None:
            raise refuse(f"{strict} (ONNX Runtime cannot load it either: {runtime})") from None
        warnings.append(f"strict shape inference fails on the input model (it is optimized anyway): {strict}")
    return warnings


# --- pieces -------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    # The checker appends "==> Context: Bad node spec for node. Name: n OpType: Op".
    text = re.sub(r"\s*==> Context: Bad node spec for node\. Name: (.*?) OpType: (\S+)", r" (in node '\1', \2)", text)
    text = text.replace("==> Context: ", "")
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _supported_opsets() -> dict[str, tuple[int, int]]:
    from onnx.onnx_cpp2py_export import defs as cdefs

    versions = dict(cdefs.schema_version_map())
    versions.setdefault("ai.onnx", versions[""])
    return versions


def _check_opsets(model: onnx.ModelProto, refuse) -> None:
    supported = _supported_opsets()
    seen: dict[str, int] = {}
    for opset in model.opset_import:
        domain = opset.domain
        name = f"domain '{domain}'" if domain else "the default domain (ai.onnx)"
        if domain in seen and seen[domain] != opset.version:
            raise refuse(f"{name} is imported twice, at opset {seen[domain]} and {opset.version}")
        seen[domain] = opset.version
        if domain not in DEFAULT_DOMAINS:
            continue  # custom domains version themselves
        low, high = supported[domain]
        if opset.version > high:
            raise refuse(
                f"opset {opset.version} of {name} is not known to the installed onnx {onnx.__version__} "
                f"(it supports {low} to {high})"
            )
        if opset.version < low:
            raise refuse(f"opset {opset.version} of {name} does not exist (the lowest is {low})")


def _local_functions(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(f.domain, f.name) for f in model.functions}


def _describe(node: onnx.NodeProto, index: int) -> str:
    op = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
    return f"node '{node.name}' ({op})" if node.name else f"node #{index} ({op})"


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for k, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{k}]", graph


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads that it does not define itself (its implicit inputs)."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    needed: set[str] = set()
    for node in graph.node:
        defined.update(o for o in node.output if o)
    for node in graph.node:
        needed.update(i for i in node.input if i)
        for _, sub in _subgraphs(node):
            needed |= _outer_names(sub)
    needed.update(o.name for o in graph.output)
    return needed - defined


def _check_graph(
    graph: onnx.GraphProto,
    outer: frozenset[str],
    where: str,
    refuse,
    top: bool = False,
    functions: set[tuple[str, str]] | None = None,
    imported: dict[str, int] | None = None,
) -> None:
    """Structural checks the checker makes only in topological order, or not at all."""
    producers: dict[str, str] = {}
    for value in graph.input:
        if value.name in producers:
            raise refuse(f"{where}graph input '{value.name}' is listed twice")
        producers[value.name] = "a graph input"
    initializers = [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]
    seen_init: set[str] = set()
    for name in initializers:
        if name in seen_init:
            raise refuse(f"{where}initializer '{name}' is defined twice")
        seen_init.add(name)
        producers.setdefault(name, "an initializer")
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producers:
                raise refuse(
                    f"{where}tensor '{name}' is produced twice: by {producers[name]} and by {_describe(node, index)}"
                )
            producers[name] = _describe(node, index)
    visible = set(producers) | set(outer)
    if not graph.node and top:
        missing = [o.name for o in graph.output if o.name not in visible]
        if missing:
            raise refuse(f"the graph is empty: it has no nodes, and output '{missing[0]}' is not an input or initializer")
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in visible:
                raise refuse(
                    f"{where}{_describe(node, index)} reads tensor '{name}', which no node, graph input or initializer "
                    "produces"
                )
        _check_op(node, index, where, refuse, functions or set(), imported or {})
        for attr_name, sub in _subgraphs(node):
            _check_graph(sub, frozenset(visible), f"{where}in the '{attr_name}' body of {_describe(node, index)}: ",
                         refuse, functions=functions, imported=imported)
    for value in graph.output:
        if value.name not in visible:
            raise refuse(f"{where}graph output '{value.name}' is not produced by any node")
    order = _topological_order(graph, partial=True)
    if len(order) < len(graph.node):
        stuck = min(set(range(len(graph.node))) - set(order))
        raise refuse(
            f"{where}the nodes form a cycle through {_describe(graph.node[stuck], stuck)} (it depends on its own output)"
        )


def _check_op(
    node: onnx.NodeProto, index: int, where: str, refuse, functions: set[tuple[str, str]], imported: dict[str, int]
) -> None:
    """An op whose domain is not imported, or a default-domain op the installed onnx does not define
    (at the imported opset). Model-local functions are fine; custom-domain ops are not checked."""
    if (node.domain, node.op_type) in functions:
        return
    domain = "" if node.domain == "ai.onnx" else node.domain
    if domain not in imported:
        name = f"domain '{node.domain}'" if node.domain else "the default domain"
        raise refuse(
            f"{where}{_describe(node, index)} uses {name}, which the model does not import (no opset_import entry for it)"
        )
    if domain not in DEFAULT_DOMAINS:
        return
    if _defined_at(domain, node.op_type, imported[domain]):
        return
    place = f"the '{domain}' domain" if domain else "the default ONNX domain"
    introduced = _first_version(domain, node.op_type)
    if introduced is None:
        raise refuse(f"{where}{_describe(node, index)}: op '{node.op_type}' does not exist in {place}")
    if introduced > imported[domain]:
        raise refuse(
            f"{where}{_describe(node, index)}: op '{node.op_type}' does not exist at opset {imported[domain]} of "
            f"{place} (it was added in opset {introduced})"
        )


def _imports(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}


@functools.lru_cache(maxsize=None)
def _defined_at(domain: str, op: str, version: int) -> bool:
    """Whether the installed onnx defines ``op`` at opset ``version`` of ``domain`` (one schema
    lookup; reading every schema of every op costs 30 ms a run)."""
    try:
        onnx.defs.get_schema(op, version, domain)
    except onnx.defs.SchemaError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _first_version(domain: str, op: str) -> int | None:
    """The opset that introduced ``op`` in ``domain`` in the installed onnx; None if it has no such op
    (walks the op's own schema history; for the message of a refused op)."""
    if not onnx.defs.has(op, domain):
        return None
    version = onnx.defs.get_schema(op, domain=domain).since_version
    while version > 1:
        try:
            version = onnx.defs.get_schema(op, version - 1, domain).since_version
        except onnx.defs.SchemaError:  # no schema before this one
            break
    return version


def _topological_order(graph: onnx.GraphProto, partial: bool = False) -> list[int] | None:
    """Node indices in a topological order (stable: sorted graphs keep their order); on a cycle None,
    or with ``partial`` the nodes that could be ordered."""
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producer.setdefault(name, index)
    deps: list[set[int]] = []
    for index, node in enumerate(graph.node):
        needed = {i for i in node.input if i}
        for _, sub in _subgraphs(node):
            needed |= _outer_names(sub)
        deps.append({producer[n] for n in needed if n in producer})  # a node reading its output: a cycle
    users: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    for index, d in enumerate(deps):
        for p in d:
            users[p].append(index)
    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users[index]:
            remaining[user] -= 1
            if remaining[user] == 0:
                heapq.heappush(ready, user)
    return order if partial or len(order) == len(graph.node) else None


def _sort_graph(graph: onnx.GraphProto) -> bool:
    """Sort ``graph`` (and its subgraphs) in place; return whether anything moved."""
    moved = False
    for node in graph.node:
        for _, sub in _subgraphs(node):
            moved |= _sort_graph(sub)
    order = _topological_order(graph)
    if order is not None and order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
        moved = True
    return moved


def _needs_sort(graph: onnx.GraphProto) -> bool:
    order = _topological_order(graph)
    if order is not None and order != list(range(len(graph.node))):
        return True
    return any(_needs_sort(sub) for node in graph.node for _, sub in _subgraphs(node))


def _check_inputs(model: onnx.ModelProto, refuse) -> None:
    """Element types and dims of the graph inputs (the checker accepts negative dims)."""
    for value in model.graph.input:
        if not value.type.HasField("tensor_type"):
            continue  # sequence/map/optional inputs: input_specs refuses them with its own message
        tensor = value.type.tensor_type
        if tensor.elem_type == onnx.TensorProto.UNDEFINED:
            raise refuse(f"graph input '{value.name}' has no element type")
        try:
            helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        except (KeyError, ValueError):
            raise refuse(f"graph input '{value.name}' has an unknown element type {tensor.elem_type}") from None
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                raise refuse(
                    f"graph input '{value.name}' has dimension {dim.dim_value} on axis {axis} "
                    "(a dynamic dimension is written as a name, dim_param, not a negative number)"
                )


def _checkable(model: onnx.ModelProto, refuse) -> onnx.ModelProto:
    """``model`` for the checker: large main-graph weights stored as raw bytes become typed graph
    inputs (``passes.inference_model.without_weights``), so the checker does not serialize them
    all (0.13 s on a 55 MB model); what it checks of their data -- that the bytes cover the
    declared shape and type -- is checked here, with its words."""
    from passes.inference_model import without_weights

    def movable(t: onnx.TensorProto) -> bool:
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            return False
        packed = t.data_type in _PACKED_TYPES or t.data_type == onnx.TensorProto.STRING
        return (not packed and t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL
                and all(d >= 0 for d in t.dims) and itemsize > 0)

    checkable = without_weights(model, movable=movable)
    kept = {t.name for t in checkable.graph.initializer}
    for t in model.graph.initializer:
        if t.name in kept:
            continue
        required = int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        stored = len(t.raw_data)
        if stored < required:
            raise refuse(f"TensorProto (tensor name: {t.name}) raw_data size ({stored} bytes) is too small for the "
                         f"declared shape and type ({required} bytes required).")
    return checkable


#: Element types stored several to a byte (4-bit): their raw sizes are left to onnx's checker.
_PACKED_TYPES = frozenset(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                          if hasattr(onnx.TensorProto, n))


def _check(model: onnx.ModelProto, *, full_check: bool) -> None:
    """The onnx checker; through a file for models protobuf cannot serialize in one piece."""
    from optimizer.io import EXTERNAL_DATA_THRESHOLD, model_on_disk, weights_nbytes

    if weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD:
        with model_on_disk(model) as path:
            checker.check_model(str(path), full_check=full_check)
    else:
        checker.check_model(model, full_check=full_check)


def _runtime_load_error(model: onnx.ModelProto) -> str | None:
    """Why ONNX Runtime cannot load ``model``; None if it can, or if what it lacks is a custom-domain
    op (those models are optimized structurally, as before)."""
    from optimizer.runtime import OrtRunner, RuntimeFailure
    from optimizer.stats import iter_graphs

    custom = {n.op_type for g in iter_graphs(model.graph) for n in g.node if n.domain not in DEFAULT_DOMAINS}
    try:
        OrtRunner(model)
    except RuntimeFailure as exc:
        text = _one_line(str(exc)).removeprefix("ONNX Runtime cannot load the model: ")
        if any(f"{op}(" in text for op in custom):
            return None
        return text
    except Exception as exc:  # pragma: no cover - defensive: the check itself must not crash
        return _one_line(str(exc)) if not custom else None
    return None
