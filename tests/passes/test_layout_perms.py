"""Permutation algebra of ``layout-nchw`` (passes/layout/perms.py)."""

import numpy as np

from passes.layout.perms import compose, invert


def test_permutation_helpers():
    p = (0, 2, 3, 1)
    assert compose(p, invert(p)) == (0, 1, 2, 3)
    x = np.arange(24).reshape(1, 2, 3, 4)
    assert np.array_equal(np.transpose(np.transpose(x, p), (0, 3, 1, 2)), np.transpose(x, compose(p, (0, 3, 1, 2))))
