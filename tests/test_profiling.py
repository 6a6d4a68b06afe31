"""The profiler summaries bench --profile writes."""

from types import SimpleNamespace

from fastunlearn.profiling import layout_conversions


def test_layout_conversions_sum_cudnns_transposes_only():
    def avg(key, us, count):
        return SimpleNamespace(key=key, self_device_time_total=us, count=count)

    averages = [
        avg("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>",
            300.0, 4),
        avg("void cudnn::engines_precompiled::nhwcToNchwKernel<float, float, float, true, false>", 50.0, 2),
        avg("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 900.0, 4),
        avg("aten::copy_", 120.0, 9),
    ]
    ms, calls = layout_conversions(averages)
    assert calls == 6 and abs(ms - 0.35) < 1e-12
    assert layout_conversions(averages[2:]) == (0.0, 0)
