"""bench_thin_conv's unfold + GEMM formulation of a thin convolution (forward, input grad,
weight grad) against a float64 convolution: the candidate must compute the same thing."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))


@pytest.mark.parametrize("in_channels,kernel,size", [(1, 3, 9), (3, 5, 7), (2, 1, 6)])
def test_gemm_formulation_matches_float64(in_channels, kernel, size):
    import bench_thin_conv

    rows = bench_thin_conv.main(["--batches", "3", "--dtypes", "fp32", "--reps", "2", "--no-csv", "--device", "cpu",
                                 "--in-channels", str(in_channels), "--out-channels", "5", "--kernel", str(kernel),
                                 "--size", str(size)])
    assert [r["pass"] for r in rows] == ["forward", "input grad", "weight grad"]
    for r in rows:
        assert r["gemm_err"] < 1e-5 and r["cl_err"] < 1e-5, r
