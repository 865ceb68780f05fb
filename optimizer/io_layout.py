"""The I/O-layout adapter: what ``layout-nchw(io=nchw)`` records about the model's inputs and
outputs (in its metadata), and the helpers callers (verification, evaluation, calibration) use to
feed and read such a model in the original layout. Kernel: it reads metadata, nothing above it."""

from __future__ import annotations

import json

import numpy as np


#: ``metadata_props`` keys written with ``io=nchw``: JSON ``{name: perm}``, where the new tensor is
#: ``numpy.transpose(old, perm)`` (so ``[0, 3, 1, 2]`` turns an NHWC input or output into NCHW).
LAYOUT_INPUTS_KEY = "layout.inputs"
LAYOUT_OUTPUTS_KEY = "layout.outputs"


def io_layout(model) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The input and output permutations ``layout-nchw(io=nchw)`` recorded in ``model``."""
    props = {p.key: p.value for p in model.metadata_props}
    inputs = json.loads(props.get(LAYOUT_INPUTS_KEY, "{}"))
    outputs = json.loads(props.get(LAYOUT_OUTPUTS_KEY, "{}"))
    return inputs, outputs


def to_model_inputs(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Original-layout feeds transposed to what ``model`` (after io=nchw) reads."""
    inputs, _ = io_layout(model)
    return {k: (np.ascontiguousarray(np.transpose(v, inputs[k])) if k in inputs else v) for k, v in feeds.items()}


def to_original_outputs(model, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model``'s outputs (after io=nchw) transposed back to the original layout."""
    _, perms = io_layout(model)
    back = {k: tuple(int(i) for i in np.argsort(p)) for k, p in perms.items()}  # inverse permutations
    return {k: (np.ascontiguousarray(np.transpose(v, back[k])) if k in back else v) for k, v in outputs.items()}
