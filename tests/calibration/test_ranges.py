"""Range methods on known distributions, against slow reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.collect import TensorStats, collect_statistics
from calibration.ranges import (
    AUTO_CANDIDATES,
    METHODS,
    TensorRange,
    auto,
    compute_range,
    compute_ranges,
    entropy_threshold,
    fake_quantize,
    mse_threshold,
    percentile_threshold,
    sqnr_db,
)
from calibration.sources import SyntheticSource
from optimizer.errors import InputError


def stats_of(values: np.ndarray, batches: int = 5, **options) -> TensorStats:
    """Stream ``values`` in a few batches, so the histogram grows as in a real run."""
    s = TensorStats("t", **options)
    for chunk in np.array_split(np.asarray(values, np.float32), batches):
        s.update(chunk)
    return s


RNG = np.random.default_rng(42)
UNIFORM = RNG.uniform(-3.0, 3.0, 100_000)
GAUSS_OUTLIERS = np.concatenate([RNG.normal(0.0, 1.0, 100_000), [50.0, -45.0, 48.0]])
LAPLACE = RNG.laplace(0.0, 1.0, 100_000)


def test_tensor_range_is_symmetric_int8():
    r = TensorRange("t", 2.54, "minmax")
    assert r.scale == pytest.approx(0.02) and r.zero_point == 0 and r.sqnr_db is None


def test_uniform_minmax_is_the_max_and_others_stay_close():
    s = stats_of(UNIFORM)
    ranges = {m: compute_range(s, m) for m in METHODS}
    assert ranges["minmax"].amax == pytest.approx(np.abs(UNIFORM).max(), rel=1e-6)
    assert ranges["minmax"].amax == pytest.approx(3.0, abs=1e-3)
    for method in ("percentile", "entropy", "mse"):
        assert 2.85 <= ranges[method].amax <= 3.0, (method, ranges[method])
    assert all(r.name == "t" and r.sqnr_db > 40 for r in ranges.values())


def test_gaussian_outliers_are_clipped_by_percentile_and_entropy():
    s = stats_of(GAUSS_OUTLIERS)
    assert compute_range(s, "minmax").amax == pytest.approx(50.0)
    p = compute_range(s, "percentile")
    e = compute_range(s, "entropy")
    # 99.99th percentile of |N(0,1)| is 3.89; entropy stops within the Gaussian body
    assert 3.6 <= p.amax <= 4.3
    assert 2.5 <= e.amax <= 10.0
    assert compute_range(s, "percentile").amax < compute_range(s, "minmax").amax
    assert percentile_threshold(s.hist, s.bin_width, 100.0) == pytest.approx(s.hist_range * (np.flatnonzero(s.hist)[-1] + 1) / s.num_bins)


def test_entropy_on_laplace_is_in_a_sane_band():
    s = stats_of(LAPLACE)
    e = compute_range(s, "entropy")
    # Laplace(b=1), 1e5 samples: max |x| ~ 11.5; KL keeps most of the tail but clips the last outliers
    assert 5.0 <= e.amax <= s.amax
    assert e.amax < s.amax


def _reference_entropy(hist, width, nq=128, start=128):
    """The algorithm exactly as documented, one candidate at a time (slow, obvious)."""
    hist = np.asarray(hist, np.float64).copy()
    hist[0] = min(hist[0], hist[1])
    last = np.flatnonzero(hist)[-1] + 1
    if last <= start:
        return last * width
    best, best_i = math.inf, None
    for i in range(start, last + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        levels = (np.arange(i) * nq) // i
        q = np.zeros(i)
        for k in range(nq):
            members = levels == k
            nonzero = members & (p != 0)
            if nonzero.any():
                q[nonzero] = hist[:i][members].sum() / nonzero.sum()
        if q.sum() == 0:
            continue
        holes = (p != 0) & (q == 0)
        q = np.where(holes, 1e-4, q * (1 - 1e-4 * holes.sum() / q.sum()))
        p, q = p / p.sum(), q / q.sum()
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
        if kl <= best:
            best, best_i = kl, i
    return best_i * width


@pytest.mark.parametrize("values", [LAPLACE[:20_000], GAUSS_OUTLIERS[:20_000], np.maximum(UNIFORM[:20_000], 0)])
def test_entropy_matches_the_slow_reference(values):
    s = stats_of(values, num_bins=512)
    assert entropy_threshold(s.hist, s.bin_width, chunk=7) == pytest.approx(_reference_entropy(s.hist, s.bin_width))


def test_entropy_edge_cases():
    assert entropy_threshold(np.zeros(2048), 0.1) == 0.0
    hist = np.zeros(2048)
    hist[:100] = 5
    assert entropy_threshold(hist, 0.5) == 50.0  # everything fits in the first 128 bins: no clipping
    constant = stats_of(np.full(1000, 2.5))
    assert compute_range(constant, "entropy").amax == pytest.approx(2.5)


def test_mse_threshold_is_near_the_brute_force_optimum():
    for values in (LAPLACE, GAUSS_OUTLIERS, UNIFORM):
        s = stats_of(values)
        chosen = compute_range(s, "mse").amax
        grid = np.linspace(s.amax / 64, s.amax, 400)
        errors = [np.mean((values - fake_quantize(values, t)) ** 2) for t in grid]
        best = min(errors)
        assert np.mean((values - fake_quantize(values, chosen)) ** 2) <= best * 1.02, (chosen, grid[int(np.argmin(errors))])
    # coarse-to-fine search finds what a full scan finds
    s = stats_of(LAPLACE)
    assert mse_threshold(s.hist, s.bin_width) == mse_threshold(s.hist, s.bin_width, coarse_steps=10_000)


def test_auto_picks_the_best_sqnr_candidate():
    for values in (UNIFORM, GAUSS_OUTLIERS, LAPLACE, np.maximum(LAPLACE, 0)):
        s = stats_of(values)
        chosen = auto(s)
        candidates = [compute_range(s, m) for m in AUTO_CANDIDATES]
        assert chosen.method in AUTO_CANDIDATES
        assert all(chosen.sqnr_db >= c.sqnr_db for c in candidates)
        assert chosen == next(c for c in candidates if c.method == chosen.method)
        assert chosen.sqnr_db == pytest.approx(sqnr_db(s.sample, chosen.amax))


def test_fake_quantize_and_sqnr():
    x = np.array([-2.0, -1.0, 0.0, 0.004, 1.0, 3.0])
    q = fake_quantize(x, 1.27)  # scale 0.01
    np.testing.assert_allclose(q, [-1.27, -1.0, 0.0, 0.0, 1.0, 1.27])
    assert sqnr_db(np.zeros(3), 1.0) is None and sqnr_db(np.array([1.27]), 1.27) == math.inf
    assert fake_quantize(x, 0.0).tolist() == [0.0] * 6


def test_degenerate_stats():
    empty = TensorStats("e")
    for method in METHODS:
        r = compute_range(empty, method)
        assert r.amax == 0.0 and r.sqnr_db is None
    zeros = stats_of(np.zeros(100))
    assert compute_range(zeros, "entropy").amax == 0.0


def test_unknown_method_suggests_a_name():
    with pytest.raises(InputError, match="did you mean 'entropy'"):
        compute_range(TensorStats("t"), "entropie")
    with pytest.raises(InputError, match="candidate"):
        auto(stats_of(UNIFORM[:100]), candidates=("auto",))


def test_end_to_end_ranges_from_a_model():
    import onnx.parser

    model = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 8] y) { r = Relu(x)  y = Mul(r, r) }
        """
    )
    stats = collect_statistics(model, ["x", "r", "y"], SyntheticSource(64), batch_size=16)
    for method in METHODS:
        ranges = compute_ranges(stats, method)
        assert list(ranges) == ["x", "r", "y"]
        assert all(0 < r.amax <= stats[r.name].amax for r in ranges.values())
    assert compute_ranges(stats, "minmax")["y"].amax == pytest.approx(stats["r"].amax ** 2, rel=1e-6)
