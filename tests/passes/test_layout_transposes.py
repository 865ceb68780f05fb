"""The Transposes ``layout-nchw`` starts from (passes/layout/transposes.py)."""

from channel_last_models import concat_model, transposes
from helpers import run_pass


def test_duplicate_transposes_of_one_tensor_merge():
    model = concat_model()  # both branches transpose x with the same perm
    result = run_pass(model, "layout-nchw")
    assert result.records[0].stats["merged"] == 1
    ins = [t for t in transposes(result.model) if t.input[0] == "x"]
    assert len(ins) == 1
