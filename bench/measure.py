"""Child-process measurement shared by the benchmark scripts: wall time and the child's own peak RSS.

Kept free of the project's packages: the benchmarks treat the tools (ours included) as black boxes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    peak_mb: float | None
    stdout: str
    stderr: str
    timed_out: bool = False


GNU_TIME = Path("/usr/bin/time")

# Used when /usr/bin/time is missing: a small process that spawns the command and reports the
# command's rusage. It must be a fresh small process: on Linux a child's ru_maxrss starts from
# the RSS of the process it was forked from, so forking the command straight from this (large)
# benchmark process would report our own memory, not the tool's.
TRAMPOLINE = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(f'0 {usage.ru_maxrss}')\n"
    "sys.exit(os.waitstatus_to_exitcode(status) & 255)\n"
)


def _measured(cmd: list[str], rusage_file: Path) -> list[str]:
    """``cmd`` wrapped so that the child's own peak RSS (KiB) lands in ``rusage_file``."""
    if GNU_TIME.is_file() and os.access(GNU_TIME, os.X_OK):
        return [str(GNU_TIME), "-q", "-o", str(rusage_file), "-f", "%e %M"] + cmd
    return [sys.executable, "-S", "-c", TRAMPOLINE, str(rusage_file)] + cmd


def iter_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)
