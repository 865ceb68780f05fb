"""The registry: user passes, name rules, entry points, close-match suggestions."""

from dataclasses import dataclass

import pytest
from helpers import op_types, parse_model

from optimizer import Pass, PassManager, PassResult, PipelineError, available_passes, get_pass_class, register_pass
from optimizer.registry import _REGISTRY


@pytest.fixture
def clean_registry():
    saved = dict(available_passes())
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_user_pass_registers_and_runs_from_text(clean_registry):
    @register_pass
    @dataclass
    class ReluToIdentityFree(Pass):
        """Replace Relu(Relu(x)) by Relu(x) (a user-written example pass)."""

        name = "dedupe-relu"
        max_sites: int = 100

        def run(self, graph, ctx):
            count = 0
            for node in list(graph.nodes):
                inner = node.i() if node.op == "Relu" and node.inputs[0].inputs else None
                if inner is not None and inner.op == "Relu" and count < self.max_sites:
                    node.inputs[0] = inner.inputs[0]
                    count += 1
            return PassResult(changed=count > 0, stats={"removed": count})

    model = parse_model(
        """
        <ir_version: 10, opset_import: ["" : 13]>
        g (float[4] x) => (float[4] y) { a = Relu(x)
            y = Relu(a) }
        """
    )
    result = PassManager("dedupe-relu(max_sites=5)").run(model)
    assert op_types(result.model) == ["Relu"]
    assert result.records[0].stats == {"removed": 1}
    assert result.pipeline == "dedupe-relu(max_sites=5)"


def test_registration_rules(clean_registry):
    class NoDoc(Pass):
        name = "no-doc"

    with pytest.raises(ValueError, match="docstring"):
        register_pass(NoDoc)

    class BadName(Pass):
        """Doc."""

        name = "Bad_Name"

    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(BadName)

    class Clash(Pass):
        """Doc."""

        name = "cleanup"

    with pytest.raises(ValueError, match="already registered"):
        register_pass(Clash)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(PipelineError, match="did you mean 'fold-constants'"):
        get_pass_class("fold-constant")


def test_entry_point_passes_load(monkeypatch, clean_registry):
    from importlib import metadata

    from optimizer import registry

    @dataclass
    class Plugin(Pass):
        """A plugin pass that does nothing."""

        name = "plugin-noop"

        def run(self, graph, ctx):
            return PassResult(changed=False)

    class FakeEntry:
        name, value = "plugin-noop", "plugin:Plugin"

        def load(self):
            return Plugin

    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(metadata, "entry_points", lambda group: [FakeEntry()] if group == registry.ENTRY_POINT_GROUP else [])
    assert "plugin-noop" in available_passes()


def test_builtins_load_through_the_plugin_loader_and_the_table_is_complete():
    """passes.BUILTIN_PASSES lists every built-in (entry-point form); each loads with load_pass,
    the loader plugins use, under its own name; and no pass module registers one it does not list."""
    import importlib
    import pkgutil

    import passes
    from optimizer.registry import load_pass

    for name, target in passes.BUILTIN_PASSES.items():
        assert load_pass(name, target).name == name
    for info in pkgutil.walk_packages(passes.__path__, "passes."):
        importlib.import_module(info.name)
    builtin = {n for n, c in _REGISTRY.items() if c.__module__.startswith("passes.")}
    assert builtin == set(passes.BUILTIN_PASSES)


def test_load_pass_refuses_a_name_that_is_not_the_pass_name():
    with pytest.raises(ValueError, match="registers a pass named 'cse'"):
        from optimizer.registry import load_pass

        load_pass("not-cse", "passes.cse:CommonSubexpressionElimination")


def test_the_default_pipeline_imports_only_the_modules_of_its_passes():
    import subprocess
    import sys

    from helpers import ROOT

    code = (
        "import sys, json\n"
        "from optimizer.cli import main\n"
        "from optimizer.pipeline import parse_pipeline, iter_passes\n"
        "steps = parse_pipeline('default')\n"
        "print(json.dumps({'modules': sorted(m for m in sys.modules if m.startswith('passes.')),\n"
        "                  'passes': sorted({type(p).__module__ for p in iter_passes(steps)})}))\n"
    )
    import json

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    found = json.loads(out)
    assert "passes.quantization" not in found["modules"] and "passes.pruning.channels" not in found["modules"]
    assert set(found["passes"]) <= set(found["modules"])


def test_a_user_pass_named_like_a_builtin_not_yet_loaded_is_refused():
    import subprocess
    import sys

    from helpers import ROOT

    code = (
        "from dataclasses import dataclass\n"
        "from optimizer import Pass, register_pass\n"
        "class Mine(Pass):\n"
        "    '''Doc.'''\n"
        "    name = 'quantize-int8'\n"
        "try:\n"
        "    register_pass(Mine)\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.startswith("refused:") and "already registered" in out
