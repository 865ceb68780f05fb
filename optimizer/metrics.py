"""Comparing outputs: max/mean absolute error, cosine similarity, argmax agreement, task accuracy.

Accumulators are streaming: evaluation feeds them batch by batch, so memory does not grow with
the number of samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from optimizer.pass_base import Tolerance


@dataclass
class OutputMetrics:
    """Agreement of one output with the reference (the original model's output)."""

    name: str
    max_abs: float
    mean_abs: float
    max_ref: float  # largest |reference| value, the scale errors are judged against
    cosine: float | None  # None for non-float outputs
    argmax_agreement: float | None  # fraction of rows whose argmax (last axis) agrees
    mismatch: float  # fraction of elements that differ (integer/bool outputs) or are non-finite only on one side
    elements: int
    sqnr_db: float | None = None  # 10 log10(sum ref^2 / sum (ref - new)^2), capped at 100 dB; None for non-float
    #: The mean of the SQNRs of the slices along axis 1 (each capped at 100 dB): scale-balanced, so
    #: a detector's class scores (0..1) count as much as its box coordinates (0..640).
    balanced_sqnr_db: float | None = None

    @property
    def max_rel(self) -> float:
        """Largest absolute error relative to the output's largest magnitude."""
        return self.max_abs / self.max_ref if self.max_ref > 0 else (0.0 if self.max_abs == 0 else float("inf"))

    def allowed_abs(self, tol: Tolerance, noise: OutputMetrics | None = None) -> float:
        """The largest absolute error ``tol`` allows this output (``inf`` when none is bounded)."""
        if not tol.absolute:
            return math.inf
        allowed = tol.atol + tol.rtol * self.max_ref
        if tol.noise_multiple is not None and noise is not None:
            allowed = max(allowed, tol.noise_multiple * noise.max_abs)
        if tol.ceiling_rel is not None:
            allowed = min(allowed, max(tol.ceiling_rel * self.max_ref, tol.atol))
        return allowed

    def allowed_mismatch(self, tol: Tolerance, noise: OutputMetrics | None = None) -> float:
        allowed = tol.max_mismatch
        if tol.noise_multiple is not None and noise is not None and noise.mismatch:
            allowed = max(allowed, min(0.5, tol.noise_multiple * noise.mismatch))
        return allowed

    def within(self, tol: Tolerance, noise: OutputMetrics | None = None) -> bool:
        """Whether this output satisfies ``tol`` (see ``Tolerance``), given the model's ``noise``."""
        if self.mismatch > self.allowed_mismatch(tol, noise):
            return False
        if self.cosine is None:  # integer/bool output
            return True
        return self.max_abs <= self.allowed_abs(tol, noise) and (tol.min_cosine is None or self.cosine >= tol.min_cosine)

    def describe(self) -> str:
        parts = [f"max abs err {self.max_abs:.3g}", f"rel {self.max_rel:.3g}"]
        if self.cosine is not None:
            parts.append(f"cosine {self.cosine:.6f}")
        if self.sqnr_db is not None and self.sqnr_db < 100:
            parts.append(f"SQNR {self.sqnr_db:.1f} dB")
        if self.mismatch:
            parts.append(f"mismatch {self.mismatch:.2%}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_rel"] = self.max_rel
        return d


class OutputAccumulator:
    """Streams batches of (reference, candidate) for one output and yields ``OutputMetrics``."""

    def __init__(self, name: str):
        self.name = name
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.max_ref = 0.0
        self.dot = self.ref_sq = self.new_sq = self.err_sq = 0.0
        self.slice_ref_sq: np.ndarray | None = None  # per index of axis 1
        self.slice_err_sq: np.ndarray | None = None
        self.rows = self.rows_agree = 0
        self.mismatched = 0
        self.elements = 0
        self.is_float = True

    def update(self, ref: np.ndarray, new: np.ndarray) -> None:
        ref = np.asarray(ref)
        new = np.asarray(new)
        if ref.shape != new.shape:
            raise ValueError(f"output '{self.name}' changed shape: {ref.shape} -> {new.shape}")
        self.elements += ref.size
        if ref.size == 0:
            return
        if not np.issubdtype(ref.dtype, np.floating):
            self.is_float = False
            self.mismatched += int(np.count_nonzero(ref != new))
            return
        r = ref.astype(np.float64).ravel()
        n = new.astype(np.float64).ravel()
        finite = np.isfinite(r) & np.isfinite(n)
        same_nonfinite = ~finite & ((r == n) | (np.isnan(r) & np.isnan(n)))
        self.mismatched += int(np.count_nonzero(~finite & ~same_nonfinite))
        diff = np.abs(r[finite] - n[finite])
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.sum_abs += float(diff.sum())
            self.max_ref = max(self.max_ref, float(np.abs(r[finite]).max()))
            self.dot += float(np.dot(r[finite], n[finite]))
            self.ref_sq += float(np.dot(r[finite], r[finite]))
            self.new_sq += float(np.dot(n[finite], n[finite]))
            self.err_sq += float(np.dot(diff, diff))
        if ref.ndim >= 2 and np.all(finite):
            r1 = np.moveaxis(ref.astype(np.float64), 1, 0).reshape(ref.shape[1], -1)
            e1 = r1 - np.moveaxis(new.astype(np.float64), 1, 0).reshape(ref.shape[1], -1)
            if self.slice_ref_sq is None or self.slice_ref_sq.shape[0] != r1.shape[0]:
                self.slice_ref_sq, self.slice_err_sq = np.zeros(r1.shape[0]), np.zeros(r1.shape[0])
            self.slice_ref_sq += np.einsum("ij,ij->i", r1, r1)
            self.slice_err_sq += np.einsum("ij,ij->i", e1, e1)
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            ra = np.argmax(ref.reshape(-1, ref.shape[-1]), axis=-1)
            na = np.argmax(new.reshape(-1, new.shape[-1]), axis=-1)
            self.rows += ra.size
            self.rows_agree += int(np.count_nonzero(ra == na))

    def result(self) -> OutputMetrics:
        if not self.is_float:
            mismatch = self.mismatched / self.elements if self.elements else 0.0
            return OutputMetrics(self.name, 0.0, 0.0, 0.0, None, None, mismatch, self.elements)
        denom = np.sqrt(self.ref_sq) * np.sqrt(self.new_sq)
        if denom > 0:
            cosine = float(self.dot / denom)
        else:
            cosine = 1.0 if self.ref_sq == self.new_sq else 0.0
        mean_abs = self.sum_abs / self.elements if self.elements else 0.0
        agreement = self.rows_agree / self.rows if self.rows else None
        mismatch = self.mismatched / self.elements if self.elements else 0.0
        sqnr = _sqnr(self.ref_sq, self.err_sq)
        balanced = None
        if self.slice_ref_sq is not None:
            balanced = float(np.mean([_sqnr(r, e) for r, e in zip(self.slice_ref_sq, self.slice_err_sq)]))
        return OutputMetrics(self.name, self.max_abs, mean_abs, self.max_ref, cosine, agreement, mismatch, self.elements,
                             sqnr, balanced)


def _sqnr(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB, capped at 100 dB (also for no noise)."""
    return 100.0 if noise <= 0 else float(min(100.0, 10 * np.log10(max(signal, 1e-300) / noise)))


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> list[OutputMetrics]:
    """Metrics for every output of ``reference`` (in its order)."""
    return compare_batches([reference], [candidate])


def compare_batches(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> list[OutputMetrics]:
    """Metrics over several batches of outputs (streamed, so means are exact over all elements)."""
    accumulators: dict[str, OutputAccumulator] = {}
    for ref_batch, new_batch in zip(reference, candidate, strict=True):
        for name, ref in ref_batch.items():
            if name not in new_batch:
                raise ValueError(f"output '{name}' is missing from the transformed model")
            accumulators.setdefault(name, OutputAccumulator(name)).update(ref, new_batch[name])
    return [acc.result() for acc in accumulators.values()]


def first_violation(
    metrics: list[OutputMetrics], tol: Tolerance, noise: dict[str, OutputMetrics] | None = None
) -> OutputMetrics | None:
    """The first output that breaks ``tol`` (given the model's float ``noise`` per output), or None."""
    noise = noise or {}
    return next((m for m in metrics if not m.within(tol, noise.get(m.name))), None)
