"""The benchmark's bookkeeping against hand-computed values: the numerics verdict that decides
whether a backend's speed may be reported, nearest-rank percentiles, speedups against the eager row
of the same configuration, throughput in the summary table, the timing loop and the figures it feeds."""

import random
import time
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from samhq_fast.benchmark import common, report
from samhq_fast.benchmark import decoder as decoder_bench
from samhq_fast.benchmark import encoder as encoder_bench
from samhq_fast.flops import encoder_flops

TOL, SLACK = 0.01, 1.25


@pytest.mark.parametrize("err_eager, err_fp32, eager_err_fp32, expected", [
    (0.005, None, None, True),  # within tol of eager
    (0.5, 0.012, 0.01, True),  # far from eager, but no further from fp32 than 1.25 x eager's own 0.01
    (0.5, 0.3, 0.01, False),  # further from fp32 than max(tol, 1.25 x 0.01)
    (0.5, 0.0124, 0.002, False),  # eager's own error is small: the bound is tol, not 1.25 x 0.002
    (0.5, 0.009, 0.002, True),  # ...and within tol of fp32 passes (1.25 x 0.002 alone would fail it)
    (0.01, None, None, True),  # exactly at tol
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


def test_decoder_speedups_compare_the_same_prompt_kind_and_best_figures_skip_invalid_rows():
    def row(mode, kind, median_ms, prompts_per_s, field="speed"):
        return {"test": "throughput", "variant": "vit_b", "prompt": kind, "prompts": 64, "mode": mode,
                field: {"median_ms": median_ms, "prompts_per_s": prompts_per_s}}

    results = [row("eager", "box", 8.0, 8000.0), row("eager", "point", 16.0, 4000.0), row("graphed", "point", 4.0, 16000.0),
               row("graphed", "box", 3.2, 20000.0), row("graphed-manual", "box", 0.1, 640000.0, field="invalid_speed")]
    decoder_report = {"results": results}
    decoder_bench.finalize(decoder_report)
    assert [r.get("speed", r.get("invalid_speed"))["speedup_vs_eager"] for r in results] == [1.0, 1.0, 4.0, 2.5, 80.0]
    best = decoder_report["targets"]["best_valid"]["vit_b"]
    assert best["prompts_per_s"] == 20000.0 and best["meets_prompts_per_s"] is True  # the target is ">= 20,000"


def test_table_throughput_counts_every_image_of_a_batch():
    run = {"what": "encoder", "settings": {"dtype": "bf16"}, "machine": {"gpu": "NVIDIA H200"}, "smoke": False, "results": [
        {"variant": "vit_h", "batch": 8, "backend": "fused", "dtype": "bf16", "status": "ok", "numerics_ok": True,
         "speed": {"median_ms": 40.0, "p90_ms": 41.0}}]}
    (row,) = report.rows_of(run)
    assert row["throughput"] == pytest.approx(200.0) and row["unit"] == "img/s"  # 8 images per 40 ms


def test_timing_summary_fields():
    times = [float(t) for t in range(1, 101)]
    random.Random(0).shuffle(times)
    assert common.timing_summary(times) == {"median_ms": 50.5, "p90_ms": 90.0, "p99_ms": 99.0, "min_ms": 1.0, "max_ms": 100.0,
                                            "repeats": 100}


def test_rel_l2_is_relative_to_the_expected_tensor():
    x = torch.tensor([3.0, -4.0])
    assert common.rel_l2(2 * x, x) == pytest.approx(1.0) and common.rel_l2(x, 2 * x) == pytest.approx(0.5)


def test_cpu_call_times_are_milliseconds():
    (elapsed,) = common.time_calls(lambda: time.sleep(0.02), [()], torch.device("cpu"))
    assert elapsed >= 19  # a 20 ms sleep, in ms (not seconds)


@pytest.mark.parametrize("target_s, repeats", [(0.0, 7), (1e3, 9)])  # too few calls for min_repeats, too many for max_repeats
def test_measure_call_sequence(target_s, repeats, monkeypatch):
    """First call on input 0, `warmup` calls rotating the inputs, one probe on input 1, then the timed
    calls rotating from input 0, bounded by min/max_repeats; peak memory is reset after the warm-up."""
    calls = []
    monkeypatch.setattr(common, "reset_peak_memory", lambda device: calls.append("reset"))
    args = types.SimpleNamespace(warmup=5, min_repeats=7, max_repeats=9, target_s=target_s)
    result, kept = common.measure(lambda tag: calls.append(tag) or tag, [("a0",), ("a1",), ("a2",)], torch.device("cpu"), args)
    timed = [f"a{i % 3}" for i in range(repeats)]
    assert calls == ["a0", "a0", "a1", "a2", "a0", "a1", "reset", "a1", *timed]
    assert kept == "a0" and result["timing"]["repeats"] == repeats


def test_encoder_speed_figures():
    figures = encoder_bench.speed_figures({"median_ms": 40.0}, batch=8, flops=8e12, matmul_tflops=400.0)
    assert figures["ms_per_image"] == 5.0 and figures["images_per_s"] == 200.0
    assert figures["tflops"] == pytest.approx(200.0) and figures["pct_of_matmul"] == pytest.approx(50.0)


def test_hq_head_flops_match_torchs_flop_counter():
    """The HQ feature head (two ConvT stacks) of vit_b and vit_h, counted by torch on the meta device."""
    from samhq_fast.modeling import SamHQ, SamHQConfig
    from samhq_fast.modeling.sam_hq import ALL_VARIANTS

    for variant in ("vit_b", "vit_h"):
        config = SamHQConfig(encoder=ALL_VARIANTS[variant])
        g = config.embedding_size
        with torch.device("meta"):
            head = SamHQ(config).mask_decoder
            with FlopCounterMode(display=False) as counter:
                head.hq_features(torch.empty(3, 256, g, g), torch.empty(3, g, g, config.vit_dim))
        assert encoder_bench.hq_head_flops(config, 3) == counter.get_total_flops(), variant


def test_bench_runs_pass_the_time_budget_and_keep_graphs_off_the_cpu():
    """gpu_session.sh relies on --time-budget-s reaching every run (each ends itself before the stage's
    SIGINT); on the CPU the fused backend gets no CUDA-graph decoder modes and compile no max-autotune."""
    from samhq_fast.cli import _bench_runs, build_parser

    args = build_parser().parse_args(["bench", "--smoke", "--interpret", "--dtype", "fp32,fp16", "--backends", "eager,fused",
                                      "--time-budget-s", "5"])
    runs = _bench_runs(args, ["eager", "fused"], "cpu")
    assert [what for what, _ in runs] == ["encoder", "decoder", "encoder", "decoder"]
    for what, argv in runs:
        assert float(argv[argv.index("--time-budget-s") + 1]) == 5
        if what == "encoder":
            assert argv[argv.index("--compile-mode") + 1] == "default"
        else:
            assert argv[argv.index("--modes") + 1] == "eager"


def test_reference_rates_count_flops_and_bytes_per_millisecond(monkeypatch):
    """With every call timed at exactly 1 ms: a 2 n^3-FLOP matmul in the run's own dtype, and a copy
    counted as its bytes read plus written."""
    monkeypatch.setattr(common, "time_calls", lambda fn, args_list, device: [1.0] * len(args_list))
    rates = encoder_bench.reference_rates(torch.device("cpu"), torch.float32, smoke=True)  # n = 512, 64 MiB
    assert rates["matmul_float32"]["dtype"] == "float32" and rates["matmul_bf16"]["dtype"] == "bfloat16"
    assert rates["matmul_float32"]["tflops"] == pytest.approx(2 * 512**3 / 1e-3 / 1e12)
    assert rates["copy"]["gb_per_s_read_plus_write"] == pytest.approx(2 * 64 * 2**20 / 1e-3 / 1e9)


def test_block_profile_per_call_figures_and_shares():
    """profile_block: launches and time are per block call (the profiled calls divided out), and each
    kernel's share is of its backend's total."""
    from samhq_fast.benchmark import profile_block

    x = torch.randn(48, 48)
    rows = profile_block.profile_calls(lambda t: torch.mm(t, t), x, repeats=4)
    (mm,) = [r for r in rows if r["name"] == "aten::mm"]
    assert mm["launches"] == 1
    results = {("global", 1): {"eager": [{"name": "a", "launches": 2, "us": 30.0}, {"name": "b", "launches": 1, "us": 10.0}]}}
    text = profile_block.markdown(results, ["# header"])
    assert "## global block, batch 1: eager 40.0 us" in text
    assert "| `a` | 2 | 30.0 | 75.0% |" in text and "| `b` | 1 | 10.0 | 25.0% |" in text


SMI_ROWS = ("GPU-0a1b2c3d-0000-1111-2222-333344445555, 1980 MHz, 2619 MHz, 700.00 W\n"
            "GPU-9f8e7d6c-0000-1111-2222-333344445555, 1410 MHz, 1593 MHz, 400.00 W\n")


@pytest.mark.parametrize(
    "stdout, returncode, uuid, expected",
    [
        (SMI_ROWS, 0, "9f8e7d6c-0000-1111-2222-333344445555", "1410 MHz, 1593 MHz, 400.00 W"),  # the second GPU's row, not the first
        (SMI_ROWS, 0, "0A1B2C3D-0000-1111-2222-333344445555", "1980 MHz, 2619 MHz, 700.00 W"),
        (SMI_ROWS, 0, "ffffffff-0000-1111-2222-333344445555", None),  # several rows, none this GPU: no figure rather than another GPU's
        (SMI_ROWS.splitlines()[0], 0, "ffffffff-0000-1111-2222-333344445555", "1980 MHz, 2619 MHz, 700.00 W"),  # the only GPU
        ("", 9, "0a1b2c3d-0000-1111-2222-333344445555", None),  # nvidia-smi failed
    ],
    ids=["second_gpu", "case", "no_match", "single_gpu", "failed"],
)
def test_nvidia_smi_reads_the_benchmarked_gpus_row(monkeypatch, stdout, returncode, uuid, expected):
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return types.SimpleNamespace(stdout=stdout, returncode=returncode)

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    assert common._nvidia_smi("clocks.max.sm,clocks.max.mem,power.limit", uuid) == expected
    assert calls == [["nvidia-smi", "--query-gpu=uuid,clocks.max.sm,clocks.max.mem,power.limit", "--format=csv,noheader"]]


def test_nvidia_smi_missing(monkeypatch):
    def missing(argv, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(common.subprocess, "run", missing)
    assert common._nvidia_smi("driver_version", "0a1b") is None


@pytest.mark.parametrize("numerics_ok, filed_under", [(True, "speed"), (None, "speed"), (False, "invalid_speed")])
def test_decoder_throughput_fields(monkeypatch, numerics_ok, filed_under):
    """64 prompts in a 2 ms call: 32,000 prompts/s and 31.25 us per prompt; a backend whose logits
    disagree has its figures filed where no table reads them."""
    monkeypatch.setattr(decoder_bench, "make_prompts", lambda kind, num, *rest: [("prompts", kind, num)])
    monkeypatch.setattr(common, "measure", lambda fn, arg_sets, device, args, keep: ({"first_call_s": 0.5, "timing": {"median_ms": 2.0, "p90_ms": 3.0}}, None))
    monkeypatch.setattr(decoder_bench, "check_numerics", lambda *a: {"numerics": {"verdict": "x"}, "numerics_ok": numerics_ok})
    result = decoder_bench.run_throughput(None, None, "fused", "vit_b", "box", 64, None, torch.device("cpu"), torch.bfloat16,
                                          types.SimpleNamespace(seed=0), None)
    other = {"speed", "invalid_speed"} - {filed_under}
    assert not other & set(result) and result["first_call_s"] == 0.5 and result["numerics_ok"] is numerics_ok
    assert result[filed_under] == {"median_ms": 2.0, "p90_ms": 3.0, "prompts_per_s": 32000.0, "us_per_prompt": 31.25}


def test_decoder_latency_is_the_median_of_lone_calls(monkeypatch):
    """p50 is the median of the calls timed one by one, after the first call and the warm-up, with
    peak memory reset in between."""
    order = []
    monkeypatch.setattr(common, "first_call", lambda fn, args, device, keep: (order.append("first") or 1.5, None))
    monkeypatch.setattr(common, "warm_up", lambda fn, arg_sets, count, device: (order.append(("warm_up", count)) or 0.25))
    monkeypatch.setattr(common, "reset_peak_memory", lambda device: order.append("reset"))
    monkeypatch.setattr(common, "wall_latencies", lambda fn, calls, device, max_s: (
        order.append(("timed", len(calls))) or ([0.4, 0.1, 0.3, 0.2, 9.0], [0.05, 0.02, 0.01, 0.04, 0.03])))
    result = decoder_bench.measure_latency(None, [("a",), ("b",)], torch.device("cpu"), types.SimpleNamespace(warmup=7), calls=5)
    assert order == ["first", ("warm_up", 7), "reset", ("timed", 5)]
    assert result["first_call_s"] == 1.5 and result["warmup_s"] == 0.25
    latency = result["latency"]
    assert latency["p50_ms"] == latency["median_ms"] == 0.3 and latency["max_ms"] == 9.0 and latency["repeats"] == 5
    assert latency["host_p50_ms"] == 0.03  # the median of the host times, not the host time of the median call


def test_wall_latencies_split_off_the_host_part(monkeypatch):
    """Each call's total runs to the synchronize after it; its host part stops where fn returned."""
    monkeypatch.setattr(common, "synchronize", lambda device: time.sleep(0.02))
    times, host_times = common.wall_latencies(lambda: time.sleep(0.002), [()] * 3, torch.device("cpu"))
    assert len(times) == len(host_times) == 3
    for total, host in zip(times, host_times):
        assert 2.0 <= host < 20.0 <= total


@pytest.mark.parametrize("neck_scale, filed_under", [(1.0, "speed"), (1.5, "invalid_speed")])
def test_encoder_run_config_files_a_disagreeing_backend_apart(monkeypatch, neck_scale, filed_under):
    """run_config with common.measure stubbed (4 ms for a batch of 2): a backend whose neck output is
    the eager one's gets its speed figures under `speed`; one 50% off (eager and fp32 references both
    1.0) under `invalid_speed`, so no table quotes it. The batch's flops come from the config."""
    config = common.SMOKE_CONFIG
    neck = torch.full((2, 4, 3), neck_scale)
    monkeypatch.setattr(common, "measure", lambda fn, arg_sets, device, args, keep: ({"first_call_s": 0.5, "timing": {"median_ms": 4.0}}, neck))
    refs = encoder_bench.References()
    refs.eager[("tiny", 2)], refs.fp32[("tiny", 2)], refs.eager_err_fp32[("tiny", 2)] = torch.ones(2, 4, 3), torch.ones(1, 4, 3), 1e-3
    calls = []
    backend = types.SimpleNamespace(name="fused", fn=None, for_batch=lambda batch: calls.append(("for_batch", batch)),
                                    after_batch=lambda: calls.append("after_batch"))
    args = types.SimpleNamespace(seed=0, dtype="bf16")
    entry = encoder_bench.run_config("tiny", config, backend, 2, torch.device("cpu"), torch.bfloat16, args, refs, matmul_tflops=None)
    assert entry["status"] == "ok" and calls == [("for_batch", 2), "after_batch"]
    assert entry["numerics_ok"] is (neck_scale == 1.0) and filed_under in entry
    assert not ({"speed", "invalid_speed"} - {filed_under}) & set(entry)
    flops = encoder_flops(config.encoder, 2)
    assert entry["flops"] == flops and entry[filed_under]["images_per_s"] == 500.0
    assert entry[filed_under]["tflops"] == pytest.approx(flops / 4e-3 / 1e12) and entry[filed_under]["pct_of_matmul"] is None


MACHINE = {"gpu": "NVIDIA H200", "driver": "570.1", "torch": "2.11.0", "triton": "3.6.0", "transformers": "4.57.0", "cuda": "13.0",
           "date": "2026-01-01T00:00:00+00:00"}


def test_encoder_run_markdown_cells():
    """Each per-run .md cell from a hand-made report: rounding, '-' for what was not measured, 'ref'
    for eager's own error, withheld figures for a disagreeing and a failed backend, and every row
    as many cells as the header."""
    numerics = lambda vs_eager, vs_fp32: {"rel_l2_vs_eager": vs_eager, "rel_l2_vs_fp32": vs_fp32}
    results = [
        {"variant": "vit_h", "batch": 8, "backend": "eager", "status": "ok", "first_call_s": 3.21, "peak_memory_gb": 10.26,
         "numerics": numerics(None, 0.0151),
         "speed": {"ms_per_image": 12.3456, "images_per_s": 81.04, "tflops": 465.24, "pct_of_matmul": 58.9, "speedup_vs_eager": 1.0}},
        {"variant": "vit_h", "batch": 8, "backend": "fused", "status": "ok", "first_call_s": 40.06, "numerics": numerics(2.3e-3, 0.0152),
         "speed": {"ms_per_image": 6.6, "images_per_s": 151.5, "tflops": 870.0, "pct_of_matmul": None, "speedup_vs_eager": 1.87}},
        {"variant": "vit_h", "batch": 8, "backend": "fused-graphed", "status": "ok", "first_call_s": 1.0, "numerics": numerics(0.3, 0.31),
         "invalid_speed": {"ms_per_image": 1.0, "images_per_s": 1000.0, "tflops": 1.0, "pct_of_matmul": 1.0}},
        {"variant": "vit_h", "batch": 32, "backend": "hf", "status": "error", "error": "OutOfMemoryError: CUDA out of memory\nmore"},
    ]
    report = {"machine": MACHINE, "settings": {"dtype": "bf16"}, "results": results,
              "reference_rates": {"matmul_reference": {"dtype": "bf16", "shape": "8192^3", "tflops": 790.4},
                                  "copy": {"gb_per_s_read_plus_write": 4100.2}}}
    lines = encoder_bench.markdown_table(report).splitlines()
    assert lines[0] == "NVIDIA H200, driver 570.1, torch 2.11.0, triton 3.6.0, transformers 4.57.0, CUDA 13.0; 2026-01-01T00:00:00+00:00, bf16"
    assert lines[1] == "Measured matmul rate (bf16, 8192^3): 790 TFLOP/s; copy bandwidth: 4100 GB/s."
    header, rows = lines[4], lines[6:]
    assert rows == [
        "| vit_h | 8 | eager | 12.35 | 81.0 | 465.2 | 59 | 10.3 | 1.00 | ref / 1.5e-02 | 3.2 |",
        "| vit_h | 8 | fused | 6.60 | 151.5 | 870.0 | - | - | 1.87 | 2.3e-03 / 1.5e-02 | 40.1 |",
        "| vit_h | 8 | fused-graphed | INVALID: numerics disagree with eager (rel L2 vs eager 3.0e-01, vs fp32 3.1e-01): "
        "figures withheld |" + " |" * 7,
        "| vit_h | 32 | hf | error: OutOfMemoryError: CUDA out of memory |" + " |" * 7,
    ]
    assert all(row.count("|") == header.count("|") for row in rows)


def test_decoder_run_markdown_cells():
    """The decoder's per-run .md: best-figure lines, a throughput row and a latency row from a hand-made report."""
    report = {
        "machine": MACHINE, "settings": {"dtype": "bf16", "frame_hw": {"vit_b": (720, 1280)}},
        "targets": {"best_valid": {"vit_b": {"prompts_per_s": 25123.4, "prompts_per_s_at": "graphed, 1024 box prompts",
                                             "meets_prompts_per_s": True, "single_prompt_p50_ms": 0.4321,
                                             "single_prompt_mode": "graphed", "meets_single_prompt": False}}},
        "results": [
            {"test": "throughput", "variant": "vit_b", "mode": "graphed", "prompt": "box", "prompts": 1024, "status": "ok",
             "first_call_s": 12.345, "warmup_s": 0.5, "numerics": {"rel_l2_vs_eager": 1.2e-3, "rel_l2_vs_fp32": 4.5e-3},
             "speed": {"median_ms": 40.7593, "prompts_per_s": 25123.4, "us_per_prompt": 39.8, "speedup_vs_eager": 3.456}},
            {"test": "latency", "variant": "vit_b", "mode": "eager", "status": "ok", "first_call_s": 0.1234, "peak_memory_gb": 1.26,
             "numerics": {"rel_l2_vs_eager": None, "rel_l2_vs_fp32": 4.4e-3},
             "speed": {"p50_ms": 1.2345, "p99_ms": 2.5, "host_p50_ms": 0.4567, "repeats": 200, "speedup_vs_eager": 1.0}},
        ],
    }
    table = decoder_bench.markdown_table(report)
    assert ("- vit_b: best 25,123 prompts/s (graphed, 1024 box prompts; target met: True), best single-prompt p50 0.432 ms "
            "(graphed; target met: False)") in table
    assert "| vit_b | graphed | box | 1024 | 40.759 | 25,123 | 39.8 | 3.46 | 1.2e-03 / 4.5e-03 | 12.35 | 0.50 | - |" in table
    assert "| vit_b | latency | eager | 1.234 | 2.500 | 0.457 | 200 | 1.00 | ref / 4.4e-03 | 0.12 | 1.3 |" in table
    assert "set_image of a 720x1280 uint8 frame" in table
