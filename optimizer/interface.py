"""Keep the model's interface: the dims of its inputs and outputs as the original declared them.

Passes and shape inference may write concrete values into dims that the original left dynamic
(``batch``, ``height``, unnamed ``?``); without ``--static-shapes`` those are put back, so the
optimized model accepts every input the original accepted. An input or output whose static dims
moved (``layout-nchw(io=nchw)`` permutes them on purpose) is left as the passes made it.
"""

from __future__ import annotations

import onnx


def _dims(value: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension] | None:
    tensor = value.type.tensor_type
    return list(tensor.shape.dim) if value.type.HasField("tensor_type") and tensor.HasField("shape") else None


def _is_static(dim: onnx.TensorShapeProto.Dimension) -> bool:
    return dim.HasField("dim_value")


def restore_dynamic_dims(original: onnx.ModelProto, optimized: onnx.ModelProto) -> list[str]:
    """Put the original's dynamic dims back into ``optimized``'s graph inputs and outputs (in place).

    Returns the names whose dims were restored."""
    restored = []
    before = {v.name: v for v in list(original.graph.input) + list(original.graph.output)}
    for value in list(optimized.graph.input) + list(optimized.graph.output):
        old = before.get(value.name)
        if old is None:
            continue
        old_dims, new_dims = _dims(old), _dims(value)
        if old_dims is None or new_dims is None or len(old_dims) != len(new_dims):
            continue
        if any(_is_static(a) and (not _is_static(b) or a.dim_value != b.dim_value) for a, b in zip(old_dims, new_dims)):
            continue  # static dims moved: a deliberate layout change
        changed = False
        for a, b in zip(old_dims, value.type.tensor_type.shape.dim):
            if not _is_static(a) and (b.HasField("dim_value") or b.dim_param != a.dim_param):
                b.CopyFrom(a)
                changed = True
        if changed:
            restored.append(value.name)
    return restored
