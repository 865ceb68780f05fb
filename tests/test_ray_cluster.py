"""A two-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): calibration shards run
on both nodes and the merged statistics equal the in-process ones bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from calibration.collect import collect_statistics

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

ROOT = Path(__file__).resolve().parents[1]


def test_two_node_cluster_calibrates_bit_identically():
    from ray.cluster_utils import Cluster

    from optimizer.ray_executor import RayExecutor

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        executor = RayExecutor(address=cluster.address)
        assert executor.workers == 2 and executor.nodes == 2
        model = onnx.load(ROOT / "sample_models" / "transformer" / "model.onnx")
        names = [o for node in model.graph.node for o in node.output]
        calib = ROOT / "sample_models" / "transformer" / "calib.npz"
        local = collect_statistics(model, names, calib)
        sharded = collect_statistics(model, names, calib, executor=executor)
        assert sharded.shards == 4 and sharded.samples == local.samples
        assert list(sharded) == list(local)
        for name in local:
            a, b = local[name], sharded[name]
            assert (a.count, a.amax, a.min, a.max, a.hist_range) == (b.count, b.amax, b.min, b.max, b.hist_range)
            np.testing.assert_array_equal(a.hist, b.hist)
            np.testing.assert_array_equal(a.sample, b.sample)
        executor.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
