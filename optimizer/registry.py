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
from optimizer.pass_base import _REGISTRY, Pass, register_pass  # noqa: F401  (register_pass: public here too)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnx_trt_optimizer.passes"
_loaded = False


def _load_builtins_and_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import passes  # noqa: F401  (registers the built-in passes)

    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
            register_pass(cls)
        except Exception as exc:  # a broken plugin must not break the tool
            log.warning("could not load pass plugin '%s' (%s): %s", entry.name, entry.value, exc)


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, sorted."""
    _load_builtins_and_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    """The pass registered as ``name``; a ``PipelineError`` with close matches otherwise."""
    registry = available_passes()
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, registry, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see `optimize --list-passes`"
    raise PipelineError(f"unknown pass '{name}'{hint}")
