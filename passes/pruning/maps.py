"""Channel maps: which channels of which source lie where along a tensor's channel axis.

The analysis (``groups``) gives every layer output a *source* and every activation it tracks a
``ChannelMap``; a ``_Use`` records a layer reading tracked channels; handlers raise ``_Blocked``
when the channels reaching a node cannot be pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class Segment:
    """``length`` channels of source ``source``, each spanning ``block`` consecutive positions."""

    source: int
    length: int
    block: int = 1


@dataclass(frozen=True)
class ChannelMap:
    """Which group channels sit where along axis ``axis`` of a tensor (segments in order)."""

    axis: int
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.length * s.block for s in self.segments)

    def moved(self, axis: int, block: int = 1) -> ChannelMap:
        return ChannelMap(axis, tuple(Segment(s.source, s.length, s.block * block) for s in self.segments))


@dataclass
class _Source:
    producer: gs.Node | None
    channels: int
    tensor: str


@dataclass
class _Use:
    """A layer reading group channels: its input ``tensor`` carries ``cmap``."""

    node: gs.Node
    tensor: str
    cmap: ChannelMap
    weight_axis: int
    foldable: bool  # a constant input channel can be folded into its bias exactly


class _Blocked(Exception):
    """Raised by handlers: the channels reaching this node cannot be pruned, for ``reason``."""
