"""The one skip counter (passes/skips.py) and the one place its reasons become report keys."""

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT, parse_model

from optimizer import Pass, PassManager, PassResult, available_passes, register_pass
from optimizer.events import skip_key, skip_reasons
from optimizer.registry import _REGISTRY
from passes.skips import Skips

MODEL = """
<ir_version: 10, opset_import: ["" : 13]>
g (float[2,4] x) => (float[2,4] y) {
    a = Relu(x)
    y = Sigmoid(a)
}
"""


def test_skips_count_reasons_and_a_revisited_site_once():
    skips = Skips()
    node, other = object(), object()
    skips.add("unknown_shape", site=node)
    skips.add("unknown_shape", site=node)  # the same site, seen again in a later round
    skips.add("unknown_shape", site=other)
    skips.add("dynamic weight")
    skips.add("dynamic weight", 2)
    skips.merge({"excluded": 3, "dynamic weight": 1})
    assert skips == {"unknown_shape": 2, "dynamic weight": 4, "excluded": 3}


def test_reasons_in_words_become_skipped_keys_and_back():
    assert skip_key("dynamic weight") == "skipped_dynamic_weight"
    assert skip_key("unknown_shape") == "skipped_unknown_shape"
    assert skip_reasons({"skipped_dynamic_weight": 2, "skipped_none": 0, "fused": 3}) == {"dynamic_weight": 2}


@dataclass
class RefuseAll(Pass):
    """Refuses every node, saying why in words."""

    name = "test-refuse-all"

    def run(self, graph, ctx):
        skips = Skips()
        for node in graph.nodes:
            skips.add(f"{node.op.lower()} not supported")
        return PassResult(False, stats={"looked_at": len(graph.nodes)}, skipped=skips)


@pytest.mark.parametrize("batch", [True, False])
def test_the_manager_reports_skipped_sites_as_skipped_stats(batch):
    saved = dict(available_passes())
    register_pass(RefuseAll)
    try:
        record = PassManager("test-refuse-all", batch=batch).run(parse_model(MODEL)).records[-1]
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
    assert record.stats == {"looked_at": 2, "skipped_relu_not_supported": 1, "skipped_sigmoid_not_supported": 1}


def test_no_pass_writes_the_skipped_prefix_itself():
    """Passes count reasons in ``Skips``; only ``optimizer.events.skip_key`` adds ``skipped_``."""
    found = []
    for path in sorted((ROOT / "passes").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                node = node.values[0]
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and node.value.startswith("skipped_")):
                found.append(f"{Path(path).relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "passes write the skipped_ prefix themselves:\n" + "\n".join(found)
