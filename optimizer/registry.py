"""The pass registry: built-in passes, ``register_pass`` for users, and an entry-point group.

Third-party packages make their passes available to the ``optimize`` command by declaring, in
their ``pyproject.toml``::

    [project.entry-points."onnx_trt_optimizer.passes"]
    my-pass = "my_package.passes:MyPass"
"""

from __future__ import annotations

import difflib
import importlib
import logging
from importlib import metadata

from optimizer.errors import PipelineError
from optimizer.pass_base import _REGISTRY, Pass
from optimizer.pass_base import register_pass as _register

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnx_trt_optimizer.passes"
_loaded = False


def load_pass(name: str, target) -> type[Pass]:
    """Register ``target`` as ``name``: how both the built-in passes (``passes.BUILTIN_PASSES``,
    ``"module:Class"`` text) and plugins (entry points, loaded by ``importlib.metadata``) load.
    ``target``: that text, or the class an entry point loaded."""
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
    cls = _register(target)
    if cls.name != name:
        raise ValueError(f"'{name}' is {cls.__module__}:{cls.__qualname__}, which registers a pass named {cls.name!r}")
    return cls


def _load_builtin(name: str) -> bool:
    from passes import BUILTIN_PASSES

    if name not in BUILTIN_PASSES:
        return False
    if name not in _REGISTRY:
        load_pass(name, BUILTIN_PASSES[name])
    return True


def _load_builtins_and_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from passes import BUILTIN_PASSES

    for name in BUILTIN_PASSES:
        _load_builtin(name)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            load_pass(entry.name, entry.load())
        except Exception as exc:  # a broken plugin must not break the tool
            log.warning("could not load pass plugin '%s' (%s): %s", entry.name, entry.value, exc)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available by ``cls.name`` in pipelines and on the command line
    (a built-in pass of that name is loaded first, so that the clash is refused here)."""
    _load_builtin(getattr(cls, "name", "") or "")
    return _register(cls)


def is_pass_name(name: str) -> bool:
    """Whether a built-in or already registered pass is called ``name`` (plugins not loaded)."""
    from passes import BUILTIN_PASSES

    return name in _REGISTRY or name in BUILTIN_PASSES


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, sorted."""
    _load_builtins_and_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    """The pass registered as ``name``; a ``PipelineError`` with close matches otherwise."""
    if _load_builtin(name):  # only that pass's module: the command line starts faster
        return _REGISTRY[name]
    registry = available_passes()
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, registry, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see `optimize --list-passes`"
    raise PipelineError(f"unknown pass '{name}'{hint}")
