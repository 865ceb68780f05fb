"""The pass registry: built-in passes, ``register_pass`` for users, and an entry-point group.

Third-party packages make their passes available to the ``optimize`` command by declaring, in
their ``pyproject.toml``::

    [project.entry-points."onnx_trt_optimizer.passes"]
    my-pass = "my_package.passes:MyPass"
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from importlib import metadata

from optimizer.errors import PipelineError
from optimizer.pass_base import Pass

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnx_trt_optimizer.passes"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_REGISTRY: dict[str, type[Pass]] = {}
_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available by ``cls.name`` in pipelines and on the command line."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass expects a Pass subclass, got {cls!r}")
    if not dataclasses.is_dataclass(cls):
        cls = dataclasses.dataclass(cls)
    name = cls.name
    if not _NAME.match(name or ""):
        raise ValueError(f"pass {cls.__qualname__} needs a kebab-case `name` (e.g. 'fuse-conv-bn'), got {name!r}")
    if name in ("fixpoint",):
        raise ValueError(f"'{name}' is reserved by the pipeline syntax")
    if not (cls.__doc__ or "").strip() or cls.__doc__.startswith(cls.__name__ + "("):
        raise ValueError(f"pass '{name}' needs a docstring: it is the pass's user-facing help")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name '{name}' is already registered by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


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
