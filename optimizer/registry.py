"""The pass registry: built-in passes, ``register_pass`` for users, and an entry-point group.

Third-party packages make their passes available to the ``optimize`` command by declaring, in
their ``pyproject.toml``::

    [project.entry-points."onnx_trt_optimizer.passes"]
    my-pass = "my_package.passes:MyPass"
"""

from __future__ import annotations

import difflib
import logging
from importlib import metadata

from optimizer.errors import PipelineError
from optimizer.pass_base import _REGISTRY, Pass
from optimizer.pass_base import register_pass as _register

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnx_trt_optimizer.passes"
_loaded = False


def _load_builtins_and_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import passes

    passes.load_all()
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
            _register(cls)
        except Exception as exc:  # a broken plugin must not break the tool
            log.warning("could not load pass plugin '%s' (%s): %s", entry.name, entry.value, exc)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available by ``cls.name`` in pipelines and on the command line
    (a built-in pass of that name is loaded first, so that the clash is refused here)."""
    import passes

    passes.load(getattr(cls, "name", "") or "")
    return _register(cls)


def is_pass_name(name: str) -> bool:
    """Whether a built-in or already registered pass is called ``name`` (plugins not loaded)."""
    import passes

    return name in _REGISTRY or name in passes.BUILTIN_MODULES


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, sorted (every built-in module and plugin loaded)."""
    _load_builtins_and_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    """The pass registered as ``name``; a ``PipelineError`` with close matches otherwise. Only the
    module of a built-in pass is imported; an unknown name loads every pass and plugin."""
    import passes

    if name in _REGISTRY or (passes.load(name) and name in _REGISTRY):
        return _REGISTRY[name]
    registry = available_passes()
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, registry, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see `optimize --list-passes`"
    raise PipelineError(f"unknown pass '{name}'{hint}")
