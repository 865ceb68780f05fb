"""``RayExecutor``: the executor interface (``calibration.executor``) on a Ray cluster.

The only module that imports ``ray``, and only when a ``RayExecutor`` is made. ``workers=N`` starts
a local Ray cluster of N CPUs for this run (shut down by ``close``); ``address`` joins an existing
one (``"auto"``: the cluster in ``RAY_ADDRESS`` or one started with ``ray start`` on this machine),
and ``workers`` is then the cluster's CPU count. ``map`` runs one Ray task per item (retried by Ray
when a worker dies or the task raises: ``max_retries``), ``share`` puts an object in the object
store once for all tasks. Without Ray installed, making one raises ``InputError`` with the install
command.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.executor import StageRecord, timed_call
from optimizer.errors import InputError, OptimizerError

log = logging.getLogger(__name__)

INSTALL_HINT = 'Ray is not installed: pip install "onnx-trt-optimizer[ray]" (or pip install ray)'
#: Retries of a failed task (a dead worker or an exception) before the run fails.
MAX_RETRIES = 2


def _guarded_call(fn: Callable[..., Any], *args):
    """``timed_call`` on a worker; a user error (bad data, a path the node cannot read) is
    returned, not raised, so Ray does not retry it."""
    try:
        return timed_call(fn, *args)
    except OptimizerError as exc:
        return exc


def import_ray():
    """``ray``, or ``InputError`` with the one-line install hint."""
    try:
        import ray
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return ray


def _send_ray_token_if_present() -> None:
    """Ray (2.59+) starts a cluster with token authentication when a token exists (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), yet a driver that joins by address sends
    it only with ``RAY_AUTH_MODE=token``, so ``ray start --head`` then ``--ray auto`` failed with
    "Authentication token is missing". Set the mode, as Ray's own local ``ray.init`` does, unless
    the user chose one; a cluster without authentication ignores the token."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray caches its config at import: refresh it, as Ray's own token setup does
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):  # another Ray version: the variable is all it reads
            pass


@dataclass
class RayExecutor:
    """Runs tasks on Ray. ``address``: join a cluster (``"auto"`` or ``host:port``); else start a
    local one with ``workers`` CPUs (default: this machine's)."""

    address: str | None = None
    workers: int | None = None
    max_retries: int = MAX_RETRIES
    name: str = "ray"
    stages: list[StageRecord] = field(default_factory=list)
    _started: bool = field(default=False, repr=False)
    _remote: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1):
            raise InputError(f"workers must be a positive integer, got {self.workers!r}")
        ray = import_ray()
        if ray.is_initialized():
            pass  # a cluster this process already joined (tests, notebooks): use it as is
        elif self.address is not None:
            _send_ray_token_if_present()
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(f"cannot join the Ray cluster at {self.address!r}: {str(exc).splitlines()[0]}") from None
            self._started = True  # we joined: disconnect (the cluster keeps running)
        else:
            # address="local": always a new cluster, never one a `ray start` left on this machine
            ray.init(address="local", num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
            self._started = True
        self.cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = self.cpus if self.address is not None or self.workers is None else self.workers
        self.nodes = len([n for n in ray.nodes() if n.get("Alive")])

    def _task(self):
        if "task" not in self._remote:
            # retry_exceptions: a task that raises is retried like one whose worker died (user
            # errors come back as values, so they are not retried)
            self._remote["task"] = import_ray().remote(max_retries=self.max_retries, retry_exceptions=True)(_guarded_call)
        return self._remote["task"]

    def map(self, fn: Callable[..., Any], items: Sequence[tuple], *, stage: str) -> list:
        ray = import_ray()
        start = time.perf_counter()
        task = self._task()
        refs = [task.remote(fn, *item) for item in items]
        outcomes = ray.get(refs)
        for outcome in outcomes:
            if isinstance(outcome, OptimizerError):
                raise outcome
        results = [result for result, _ in outcomes]
        self.stages.append(StageRecord(stage, len(items), time.perf_counter() - start, sum(s for _, s in outcomes)))
        return results

    def share(self, obj: Any) -> Any:
        return import_ray().put(obj)

    def describe(self) -> dict:
        """The report's ``executor``: name, address, workers, the cluster's live nodes and CPUs,
        and per stage tasks and times."""
        return {"name": self.name, "address": self.address, "workers": self.workers, "nodes": self.nodes,
                "cpus": self.cpus, "stages": [s.to_dict() for s in self.stages]}

    def close(self) -> None:
        """Shut down the cluster this executor started (or leave the one it joined)."""
        if self._started:
            import_ray().shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["INSTALL_HINT", "RayExecutor", "import_ray"]
