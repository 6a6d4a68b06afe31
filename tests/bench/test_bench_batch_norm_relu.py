"""bench_batch_norm_relu measures the op it claims to: both paths agree with the float64
reference on the shapes it runs."""

import os
import sys

import pytest

from fastunlearn.runtime import backends as _backends

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))


@pytest.mark.skipif(not _backends.has_cpu_op("batch_norm_relu"), reason="native extension not built")
def test_bench_rows_hold_both_paths_within_rounding():
    import bench_batch_norm_relu

    rows = bench_batch_norm_relu.main(["--shapes", "3x5x7x9,4x24x6x5", "--reps", "2", "--no-csv"])
    assert [(r["shape"], r["dtype"], r["layout"]) for r in rows][:2] == [("3x5x7x9", "bf16", "cl"),
                                                                         ("3x5x7x9", "bf16", "nchw")]
    assert len(rows) == 8
    for r in rows:
        tol = 1e-5 if r["dtype"] == "fp32" else 8e-3
        assert r["fused_err_y"] < tol and r["fused_err_dx"] < tol and r["fused_err_dwb"] < 1e-5, r
        assert r["eager_ms"] > 0 and r["fused_ms"] > 0 and r["speedup"] == r["eager_ms"] / r["fused_ms"]
