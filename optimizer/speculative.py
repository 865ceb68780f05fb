"""Sequential searches run in parallel rounds, with the sequential result.

The accuracy budget's bisection and refinement, its pruning order and ``optimize check --bisect``
are decision procedures: each step evaluates one candidate and its outcome picks the next. We keep
them sequential and evaluate *ahead*: a round evaluates, as executor tasks, the next ``width``
candidates the procedure may ask for (breadth-first over both outcomes of every pending decision),
then the procedure walks on through every decision those results settle. The walk is the
sequential procedure itself, so the result -- and the path of candidates it took -- is the one
evaluating a single candidate at a time gives, for any ``width`` and any predicate (also a
non-monotone one, where a k-ary split could land on another transition). With ``width`` 1 it *is*
the sequential search; with W workers a round settles ``log2(W + 1)`` decisions or more. The
price is evaluations off the path (counted in the executor's stages, not in the result).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: ``step(state)``: None when the procedure is done, else ``(candidate key, next state if the
#: candidate's outcome is true, next state otherwise)``.
Step = Callable[[Any], "tuple[Hashable, Any, Any] | None"]


@dataclass
class SearchResult:
    """The final state, the candidates on the decision path with their values (in order), and
    every value evaluated (``values``, path or not)."""

    state: Any
    path: list[tuple[Hashable, Any]] = field(default_factory=list)
    values: dict = field(default_factory=dict)
    rounds: int = 0


def speculative_search(start, step: Step, evaluate: Callable[[list], Sequence], decide: Callable[[Any], bool],
                       width: int, known: dict | None = None) -> SearchResult:
    """Run the procedure ``step`` from ``start``: ``evaluate(keys)`` returns one value per key (one
    task each), ``decide(value)`` the outcome of a candidate; at most ``width`` keys per round.
    ``known``: values already evaluated (by key)."""
    result = SearchResult(start, values=dict(known or {}))
    width = max(1, int(width))
    while True:
        node = step(result.state)
        while node is not None and node[0] in result.values:  # walk through every settled decision
            key, yes, no = node
            value = result.values[key]
            result.path.append((key, value))
            result.state = yes if decide(value) else no
            node = step(result.state)
        if node is None:
            return result
        keys = _ahead(result.state, step, result.values, decide, width)
        result.values.update(zip(keys, evaluate(keys)))
        result.rounds += 1


def _ahead(state, step: Step, known: dict, decide: Callable[[Any], bool], width: int) -> list:
    """The first ``width`` unevaluated candidates reachable from ``state``, breadth-first (a
    decision already settled is followed one way only)."""
    keys: list = []
    frontier = [state]
    while frontier and len(keys) < width:
        following = []
        for current in frontier:
            node = step(current)
            if node is None:
                continue
            key, yes, no = node
            if key in known:
                following.append(yes if decide(known[key]) else no)
                continue
            if key not in keys:
                keys.append(key)
                if len(keys) == width:
                    break
            following += [yes, no]
        frontier = following
    return keys


__all__ = ["SearchResult", "speculative_search"]
