"""Comparing outputs: max/mean absolute error, cosine similarity, argmax agreement, task accuracy.

Accumulators are streaming: evaluation feeds them batch by batch, so memory does not grow with
the number of samples. Their sums are exact (``ExactSum``), so accumulators over parts of the data
``merge`` into bit-for-bit the accumulator of one pass over all of it, in any order.
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


#: Every finite float64 is an integer multiple of 2**-1074, so values scaled by 2**EXACT_SHIFT are
#: Python integers, and adding those is exact in any order and grouping (math.fsum cannot merge
#: partial sums). frexp exponents are >= -1073, so every shift below is >= 4.
EXACT_SHIFT = 1130


def exact_integers(values) -> np.ndarray:
    """Finite float64 ``values`` as Python integers (an object array of their shape) scaled by
    ``2**EXACT_SHIFT``: sums of them are exact."""
    mantissa, exponent = np.frexp(np.asarray(values, np.float64))
    integers = (mantissa * 2.0**53).astype(np.int64).astype(object)  # exact: 53-bit mantissas
    return integers << (exponent.astype(np.int64) - 53 + EXACT_SHIFT).astype(object)


def exact_quotient(total: int, divisor: int = 1) -> float:
    """``total / 2**EXACT_SHIFT / divisor``, correctly rounded (Python's int / int is)."""
    try:
        return total / (int(divisor) << EXACT_SHIFT)
    except OverflowError:
        return math.copysign(math.inf, total)


class ExactSum:
    """A running sum of float64 scalars (or of same-shaped arrays) that is exact: any order and
    grouping of ``add`` and ``merge`` gives the same bits. Non-finite values are summed apart as
    floats (inf/nan sums do not depend on the order either)."""

    def __init__(self):
        self.total = None  # Python int, or an object array of them
        self.special = 0.0  # the sum of the non-finite values

    def add(self, values) -> None:
        v = np.asarray(values, np.float64)
        finite = np.isfinite(v)
        if not finite.all():
            self.special = self.special + np.where(finite, 0.0, v)
            v = np.where(finite, v, 0.0)
        ints = exact_integers(v)
        ints = int(ints) if np.ndim(ints) == 0 else ints
        self.total = ints if self.total is None else self.total + ints

    def merge(self, other: ExactSum) -> None:
        if other.total is not None:
            self.total = other.total if self.total is None else self.total + other.total
            self.special = self.special + other.special

    def value(self, divisor: int = 1):
        """The sum (divided by ``divisor``), correctly rounded: a float, or a float64 array."""
        if self.total is None:
            return 0.0
        if isinstance(self.total, np.ndarray):
            finite = np.array([exact_quotient(t, divisor) for t in self.total.ravel()], np.float64).reshape(self.total.shape)
        else:
            finite = exact_quotient(self.total, divisor)
        special = np.asarray(self.special, np.float64)
        if not np.any(special != 0.0):  # (nan != 0 too)
            return finite
        merged = np.where(special != 0.0, special / divisor, finite)
        return float(merged) if merged.ndim == 0 else merged


class OutputAccumulator:
    """Streams batches of (reference, candidate) for one output and yields ``OutputMetrics``;
    ``merge`` folds in another accumulator of the same output (other batches) exactly."""

    def __init__(self, name: str):
        self.name = name
        self.max_abs = 0.0
        self.max_ref = 0.0
        # exact sums of the per-batch sums: |err|, ref.new, ref^2, new^2, err^2
        self.sums = {key: ExactSum() for key in ("abs", "dot", "ref_sq", "new_sq", "err_sq")}
        # per index of axis 1 (ref^2, err^2); None once batches disagree on that axis' length
        self.slices: tuple[ExactSum, ExactSum] | None = (ExactSum(), ExactSum())
        self.slice_count: int | None = None
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
            self.max_ref = max(self.max_ref, float(np.abs(r[finite]).max()))
            self.sums["abs"].add(diff.sum())
            self.sums["dot"].add(np.dot(r[finite], n[finite]))
            self.sums["ref_sq"].add(np.dot(r[finite], r[finite]))
            self.sums["new_sq"].add(np.dot(n[finite], n[finite]))
            self.sums["err_sq"].add(np.dot(diff, diff))
        if ref.ndim >= 2 and np.all(finite):
            r1 = np.moveaxis(ref.astype(np.float64), 1, 0).reshape(ref.shape[1], -1)
            e1 = r1 - np.moveaxis(new.astype(np.float64), 1, 0).reshape(ref.shape[1], -1)
            batch = ExactSum(), ExactSum()
            batch[0].add(np.einsum("ij,ij->i", r1, r1))
            batch[1].add(np.einsum("ij,ij->i", e1, e1))
            self._fold_slices(r1.shape[0], *batch)
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            ra = np.argmax(ref.reshape(-1, ref.shape[-1]), axis=-1)
            na = np.argmax(new.reshape(-1, new.shape[-1]), axis=-1)
            self.rows += ra.size
            self.rows_agree += int(np.count_nonzero(ra == na))

    def _fold_slices(self, count: int, ref_sq: ExactSum, err_sq: ExactSum) -> None:
        """Per-slice sums of axis 1; dropped for good when batches disagree on its length (so the
        result never depends on which batches came last)."""
        if self.slices is None or (self.slice_count is not None and count != self.slice_count):
            self.slices = None
            return
        self.slice_count = count
        self.slices[0].merge(ref_sq)
        self.slices[1].merge(err_sq)

    def merge(self, other: OutputAccumulator) -> None:
        """Fold in the accumulator of other batches of the same output: exact, order-independent."""
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_ref = max(self.max_ref, other.max_ref)
        for key, total in self.sums.items():
            total.merge(other.sums[key])
        if other.slices is None:
            self.slices = None
        elif other.slice_count is not None:
            self._fold_slices(other.slice_count, *other.slices)
        self.rows += other.rows
        self.rows_agree += other.rows_agree
        self.mismatched += other.mismatched
        self.elements += other.elements
        self.is_float = self.is_float and other.is_float

    def result(self) -> OutputMetrics:
        if not self.is_float:
            mismatch = self.mismatched / self.elements if self.elements else 0.0
            return OutputMetrics(self.name, 0.0, 0.0, 0.0, None, None, mismatch, self.elements)
        dot, ref_sq, new_sq, err_sq = (self.sums[k].value() for k in ("dot", "ref_sq", "new_sq", "err_sq"))
        denom = np.sqrt(ref_sq) * np.sqrt(new_sq)
        if denom > 0:
            cosine = float(dot / denom)
        else:
            cosine = 1.0 if ref_sq == new_sq else 0.0
        mean_abs = self.sums["abs"].value(self.elements) if self.elements else 0.0
        agreement = self.rows_agree / self.rows if self.rows else None
        mismatch = self.mismatched / self.elements if self.elements else 0.0
        sqnr = _sqnr(ref_sq, err_sq)
        balanced = None
        if self.slices is not None and self.slice_count is not None:
            slice_ref, slice_err = self.slices[0].value(), self.slices[1].value()
            balanced = float(np.mean([_sqnr(r, e) for r, e in zip(slice_ref, slice_err)]))
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
