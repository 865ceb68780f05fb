#!/usr/bin/env python
"""Benchmark scale-out on Ray (issue 14): what a task costs, and what calibration gains.

    python bench/scale.py                        # table on stdout
    python bench/scale.py --out bench/scale_results.md

Not a timed test: it starts its own local Ray clusters (``ray.init(num_cpus=1)``, then
``num_cpus=2``: this machine's two cores) and measures, with the project's own ``RayExecutor``:

1. **scheduling overhead per task**: ``n`` tasks that each spin the CPU for ``t`` seconds
   (t = 0.1 s and 1 s) on ``W`` workers; overhead per task ``o = (wall - ceil(n/W) * t) * W / n``
   (the wall time not explained by the work, spread over the tasks) and as a fraction of ``t``.
   The per-task time inside the task is measured by the executor (``StageRecord.task_s``).
2. **overhead per byte moved**: one task per payload of 1, 16 and 64 MB put in the object store
   (``executor.share``) and read by the task; the slope of time over bytes (least squares).
3. **calibration**: ``collect_statistics`` of every activation of ``digits_cnn`` on its 128
   calibration samples repeated to 1024 (real values, 8x the work), in-process and on 1 and 2
   workers (``SHARDS_PER_WORKER`` = 2 shards per worker); the merged statistics are checked
   bit-identical to the in-process ones.

The projection to 8/64/512 workers uses a stated model, fitted from the figures above, not
measured: ``T(W) = T_fixed + ceil(S/W) * t_shard + S * o / W + B * b`` where ``S = 2W`` shards
(``SHARDS_PER_WORKER``), ``t_shard = T_work / S`` (the in-process work split evenly, perfect
scaling of ONNX Runtime across nodes assumed), ``o`` the per-task overhead (1), ``B`` the bytes sent
to every task (model + in-memory data, each shard receiving the whole source) and ``b`` the per-byte
cost (2), ``T_fixed`` the driver's part (planning, the merge: measured as 2-worker wall minus its
tasks' share). With a fixed data set, ``t_shard`` shrinks as W grows until overhead dominates.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spin(seconds: float) -> float:
    """Busy CPU work for ``seconds`` (a sleeping task would hide CPU contention)."""
    end = time.perf_counter() + seconds
    x = 0.0
    while time.perf_counter() < end:
        x += math.sqrt(x + 1.0)
    return x


def read_payload(payload: bytes) -> int:
    return len(payload)


def measure_overhead(executor, seconds: float, tasks: int) -> dict:
    start = time.perf_counter()
    executor.map(spin, [(seconds,)] * tasks, stage=f"spin {seconds}s")
    wall = time.perf_counter() - start
    stage = executor.stages[-1]
    workers = executor.workers
    ideal = math.ceil(tasks / workers) * seconds
    per_task = max(0.0, (wall - ideal) * workers / tasks)
    return {"task_s": seconds, "tasks": tasks, "workers": workers, "wall_s": wall, "mean_task_s": stage.task_s / tasks,
            "overhead_per_task_s": per_task, "overhead_fraction": per_task / seconds}


def measure_bytes(executor) -> dict:
    sizes = [1 << 20, 16 << 20, 64 << 20]
    times = []
    for size in sizes:
        payload = np.random.default_rng(size).bytes(size)
        start = time.perf_counter()
        ref = executor.share(payload)
        executor.map(read_payload, [(ref,)], stage=f"bytes {size}")
        times.append(time.perf_counter() - start)
    slope, intercept = np.polyfit(np.array(sizes, float), np.array(times), 1)
    return {"sizes": sizes, "times": times, "per_byte_s": max(slope, 0.0), "fixed_s": intercept}


def _calibration_inputs():
    import onnx

    from calibration.data import load_npz

    model = onnx.load(ROOT / "sample_models" / "digits_cnn" / "model.onnx")
    names = [o for node in model.graph.node for o in node.output]
    data = load_npz(ROOT / "sample_models" / "digits_cnn" / "calib.npz")
    arrays = {k: np.concatenate([v] * 8) for k, v in data.arrays.items()}
    return model, names, arrays


def measure_in_process() -> tuple[dict, object]:
    from calibration.collect import collect_statistics

    model, names, arrays = _calibration_inputs()
    start = time.perf_counter()
    local = collect_statistics(model, names, arrays)
    wall = time.perf_counter() - start
    nbytes = model.ByteSize() + sum(a.nbytes for a in arrays.values())
    row = {"executor": "in-process", "workers": 1, "tasks": 1, "wall_s": wall, "task_s": wall, "identical": True}
    return {"samples": local.samples, "bytes": nbytes, "rows": [row]}, local


def measure_on_ray(executor, local) -> dict:
    """Calibration on the cluster ``executor`` is connected to (as many workers as it has CPUs)."""
    from calibration.collect import collect_statistics

    model, names, arrays = _calibration_inputs()
    start = time.perf_counter()
    stats = collect_statistics(model, names, arrays, executor=executor)
    wall = time.perf_counter() - start
    identical = all(np.array_equal(stats[n].hist, local[n].hist) and stats[n].amax == local[n].amax
                    and np.array_equal(stats[n].sample, local[n].sample) for n in local)
    stage = executor.stages[-1]
    return {"executor": "ray", "workers": executor.workers, "tasks": stage.tasks, "wall_s": wall,
            "task_s": stage.task_s / stage.tasks, "identical": identical}


def project(calib: dict, overhead: float, per_byte: float) -> list[dict]:
    rows = calib["rows"]
    work = rows[0]["wall_s"]  # in-process: all of the work, no overhead
    two = next(r for r in rows if r["workers"] == 2)
    fixed = max(0.0, two["wall_s"] - math.ceil(two["tasks"] / 2) * two["task_s"])
    out = []
    for workers in (8, 64, 512):
        shards = 2 * workers
        t_shard = work / shards
        wall = fixed + math.ceil(shards / workers) * t_shard + shards * overhead / workers + calib["bytes"] * per_byte
        out.append({"workers": workers, "shards": shards, "t_shard_s": t_shard, "wall_s": wall, "speedup": work / wall})
    return out


def render(overheads, moved, calib, projection, command: str) -> str:
    import ray

    lines = [
        "# Scale-out on Ray: measured",
        "",
        f"- date {time.strftime('%Y-%m-%d')}, {platform.machine()}, Python {platform.python_version()}, ray {ray.__version__}, "
        "local clusters `ray.init(num_cpus=1)` and `ray.init(num_cpus=2)` on a 2-core machine shared with other jobs",
        f"- command: `{command}`",
        "",
        "## Scheduling overhead per task (CPU-spinning tasks)",
        "",
        "| task time | tasks | workers | wall s | mean task s (measured in the task) | overhead per task | overhead / task time |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in overheads:
        lines.append(f"| {o['task_s']} s | {o['tasks']} | {o['workers']} | {o['wall_s']:.3f} | {o['mean_task_s']:.3f} | "
                     f"{o['overhead_per_task_s'] * 1e3:.1f} ms | {100 * o['overhead_fraction']:.2f} % |")
    lines += ["", "## Overhead per byte moved (object store, one task per payload)", "",
              "| payload | seconds |", "|---|---|"]
    lines += [f"| {s >> 20} MB | {t:.3f} |" for s, t in zip(moved["sizes"], moved["times"])]
    lines += ["", f"fit: {moved['per_byte_s'] * 1e9:.2f} ns per byte ({moved['per_byte_s'] * (1 << 30):.2f} s per GiB) "
              f"+ {moved['fixed_s'] * 1e3:.1f} ms per task", "",
              f"## Calibration: digits_cnn, every activation, {calib['samples']} samples "
              f"({calib['bytes'] / 1e6:.1f} MB of model + data)", "",
              "| executor | workers | tasks | wall s | per-task s | statistics bit-identical to in-process |", "|---|---|---|---|---|---|"]
    for r in calib["rows"]:
        lines.append(f"| {r['executor']} | {r['workers']} | {r['tasks']} | {r['wall_s']:.2f} | {r['task_s']:.2f} | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    lines += ["", "## Projection (model in the module docstring; not measured)", "",
              "| workers | shards | per-shard s | projected wall s | speed-up vs in-process |", "|---|---|---|---|---|"]
    lines += [f"| {p['workers']} | {p['shards']} | {p['t_shard_s']:.3f} | {p['wall_s']:.2f} | {p['speedup']:.1f}x |"
              for p in projection]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    import ray

    from optimizer.ray_executor import RayExecutor

    calib, local = measure_in_process()
    for cpus in (1, 2):  # a cluster per worker count: a 2-CPU cluster would run "1 worker" shards two at a time
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import bench/
        try:
            executor = RayExecutor()
            executor.map(spin, [(0.01,)] * 4, stage="warm-up")  # start the worker processes
            if cpus == 2:
                overheads = [measure_overhead(executor, 0.1, 20), measure_overhead(executor, 1.0, 8)]
                moved = measure_bytes(executor)
            calib["rows"].append(measure_on_ray(executor, local))
        finally:
            ray.shutdown()
    per_task = next(o for o in overheads if o["task_s"] == 1.0)["overhead_per_task_s"]
    text = render(overheads, moved, calib, project(calib, per_task, moved["per_byte_s"]),
                  "python bench/scale.py" + (f" --out {args.out}" if args.out else ""))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
