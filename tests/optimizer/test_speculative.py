"""Speculative rounds (``optimizer.speculative``) give the sequential search's result and path, for
any width and any predicate -- monotone or not -- and width 1 is the sequential search itself."""

from __future__ import annotations

import random

import pytest

from optimizer.speculative import speculative_search


def sequential_first_bad(n: int, bad) -> tuple[int | None, list[int]]:
    """``optimize check --bisect``'s search written one evaluation at a time (its old code)."""
    asked = [n]
    if not bad(n):
        return None, asked
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        asked.append(mid)
        if bad(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo, asked


def bisect_steps(n: int):
    def step(state):
        if state[0] == "full":
            return n, ("search", 1, n), ("clean",)
        if state[0] == "search" and state[1] < state[2]:
            mid = (state[1] + state[2]) // 2
            return mid, ("search", state[1], mid), ("search", mid + 1, state[2])
        return None

    return step


def predicates(n: int, rng: random.Random):
    """A monotone predicate (bad from some k on) and a non-monotone one (random)."""
    first = rng.randint(1, n + 1)
    table = [rng.random() < 0.5 for _ in range(n + 1)]
    return [lambda k, f=first: k >= f, lambda k, t=table: t[k]]


@pytest.mark.parametrize("width", [1, 2, 3, 4, 7, 16])
def test_bisection_rounds_name_what_the_sequential_search_names(width):
    rng = random.Random(width)
    for n in range(1, 40):
        for bad in predicates(n, rng):
            expected, asked = sequential_first_bad(n, bad)
            evaluated: list[list[int]] = []

            def evaluate(keys, bad=bad):
                assert len(keys) <= width and len(set(keys)) == len(keys)
                evaluated.append(list(keys))
                return [bad(k) for k in keys]

            result = speculative_search(("full",), bisect_steps(n), evaluate, bool, width)
            found = result.state[1] if result.state[0] == "search" else None
            assert found == expected and [k for k, _ in result.path] == asked, (n, width)
            assert all(k not in sum(evaluated[:i], []) for i, round_ in enumerate(evaluated) for k in round_)
            if width == 1:
                assert evaluated == [[k] for k in asked]  # exactly the sequential evaluations
            else:
                assert result.rounds <= len(asked)


def test_known_values_are_not_evaluated_again():
    n = 16
    seen = []

    def evaluate(keys):
        seen.extend(keys)
        return [k >= 5 for k in keys]

    result = speculative_search(("full",), bisect_steps(n), evaluate, bool, 3, known={16: True, 8: True})
    assert result.state == ("search", 5, 5)
    assert 16 not in seen and 8 not in seen
