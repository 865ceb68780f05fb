"""Permutation algebra for layout-nchw: a tensor labeled ``(pre, perm)`` equals ``Transpose(pre, perm)``."""

from __future__ import annotations

Perm = tuple[int, ...]


def invert(perm: Perm) -> Perm:
    """The permutation that undoes ``perm``."""
    inv = [0] * len(perm)
    for i, axis in enumerate(perm):
        inv[axis] = i
    return tuple(inv)


def compose(first: Perm, then: Perm) -> Perm:
    """``Transpose(Transpose(x, first), then) == Transpose(x, compose(first, then))``."""
    return tuple(first[i] for i in then)


def is_identity(perm: Perm) -> bool:
    return all(i == axis for i, axis in enumerate(perm))


def channel_first_perm(rank: int) -> Perm:
    """NHWC -> NCHW for any rank >= 3: ``(0, rank-1, 1, ..., rank-2)``."""
    return (0, rank - 1) + tuple(range(1, rank - 1))


def transposed_shape(shape, perm: Perm):
    """The shape of ``Transpose(x, perm)`` for ``x`` of ``shape`` (None stays None)."""
    if shape is None or len(shape) != len(perm):
        return None
    return [shape[a] for a in perm]
