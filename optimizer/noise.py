"""A model's own float noise on given inputs: how much its outputs move under rewrites that are
mathematically exact, so that lossless passes can be judged against it instead of a fixed bound.

Two probes, each compared with ONNX Runtime's plain run (graph optimizations off):

* the same model with all of ONNX Runtime's graph optimizations on (ORT folds BatchNorm into Conv,
  fuses MatMul+Add, reorders reductions: exactly the rounding our fusions introduce);
* float inputs nudged by one unit in the last place (how much rounding anywhere is amplified).

The noise of an output is the larger of the two. Outputs whose shape changes under a probe (e.g.
the number of boxes after NMS) are *unstable*: they cannot be compared element by element.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from optimizer.metrics import OutputMetrics, compare_batches
from optimizer.runtime import OrtRunner, RuntimeFailure

log = logging.getLogger(__name__)


@dataclass
class Noise:
    """Per-output noise (``OutputMetrics`` of the probes against the plain run), and unstable outputs."""

    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    unstable: list[str] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "probes": list(self.probes),
            "max_abs": {n: m.max_abs for n, m in self.outputs.items()},
            "max_rel": {n: m.max_rel for n, m in self.outputs.items()},
            "mismatch": {n: m.mismatch for n, m in self.outputs.items() if m.mismatch},
            "unstable": list(self.unstable),
        }


def _nudge(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in batch.items():
        if value.dtype.kind == "f" and value.size:
            direction = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(value.dtype)
            out[name] = np.nextafter(value, direction)
        else:
            out[name] = value
    return out


def estimate_noise(model: onnx.ModelProto, batches: list[dict], reference: list[dict],
                   plain: OrtRunner | None = None) -> Noise:
    """The noise of ``model`` on ``batches``, whose plain outputs are ``reference``; ``plain``: a
    session of ``model`` with graph optimizations off, if one is open already."""
    noise = Noise()
    runs: list[tuple[str, list[dict]]] = []
    try:
        fused = OrtRunner(model, optimize=True)
        runs.append(("onnxruntime graph optimizations", [fused.run(b) for b in batches]))
    except RuntimeFailure as exc:
        log.info("noise probe with ORT optimizations failed: %s", exc)
    try:
        plain = plain if plain is not None else OrtRunner(model)
        runs.append(("inputs nudged by 1 ulp", [plain.run(_nudge(b, i)) for i, b in enumerate(batches)]))
    except RuntimeFailure as exc:
        log.info("noise probe with nudged inputs failed: %s", exc)
    for label, outputs in runs:
        unstable = {
            name for ref, got in zip(reference, outputs) for name in ref
            if name not in got or np.shape(ref[name]) != np.shape(got[name])
        }
        noise.unstable += [n for n in sorted(unstable) if n not in noise.unstable]
        stable_ref = [{k: v for k, v in r.items() if k not in unstable} for r in reference]
        stable_new = [{k: v for k, v in g.items() if k not in unstable} for g in outputs]
        for m in compare_batches(stable_ref, stable_new):
            old = noise.outputs.get(m.name)
            if old is None or m.max_abs > old.max_abs or m.mismatch > old.mismatch:
                if old is not None:  # keep the larger of each measure
                    m.max_abs, m.mismatch = max(m.max_abs, old.max_abs), max(m.mismatch, old.mismatch)
                noise.outputs[m.name] = m
        noise.probes.append(label)
    return noise
