#!/usr/bin/env python
"""Benchmark ``layout-nchw``: Transpose count and ONNX Runtime CPU latency before and after.

For the channel-last sample model and the channel-last graphs written in
``tests/channel_last_models.py`` (plus a larger residual network built by the same code), runs

    fixpoint(cleanup,fold-constants,layout-nchw[(io=nchw)],fuse-conv-bn,fuse-affine,
             fuse-matmul-add,fuse-gemm-transpose,fuse-pad)

in process, then times the original and both results in ONNX Runtime on the CPU with
``ORT_ENABLE_ALL`` (ONNX Runtime's own transpose optimizer included: the baseline is what ORT
already achieves on the original): ``--warmup`` runs, then the median of ``--runs`` timed runs,
one thread by default. Speed-up is original / optimized from one run of this script; it is a
ratio on this machine, not a portable number. Inputs are seeded random values; with io=nchw they
are transposed to the model's new layout (from the pass's report ``details``) and the outputs
transposed back before the error is measured.

    python bench/layout.py                       # Markdown table on stdout
    python bench/layout.py --runs 200 --batch 8 --threads 2 --out bench/layout.md
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PIPELINE = (
    "fixpoint(cleanup,fold-constants,layout-nchw{opts},fuse-conv-bn,fuse-affine,fuse-matmul-add,"
    "fuse-gemm-transpose,fuse-pad)"
)


def _test_models():
    """The model builders of tests/channel_last_models.py (the tests' single source)."""
    sys.path.insert(0, str(TESTS))  # the module imports its `helpers` like pytest does
    spec = importlib.util.spec_from_file_location("channel_last_models", TESTS / "channel_last_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    models = dict(module.CHANNEL_LAST_MODELS)
    models["residual_56x56x32_x4"] = lambda: module.residual_model(size=56, channels=32, blocks=4)
    return models


def _inputs(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    from calibration.data import synthetic_inputs
    from optimizer.runtime import input_specs

    specs = input_specs(model)
    shapes = {s.name: tuple(d if isinstance(d, int) else batch for d in s.shape) for s in specs if s.is_dynamic}
    return synthetic_inputs(specs, shapes, seed=seed)


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _latency_ms(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int, warmup: int, threads: int):
    session = _session(model, threads)
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    names = [o.name for o in session.get_outputs()]
    return statistics.median(times) * 1e3, dict(zip(names, session.run(None, feeds)))


def _transposes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Transpose")


def _optimize(model: onnx.ModelProto, io: str):
    from optimizer import PassManager

    opts = "(io=nchw)" if io == "nchw" else ""
    # io=nchw changes the model's inputs, which the manager's numeric check cannot feed: compare here
    result = PassManager(PIPELINE.format(opts=opts), verify="structural" if io == "nchw" else "numeric").run(model)
    record = next(r for r in result.records if r.name == "layout-nchw")
    return result.model, record.details


def _max_rel(ref: dict, got: dict) -> float:
    worst = 0.0
    for name, r in ref.items():
        scale = float(np.max(np.abs(r))) or 1.0
        worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - r))) / scale)
    return worst


def bench(args) -> str:
    from optimizer.io_layout import LAYOUT_INPUTS_KEY, LAYOUT_OUTPUTS_KEY
    from passes.layout.perms import invert

    rows = []
    for name, build in _test_models().items():
        if args.models and name not in args.models:
            continue
        model = build()
        feeds = _inputs(model, args.batch)
        base_ms, ref = _latency_ms(model, feeds, args.runs, args.warmup, args.threads)
        cells = [name, str(len(model.graph.node)), str(_transposes(model)), f"{base_ms:.3f}"]
        for io in ("keep", "nchw"):
            opt, details = _optimize(model, io)
            in_perms = {k: v["perm"] for k, v in details.get(LAYOUT_INPUTS_KEY, {}).items()}
            out_perms = {k: v["perm"] for k, v in details.get(LAYOUT_OUTPUTS_KEY, {}).items()}
            opt_feeds = {k: np.ascontiguousarray(np.transpose(v, in_perms[k])) if k in in_perms else v for k, v in feeds.items()}
            ms, got = _latency_ms(opt, opt_feeds, args.runs, args.warmup, args.threads)
            got = {k: np.transpose(v, invert(tuple(out_perms[k]))) if k in out_perms else v for k, v in got.items()}
            counts = f"{len(opt.graph.node)} / {_transposes(opt)}"
            cells += [counts, f"{ms:.3f}", f"{base_ms / ms:.2f}x", f"{_max_rel(ref, got):.1e}"]
        rows.append(cells)
    header = ["model", "nodes", "Transposes", "ORT ms"]
    for io in ("keep", "io=nchw"):
        header += [f"{io}: nodes / Transposes", f"{io}: ORT ms", f"{io}: speed-up", f"{io}: max rel err"]
    title = (
        f"layout-nchw benchmark: ONNX Runtime {_ort_version()} CPU, ORT_ENABLE_ALL, {args.threads} thread(s), "
        f"batch {args.batch} for dynamic dims, median of {args.runs} runs after {args.warmup} warm-up; "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}."
    )
    lines = [
        title,
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="value for dynamic (batch) dims")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--models", nargs="*", help="only these models (names as in the table)")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    table = bench(args)
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
