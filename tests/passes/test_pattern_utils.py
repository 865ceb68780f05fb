"""The pattern fusions that share passes/pattern_utils.py, together on the transformer sample."""

from collections import Counter

import numpy as np
import onnx
import onnx.parser
from helpers import SAMPLES, assert_same_outputs, op_types
from pattern_models import GELU_OPS, LN_OPS, fuse


# --------------------------------------------------------------------------- the transformer sample


def test_transformer_sample_ends_with_native_layernorm_and_gelu():
    path = SAMPLES / "transformer" / "model.onnx"
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 20
    result, _ = fuse(model, "fixpoint(cleanup,fold-constants,fuse-layernorm,fuse-gelu)")
    counts = Counter(op_types(result.model))
    assert counts["LayerNormalization"] == 2 and counts["Gelu"] == 1, counts
    assert not (LN_OPS - {"Div"} | GELU_OPS) & set(counts), counts
    with np.load(SAMPLES / "transformer" / "eval.npz", allow_pickle=False) as data:
        feeds = {"tokens_embedded": data["tokens_embedded"]}
    assert_same_outputs(model, result.model, feeds)
