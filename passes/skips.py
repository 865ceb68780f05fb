"""The one counter of the sites a pass refuses, by reason.

A check that refuses a site says why, in words (``"weight_not_constant"``, ``"unknown shape"``);
the pass counts the reason here and returns the counts as ``PassResult(skipped=...)``. The manager
turns each reason into the report's ``skipped_<reason>`` stat (``optimizer.events.skip_key``):
passes never write that prefix themselves.
"""

from __future__ import annotations


class Skips(dict):
    """``{reason: sites}``. ``add(reason, site=node)`` counts a site once per reason however often
    it is refused (passes that revisit a site every round)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._seen: set[tuple[str, int]] = set()

    def add(self, reason: str, count: int = 1, site: object = None) -> None:
        if site is not None:
            if (reason, id(site)) in self._seen:
                return
            self._seen.add((reason, id(site)))
        self[reason] = self.get(reason, 0) + count

    def merge(self, other: dict[str, int]) -> None:
        """Add the counts of ``other`` (another pass step's ``{reason: sites}``)."""
        for reason, count in other.items():
            self.add(reason, count)
