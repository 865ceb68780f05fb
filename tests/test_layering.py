"""The layering holds: nothing imports upward, imports inside functions counted too.

    kernel       optimizer/ errors, pass contract, graph<->model, safe io, I/O layouts, runtime, stats, metrics
    calibration  calibration/
    passes       passes/
    driver       optimizer/ everything else (registry, pipeline, manager, hooks, api, cli, reports ...)

A module may import its own layer and the layers below it. The test parses every module's source
(``ast``), so a lazy ``import`` inside a function is an edge like any other. The driver also spells
no pass name outside the registry and the preset tables: it asks passes what they declare.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import ROOT

LAYERS = ("kernel", "calibration", "passes", "driver")
#: optimizer/ modules that form the kernel: what passes and calibration may build on.
KERNEL = {
    "optimizer.errors", "optimizer.pass_base", "optimizer.graph", "optimizer.io", "optimizer.io_layout",
    "optimizer.runtime", "optimizer.stats", "optimizer.metrics", "optimizer.noise", "optimizer.task_metrics",
    "optimizer.interface", "optimizer.emulation",
}


def layer_of(module: str) -> str | None:
    top = module.split(".")[0]
    if top == "calibration":
        return "calibration"
    if top == "passes":
        return "passes"
    if top == "optimizer":
        if module == "optimizer":
            return "driver"
        parts = module.split(".")
        return "kernel" if ".".join(parts[:2]) in KERNEL else "driver"
    return None  # third-party / stdlib


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with line numbers."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]  # submodules
    return found


def upward_edges(files: list[Path]) -> list[str]:
    order = {name: i for i, name in enumerate(LAYERS)}
    known = {module_name(f) for f in files}
    bad = []
    for path in files:
        source = module_name(path)
        own = layer_of(source)
        for target, line in imports_of(path):
            if target not in known and target.rpartition(".")[0] not in known:
                continue  # an attribute import (from x import name) or a third-party module
            target = target if target in known else target.rpartition(".")[0]
            other = layer_of(target)
            if own and other and order[other] > order[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {source} ({own}) imports {target} ({other})")
    return sorted(set(bad))


def package_files() -> list[Path]:
    return sorted(p for pkg in ("optimizer", "passes", "calibration") for p in (ROOT / pkg).rglob("*.py"))


def test_nothing_imports_upward():
    bad = upward_edges(package_files())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_check_fails_on_a_deliberate_upward_import(tmp_path, monkeypatch):
    """A kernel module importing the manager (in a function, lazily) is caught."""
    import helpers

    fake_root = tmp_path
    for pkg in ("optimizer", "passes", "calibration"):
        (fake_root / pkg).mkdir()
        (fake_root / pkg / "__init__.py").write_text("")
    (fake_root / "optimizer" / "manager.py").write_text("X = 1\n")
    (fake_root / "optimizer" / "runtime.py").write_text("def f():\n    from optimizer.manager import X\n    return X\n")
    (fake_root / "passes" / "fusion.py").write_text("from optimizer import api\n")
    (fake_root / "optimizer" / "api.py").write_text("import passes.fusion\n")
    monkeypatch.setattr(helpers, "ROOT", fake_root)
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    files = sorted(p for pkg in ("optimizer", "passes", "calibration") for p in (fake_root / pkg).rglob("*.py"))
    bad = upward_edges(files)
    assert any("optimizer.runtime (kernel) imports optimizer.manager (driver)" in b for b in bad), bad
    assert any("passes.fusion (passes) imports optimizer.api (driver)" in b for b in bad), bad
    assert not any("optimizer.api" in b.split(" imports ")[0] for b in bad), bad  # driver -> passes is fine


#: Tables of pipeline text (presets) in optimizer/pipeline.py: the one place the driver spells passes.
PRESET_TABLES = {"PRESETS", "PRECISION_STEPS", "DRY_RUN_STEPS"}


def pass_name_literals(files: list[Path], names: set[str]) -> list[str]:
    """String literals in ``files`` that are a pass name or a pass spec (``name(...)``), outside the
    preset tables, docstrings and timing-stage labels (``stages.measure("cleanup")``)."""
    spec = re.compile(r"^(%s)\(" % "|".join(map(re.escape, sorted(names, key=len, reverse=True))))
    found = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        allowed: set[int] = set()
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                allowed.add(id(body[0].value))  # a docstring
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    base = target.value if isinstance(target, ast.Subscript) else target
                    if isinstance(base, ast.Name) and base.id in PRESET_TABLES:
                        allowed.update(id(n) for n in ast.walk(node.value))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "measure":
                allowed.update(id(a) for a in node.args)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed:
                if node.value in names or spec.match(node.value):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    return found


def test_the_driver_does_not_know_passes_by_name():
    """The driver asks passes what they declare (capabilities), never matches their names."""
    from optimizer.registry import available_passes

    files = sorted(p for p in (ROOT / "optimizer").rglob("*.py") if p.name != "registry.py")
    found = pass_name_literals(files, set(available_passes()))
    assert not found, "pass names spelled in the driver:\n" + "\n".join(found)


def test_the_name_check_finds_a_pass_name(tmp_path, monkeypatch):
    (tmp_path / "budget.py").write_text('def tunable(p):\n    return p.name == "quantize-int8"\n'
                                        'SPEC = "prune-channels(ratio=0.5)"\nPRESETS = {"x": "cleanup"}\n')
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    found = pass_name_literals([tmp_path / "budget.py"], {"quantize-int8", "prune-channels", "cleanup"})
    assert sorted(f.split(": ", 1)[1] for f in found) == ["'prune-channels(ratio=0.5)'", "'quantize-int8'"]


def test_no_module_over_700_lines_and_no_class_over_300():
    """Issue 12's sizes, kept true: a file name still tells a newcomer what is inside."""
    too_long = []
    for package in ("optimizer", "passes", "calibration"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            if text.count("\n") > 700:
                too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                    too_long.append(f"{path.relative_to(ROOT)}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
