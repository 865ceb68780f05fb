"""Built-in passes, one module per family. Importing this package registers them."""

from passes import cleanup, fusion, layout, normalization, opset, precision, pruning, quantization, simplify  # noqa: F401

__all__ = ["cleanup", "fusion", "layout", "normalization", "opset", "precision", "pruning", "quantization", "simplify"]
