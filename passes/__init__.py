"""Built-in passes. Importing this package registers them."""

from passes import cleanup, fusion  # noqa: F401
from passes import normalization  # noqa: F401
from passes import simplify  # noqa: F401

__all__ = ["cleanup", "fusion"]
