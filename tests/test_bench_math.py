"""The benchmark's bookkeeping against hand-computed values: the numerics verdict that decides
whether a backend's speed may be reported, nearest-rank percentiles, speedups against the eager row
of the same configuration, and throughput in the summary table."""

import pytest

from samhq_fast.benchmark import common, report
from samhq_fast.benchmark import decoder as decoder_bench
from samhq_fast.benchmark import encoder as encoder_bench

TOL, SLACK = 0.01, 1.25


@pytest.mark.parametrize("err_eager, err_fp32, eager_err_fp32, expected", [
    (0.005, None, None, True),  # within tol of eager
    (0.5, 0.012, 0.01, True),  # far from eager, but no further from fp32 than 1.25 x eager's own 0.01
    (0.5, 0.3, 0.01, False),  # further from fp32 than max(tol, 1.25 x 0.01)
    (0.5, 0.0124, 0.002, False),  # eager's own error is small: the bound is tol, not 1.25 x 0.002
    (float("nan"), float("nan"), 0.01, False),
    (0.5, None, None, False),  # disagrees with eager and there is no fp32 truth to excuse it
    (None, None, None, None),  # nothing to compare with
])
def test_numerics_verdict(err_eager, err_fp32, eager_err_fp32, expected):
    ok, why = common.numerics_verdict(False, err_eager, err_fp32, eager_err_fp32, TOL, SLACK)
    assert ok is expected, why


def test_the_reference_is_always_ok():
    assert common.numerics_verdict(True, None, None, None, TOL, SLACK)[0] is True


@pytest.mark.parametrize("values, q, expected", [
    (list(range(1, 11)), 0.9, 9),  # rank ceil(0.9 * 10) = 9
    (list(range(1, 101)), 0.99, 99),
    (list(range(1, 101)), 0.9, 90),
    ([5.0], 0.99, 5.0),
    ([1.0, 2.0, 3.0], 0.5, 2.0),
])
def test_percentile_is_nearest_rank(values, q, expected):
    assert common.percentile(values, q) == expected


def test_encoder_speedups_are_against_eager_at_the_same_variant_and_batch():
    def row(variant, batch, backend, ms, field="speed"):
        return {"variant": variant, "batch": batch, "backend": backend, field: {"median_ms": ms}}

    results = [row("vit_b", 1, "eager", 10.0), row("vit_b", 2, "eager", 30.0), row("vit_h", 1, "eager", 40.0),
               row("vit_b", 1, "fused", 5.0), row("vit_b", 2, "fused", 10.0), row("vit_h", 1, "fused", 80.0, "invalid_speed"),
               row("vit_h", 8, "fused", 1.0)]
    encoder_bench.finalize({"results": results})
    speedups = [r.get("speed", r.get("invalid_speed")).get("speedup_vs_eager") for r in results]
    assert speedups == [1.0, 1.0, 1.0, 2.0, 3.0, 0.5, None]  # no eager row at vit_h batch 8


def test_decoder_speedups_use_the_median_for_throughput_and_p50_for_latency():
    def row(test, mode, prompts, **speed):
        return {"test": test, "variant": "vit_h", "prompt": "box", "prompts": prompts, "mode": mode, "speed": speed}

    results = [row("throughput", "eager", 64, median_ms=8.0, p50_ms=1.0, prompts_per_s=8000.0),
               row("throughput", "graphed", 64, median_ms=2.0, p50_ms=8.0, prompts_per_s=32000.0),
               row("throughput", "graphed", 16, median_ms=1.0, p50_ms=1.0, prompts_per_s=16000.0),
               row("latency", "eager", 1, median_ms=1.0, p50_ms=3.0, p99_ms=4.0),
               row("latency", "graphed", 1, median_ms=9.0, p50_ms=0.5, p99_ms=0.7)]
    decoder_report = {"results": results}
    decoder_bench.finalize(decoder_report)
    assert [r["speed"].get("speedup_vs_eager") for r in results] == [1.0, 4.0, None, 1.0, 6.0]
    best = decoder_report["targets"]["best_valid"]["vit_h"]
    assert best["prompts_per_s"] == 32000.0 and best["single_prompt_p50_ms"] == 0.5 and best["single_prompt_mode"] == "graphed"


def test_table_throughput_counts_every_image_of_a_batch():
    run = {"what": "encoder", "settings": {"dtype": "bf16"}, "machine": {"gpu": "NVIDIA H200"}, "smoke": False, "results": [
        {"variant": "vit_h", "batch": 8, "backend": "fused", "dtype": "bf16", "status": "ok", "numerics_ok": True,
         "speed": {"median_ms": 40.0, "p90_ms": 41.0}}]}
    (row,) = report.rows_of(run)
    assert row["throughput"] == pytest.approx(200.0) and row["unit"] == "img/s"  # 8 images per 40 ms
