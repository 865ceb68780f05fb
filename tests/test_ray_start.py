"""``--ray auto`` against a cluster a user started with ``ray start --head`` (issue 14): the run
joins it, writes the same model as the in-process run and reports the cluster's workers.

The head runs with ``--block`` in its own session, so the test stops exactly that cluster (never
``ray stop``, which would stop every Ray process on the machine). The optimize run is a child
process: this test process may already be connected to another test's cluster."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("ray")]

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "sample_models" / "digits_cnn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="/tmp/rs")  # short: Ray's unix socket paths must stay under 108 bytes
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.Popen(
        [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.time() + 180
    while not any("Ray runtime started" in line for line in seen):  # printed once the head is up
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("ray start --head did not come up: " + "".join(seen)[-2000:])
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    address = f"127.0.0.1:{port}"
    try:
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # Ray's graceful stop takes ~30 s; this cluster holds nothing
            os.killpg(proc.pid, signal.SIGKILL)
        # every process of this cluster names its temp dir: stop any that left the session
        if shutil.which("pkill"):  # procps may be missing on a minimal machine
            subprocess.run(["pkill", "-9", "-f", temp], check=False)


def _optimize(out: Path, *extra: str, env: dict | None = None) -> dict:
    report = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "optimizer.cli", str(DIGITS / "model.onnx"), "--int8", "--calib",
           str(DIGITS / "calib.npz"), "-o", str(out), "--report", str(report), "--json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(report.read_text())


def test_ray_auto_joins_a_ray_start_cluster_and_reports_its_workers(head, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=head)  # what `ray start` tells a user to export
    joined = _optimize(tmp_path / "ray.onnx", "--ray", "auto", env=env)
    local = _optimize(tmp_path / "local.onnx")
    info = joined["executor"]
    assert info["name"] == "ray" and info["address"] == "auto"
    assert info["workers"] == 2 and info["nodes"] == 1  # the head's --num-cpus=2, one node
    assert any(stage["tasks"] >= 1 for stage in info["stages"])  # work really ran on the cluster
    digest = [hashlib.sha256((tmp_path / f"{n}.onnx").read_bytes()).hexdigest() for n in ("ray", "local")]
    assert digest[0] == digest[1]
