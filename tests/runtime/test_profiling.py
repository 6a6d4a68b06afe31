"""The profiler summaries bench --profile writes."""

from types import SimpleNamespace

from fastunlearn.runtime.profiling import layout_conversions


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


def _first_call_costs_more():
    """A function whose first call sleeps inside a named range and a library phase."""
    import time

    import torch

    from fastunlearn.runtime.phases import phase

    calls = []

    def fn():
        with phase("setup"):
            if not calls:
                with torch.profiler.record_function("first_only"):
                    time.sleep(0.03)
        x = torch.ones(8, 8)
        (x @ x).sum()
        calls.append(1)

    return fn, calls


def test_first_use_finds_what_only_the_first_call_pays():
    from fastunlearn.runtime.profiling import first_use, format_first_use

    fn, calls = _first_call_costs_more()
    res = first_use(fn, "cpu")
    assert len(calls) == 2
    first, second = res["first"], res["second"]
    # Only the first call sleeps (30 ms, a lower bound whatever the load); the rest is the same
    # work in both calls, so the checks compare the two calls instead of timing either.
    assert first["wall_s"] >= first["phases"]["setup"] >= 0.03
    assert second["wall_s"] >= second["phases"]["setup"]
    assert first["phases"]["setup"] > second["phases"]["setup"]
    assert first["ops"]["first_only"][0] >= 30.0 and "first_only" not in second["ops"]
    assert first["ops"]["aten::mm"][2] == second["ops"]["aten::mm"][2] == 1
    text = format_first_use(res).splitlines()
    ops = text[text.index(next(line for line in text if line.startswith("by op"))) + 1:]
    assert ops[0].split()[0] == "first_only"  # ranked first: the largest excess


def test_format_first_use_lists_each_phase_before_its_parts():
    from fastunlearn.runtime.profiling import format_first_use

    def run(wall, phases):
        return {"wall_s": wall, "phases": phases, "ops": {"aten::conv": (5.0, 0.0, 2)}}

    res = {"first": run(1.0, {"search/recheck": 0.2, "search": 0.5, "finetune/capture": 0.1, "finetune": 0.4}),
           "second": run(0.6, {"search/recheck": 0.1, "search": 0.3, "finetune/capture": 0.0, "finetune": 0.3})}
    lines = format_first_use(res).splitlines()
    names = [line.split()[0] for line in lines[2:6]]
    assert names == ["search", "search/recheck", "finetune", "finetune/capture"]
    assert "+0.400 s" in lines[0]
    # equal host time in both calls: nothing to rank
    assert lines[-1].startswith("by op")


def test_first_use_of_an_unlearning_run_on_cpu(digits_model):
    """The real thing, small: both calls run the library's phases and return the same ops."""
    from conftest import DIGITS_MEAN, DIGITS_STD

    import fastunlearn as fu
    from fastunlearn.runtime.profiling import first_use

    model, x, y = digits_model
    f = y == 3
    cfg = fu.UnlearnConfig(epochs=1)
    res = first_use(lambda: fu.unlearn(model, (x[f][:40], y[f][:40]), (x[~f][:40], y[~f][:40]), config=cfg,
                                       mean=DIGITS_MEAN, std=DIGITS_STD, progress=False), "cpu")
    for run in res.values():
        assert {"search", "finetune"} <= set(run["phases"])
        assert run["ops"]["aten::convolution_backward"][2] > 0
    assert res["first"]["ops"]["aten::convolution_backward"][2] == res["second"]["ops"]["aten::convolution_backward"][2]


def test_phase_order_puts_each_phase_before_its_parts():
    from fastunlearn.runtime.profiling import phase_order

    recorded = ["check", "search/chunk size", "search/recheck", "search", "finetune", "search/recheck"]
    assert phase_order(recorded) == ["check", "search", "search/chunk size", "search/recheck", "finetune"]
