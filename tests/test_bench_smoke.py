"""samhq_fast.benchmark.encoder and .decoder --smoke on the CPU (what `samhq-fast bench` and the
bench/ wrappers run): the benchmarks run and write well-formed reports.

The timings of a smoke run are not speed figures; only the report's shape and internal consistency
are checked here (speed is never asserted in tests/). The decoder's compiled mode runs at one prompt
bucket only (torch.compile on the CPU takes ~15 s per bucket shape).
"""

import json
import math

import pytest
import torch

from samhq_fast.benchmark import decoder as decoder_module
from samhq_fast.benchmark import encoder as encoder_module
from samhq_fast.flops import encoder_flops


@pytest.fixture(scope="module")
def bench():
    return encoder_module


@pytest.fixture(scope="module")
def decoder_bench():
    return decoder_module


def run(bench, tmp_path, *extra) -> tuple[dict, dict]:
    out = tmp_path / "report.json"
    returned = bench.main(["--smoke", "--output", str(out), *extra])
    on_disk = json.loads(out.read_text())
    assert returned["results"] == on_disk["results"]
    assert out.with_suffix(".md").read_text().startswith("**SMOKE RUN")
    return returned, on_disk


def table_lines(tmp_path) -> list[str]:
    """The Markdown table `run` left next to its JSON."""
    return (tmp_path / "report.md").read_text().splitlines()


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_eager_report_schema(bench, tmp_path):
    _, report = run(bench, tmp_path, "--backends", "eager")
    assert report["smoke"] is True and "NOT SPEED FIGURES" in report["note"]
    for key in ("machine", "settings", "method", "flops_per_image", "reference_rates", "numerics_context", "results", "total_s"):
        assert key in report, key
    machine = report["machine"]
    assert machine["torch"] == torch.__version__ and "date" in machine
    assert not any("host" in key for key in machine)  # hostname-free
    rates = report["reference_rates"]
    assert positive(rates["matmul_bf16"]["tflops"]) and positive(rates["copy"]["gb_per_s_read_plus_write"])
    assert rates["matmul_reference"] == rates["matmul_bf16"]

    config = bench.SMOKE_CONFIG.encoder
    assert report["flops_per_image"]["smoke"]["total"] == encoder_flops(config)
    assert report["flops_per_image"]["smoke"]["padded_windows"] == encoder_flops(config, padded_windows=True)

    [entry] = report["results"]
    assert (entry["variant"], entry["batch"], entry["backend"], entry["dtype"], entry["status"]) == ("smoke", 1, "eager", "bf16", "ok")
    assert entry["numerics_ok"] is True and "invalid_speed" not in entry
    assert entry["flops"] == encoder_flops(config, 1)
    speed = entry["speed"]
    for key in ("median_ms", "p90_ms", "min_ms", "ms_per_image", "images_per_s", "tflops", "pct_of_matmul", "speedup_vs_eager"):
        assert positive(speed[key]), key
    assert speed["min_ms"] <= speed["median_ms"] <= speed["p90_ms"]
    assert speed["repeats"] >= 3
    assert speed["tflops"] == pytest.approx(entry["flops"] / (speed["median_ms"] * 1e-3) / 1e12)
    assert speed["pct_of_matmul"] == pytest.approx(100 * speed["tflops"] / rates["matmul_bf16"]["tflops"])
    assert speed["images_per_s"] == pytest.approx(1e3 / speed["median_ms"])
    assert speed["speedup_vs_eager"] == 1.0
    assert positive(entry["first_call_s"])
    assert "fp32_reference" in report["numerics_context"]["smoke"]
    assert 0 < entry["numerics"]["rel_l2_vs_fp32"] < 0.05  # bf16 rounding noise, measured ~1e-2


def test_smoke_failures_are_recorded_not_fatal(bench, tmp_path, monkeypatch):
    """A backend that cannot be built is recorded per batch and the run goes on; a backend over the
    numerics tolerance gets its speed under invalid_speed only."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # fused cannot run on this CPU now: a build error
    monkeypatch.setitem(bench.NUMERICS_TOL, torch.bfloat16, -1.0)  # every comparison fails...
    monkeypatch.setattr(bench, "FP32_SLACK", 0.0)  # ...the fp32 fallback too
    returned, report = run(bench, tmp_path, "--backends", "hf,fused,eager", "--batch", "1,2")
    assert returned["results"] == report["results"]
    assert [r["backend"] for r in report["results"]] == ["eager", "eager", "fused", "fused", "hf", "hf"]  # eager first
    by_key = {(r["backend"], r["batch"]): r for r in report["results"]}
    for batch in (1, 2):
        eager, fused, hf = (by_key[(name, batch)] for name in ("eager", "fused", "hf"))
        assert eager["status"] == "ok" and eager["numerics_ok"] is True and "speed" in eager  # the reference
        assert fused["status"] == "error" and "cannot run here" in fused["error"]
        if hf["status"] == "skipped":  # transformers missing
            assert "transformers" in hf["reason"]
            continue
        assert hf["status"] == "ok" and hf["numerics_ok"] is False
        assert "speed" not in hf and positive(hf["invalid_speed"]["tflops"])
        assert positive(hf["numerics"]["rel_l2_vs_eager"]) and positive(hf["numerics"]["rel_l2_vs_fp32"])
        line = next(x for x in table_lines(tmp_path) if x.startswith(f"| smoke | {batch} | hf |"))
        assert "figures withheld" in line and f"{hf['invalid_speed']['ms_per_image']:.2f}" not in line


def test_smoke_hf_matches_eager(bench, tmp_path):
    """Both HF peers (SDPA and eager attention) run, each with the attention it names, and agree with eager."""
    pytest.importorskip("transformers")
    _, report = run(bench, tmp_path, "--backends", "eager,hf-eager,hf")
    rows = {r["backend"]: r for r in report["results"]}
    assert [r["backend"] for r in report["results"]] == ["eager", "hf", "hf-eager"]
    for name, attention in (("hf", "'sdpa'"), ("hf-eager", "'eager'")):
        hf = rows[name]
        assert hf["status"] == "ok", hf.get("error")
        assert f"attn_implementation={attention}" in hf["timed_call"]
        assert hf["numerics_ok"] is True and hf["numerics"]["rel_l2_vs_eager"] < 2e-2
        assert positive(hf["speed"]["speedup_vs_eager"])


def test_hf_backend_refuses_the_wrong_attention(bench, tmp_path, monkeypatch):
    """If transformers builds another attention than asked for, the row is an error, not a mislabelled speed."""
    pytest.importorskip("transformers")
    monkeypatch.setitem(bench.HF_ATTENTION, "hf-eager", ("sdpa", "SamHQVisionAttention"))
    _, report = run(bench, tmp_path, "--backends", "eager,hf-eager")
    row = next(r for r in report["results"] if r["backend"] == "hf-eager")
    assert row["status"] == "error" and "SamHQVisionSdpaAttention" in row["error"]


# ---------------------------------------------------------------------------------------------
# bench_decoder.py


def by_test(report: dict) -> dict:
    """(test, mode or backend, prompt kind, prompts) -> result, in run order."""
    return {(r["test"], r.get("mode", r.get("backend")), r["prompt"], r["prompts"]): r for r in report["results"]}


def test_decoder_smoke_eager_report_schema(decoder_bench, tmp_path):
    _, report = run(decoder_bench, tmp_path, "--modes", "eager")
    assert report["smoke"] is True and "NOT SPEED FIGURES" in report["note"]
    for key in ("machine", "settings", "method", "results", "targets", "total_s"):
        assert key in report, key
    assert report["machine"]["torch"] == torch.__version__
    assert not any("host" in key for key in report["machine"])
    assert report["settings"]["prompts"] == [1, 4] and report["settings"]["modes"] == ["eager"]
    assert "not timed" in report["method"]["image"] and "INCLUDES THE IMAGE ENCODER" in report["method"]["e2e"]

    rows = by_test(report)
    assert list(rows) == [("throughput", "eager", "box", 1), ("throughput", "eager", "box", 4),
                          ("throughput", "eager", "point", 1), ("latency", "eager", "box", 1), ("e2e", "eager", "box", 1)]
    for r in report["results"]:
        assert r["status"] == "ok", r.get("error")
        assert r["variant"] == "smoke" and r["dtype"] == "bf16" and r["numerics_ok"] is True and "invalid_speed" not in r
        assert positive(r["first_call_s"]) and r["warmup_s"] >= 0
    for (test, _, _, num), r in rows.items():
        s = r["speed"]
        assert s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert s["speedup_vs_eager"] == 1.0
        if test == "throughput":
            assert s["repeats"] >= 3
            assert s["prompts_per_s"] == pytest.approx(1e3 * num / s["median_ms"])
            assert s["us_per_prompt"] == pytest.approx(1e3 * s["median_ms"] / num)
            assert 0 < r["numerics"]["rel_l2_vs_fp32"] < 0.05  # bf16 rounding noise, measured ~1e-2
        else:
            assert s["p50_ms"] == s["median_ms"] and positive(s["p50_ms"])
    latency = rows[("latency", "eager", "box", 1)]["speed"]
    # 20 calls, unless the series hit its time cap first (a loaded CPU): then the calls took >= the cap
    assert latency["repeats"] == 20 or (0 < latency["repeats"] < 20 and latency["repeats"] * latency["max_ms"] >= 1e3 * decoder_bench.LATENCY_MAX_S)
    assert rows[("e2e", "eager", "box", 1)]["speed"]["repeats"] == 3

    best = report["targets"]["best_valid"]["smoke"]
    assert report["targets"]["from_the_issue"] == {"single_prompt_ms": 0.3, "prompts_per_s": 20000}
    assert best["prompts_per_s"] == max(r["speed"]["prompts_per_s"] for r in report["results"] if r["test"] == "throughput")
    assert best["single_prompt_p50_ms"] == rows[("latency", "eager", "box", 1)]["speed"]["p50_ms"]
    assert best["meets_prompts_per_s"] is False and best["meets_single_prompt"] is False  # a CPU


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_decoder_smoke_compiled_matches_eager(decoder_bench, tmp_path, dtype, tol):
    """One bucket shape (1 prompt; the point row shares it): the compiled PromptDecoder agrees with
    eager and gets speed figures and a speedup. In bf16 the numerics must not depend on the
    multimask pick (an argmax over near-tied random-weight IoUs, flipped by bf16 noise for this box)."""
    _, report = run(decoder_bench, tmp_path, "--dtype", dtype, "--prompts", "1", "--e2e", "")
    rows = by_test(report)
    assert [k for k in rows if k[1] == "compiled"] == [("throughput", "compiled", "box", 1), ("throughput", "compiled", "point", 1),
                                                       ("latency", "compiled", "box", 1)]
    assert not any(r["test"] == "e2e" for r in report["results"])
    for key, r in rows.items():
        assert r["status"] == "ok", r.get("error")
        if key[1] == "compiled":
            assert r["numerics_ok"] is True and r["numerics"]["rel_l2_vs_eager"] < tol
            assert positive(r["speed"]["speedup_vs_eager"])
            assert "cuda_graphs=False" in r["timed_call"]


def test_decoder_smoke_withholds_figures_that_disagree(decoder_bench, tmp_path, monkeypatch):
    """A decoder mode over the numerics tolerance gets its figures under invalid_speed only, and its
    table rows quote none of them."""
    monkeypatch.setitem(decoder_bench.common.NUMERICS_TOL, torch.bfloat16, -1.0)  # every comparison fails...
    monkeypatch.setattr(decoder_bench.common, "FP32_SLACK", 0.0)  # ...the fp32 fallback too
    _, report = run(decoder_bench, tmp_path, "--modes", "eager,compiled", "--prompts", "1", "--point-prompts", "", "--e2e", "")
    compiled = [r for r in report["results"] if r["mode"] == "compiled"]
    assert [r["test"] for r in compiled] == ["throughput", "latency"]
    for r in compiled:
        assert r["status"] == "ok" and r["numerics_ok"] is False and "speed" not in r and positive(r["invalid_speed"]["median_ms"])
        head = "| smoke | compiled |" if r["test"] == "throughput" else "| smoke | latency | compiled |"
        line = next(x for x in table_lines(tmp_path) if x.startswith(head))
        assert "figures withheld" in line and f"{r['invalid_speed']['median_ms']:.3f}" not in line
    assert report["targets"]["best_valid"]["smoke"]["prompts_per_s"] == next(
        r["speed"]["prompts_per_s"] for r in report["results"] if r["mode"] == "eager" and r["test"] == "throughput")


def test_decoder_smoke_withholds_end_to_end_figures_that_disagree(decoder_bench, tmp_path, monkeypatch):
    """The end-to-end rows get the same check: a backend over E2E_TOL has no speed and no figures in
    the table. (The fused encoder is swapped for the eager one here: only the verdict is under test.)"""
    monkeypatch.setattr(decoder_bench, "apply_fused_backend", lambda model: model)
    monkeypatch.setitem(decoder_bench.E2E_TOL, torch.bfloat16, -1.0)
    _, report = run(decoder_bench, tmp_path, "--modes", "", "--prompts", "1", "--point-prompts", "", "--e2e", "eager,fused")
    rows = by_test(report)
    eager, fused = rows[("e2e", "eager", "box", 1)], rows[("e2e", "fused", "box", 1)]
    assert eager["numerics_ok"] is True and "speed" in eager
    assert fused["status"] == "ok" and fused["numerics_ok"] is False and "speed" not in fused and positive(fused["invalid_speed"]["p50_ms"])
    line = next(x for x in table_lines(tmp_path) if "fused" in x and "e2e" in x)
    assert "figures withheld" in line


def test_decoder_smoke_failures_are_recorded_not_fatal(decoder_bench, tmp_path, monkeypatch):
    """CUDA graphs and the fused encoder cannot run on the CPU: each row says so and the run goes on;
    past the time budget every configuration is recorded as skipped."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no interpreted fused encoder on this CPU
    _, report = run(decoder_bench, tmp_path, "--modes", "graphed,eager", "--prompts", "1", "--point-prompts", "",
                    "--e2e", "fused,eager")
    rows = by_test(report)
    assert list(rows) == [("throughput", "eager", "box", 1), ("latency", "eager", "box", 1), ("throughput", "graphed", "box", 1),
                          ("latency", "graphed", "box", 1), ("e2e", "eager", "box", 1), ("e2e", "fused", "box", 1)]
    for key in (("throughput", "graphed", "box", 1), ("latency", "graphed", "box", 1)):
        assert rows[key]["status"] == "error" and "not a CUDA device" in rows[key]["error"]
    assert rows[("e2e", "fused", "box", 1)]["status"] == "error"
    assert all(r["status"] == "ok" for k, r in rows.items() if k[1] == "eager")

    _, skipped = run(decoder_bench, tmp_path, "--modes", "eager", "--time-budget-s", "0")
    assert skipped["results"] and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in skipped["results"])


def test_block_profile_smoke(tmp_path):
    """The block profiler on the CPU: both block kinds, eager and fused (the interpreter is on),
    per-op rows whose shares add up, and the not-a-speed-figure label."""
    from samhq_fast.benchmark import profile_block

    out = tmp_path / "profile.md"
    text = profile_block.main(["--smoke", "--repeats", "1", "--output", str(out)])
    assert out.read_text() == text
    assert "NOT A SPEED FIGURE" in text
    for kind in ("windowed", "global"):
        section = text.split(f"\n## {kind} block, batch 1:")[1].split("\n## ")[0]
        assert "### eager" in section and "### fused" in section
        eager_rows = section.split("### eager")[1].split("### fused")[0]
        assert "`aten::addmm`" in eager_rows  # the eager block's linear layers
        shares = [float(line.rsplit("|", 2)[-2].strip().rstrip("%")) for line in eager_rows.splitlines() if line.startswith("| `")]
        assert abs(sum(shares) - 100) < 1


def test_decoder_profile_smoke(tmp_path):
    """The decoder profiler on the CPU: a section per prompt count with each mode's table (the Triton
    convolution in compiled-conv), the eager decoder's convolutions (the HQ mask features) among its
    ops, shares adding up, and the not-a-speed-figure label."""
    from samhq_fast.benchmark import profile_decoder

    out = tmp_path / "profile.md"
    text = profile_decoder.main(["--smoke", "--repeats", "1", "--prompts", "1,3", "--output", str(out)])
    assert out.read_text() == text
    assert "NOT A SPEED FIGURE" in text
    for count in (1, 3):
        section = text.split(f"\n## {count} box prompts (wall ms per call: eager ")[1].split("\n## ")[0]
        assert "### eager" in section and "### compiled" in section
        assert "`samhq_fast::conv3x3_ln_gelu_project`" in section.split("### compiled-conv")[1]  # the interpreter runs the Triton convolutions
        eager_rows = section.split("### eager")[1].split("### compiled")[0]
        assert "`aten::_convolution`" in eager_rows
        shares = [float(line.rsplit("|", 2)[-2].strip().rstrip("%")) for line in eager_rows.splitlines() if line.startswith("| `")]
        assert abs(sum(shares) - 100) < 1


@pytest.mark.slow
def test_block_profile_real_variant(tmp_path, monkeypatch):
    """A real architecture's block (vit_b, fp32, eager only on the CPU): the path the GPU session
    runs for vit_h, which the smoke test does not take."""
    from samhq_fast.benchmark import profile_block

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager only: a real-size block in the interpreter would take minutes
    text = profile_block.main(["--variant", "vit_b", "--dtype", "fp32", "--repeats", "1"])
    assert text.startswith("# One ViT block, kernel by kernel: vit_b, float32")
    for kind in ("windowed", "global"):
        section = text.split(f"\n## {kind} block, batch 1:")[1].split("\n## ")[0]
        assert "### eager" in section and "`aten::addmm`" in section


def test_kill_switch_skips_the_fused_rows(bench, decoder_bench, tmp_path, monkeypatch):
    """With SAMHQ_FAST_DISABLE_FUSED=1, load(backend="fused") builds the eager model (and
    apply_fused_backend leaves it eager): timing it under the name "fused" would publish eager
    figures as fused ones. The rows of both benchmarks are skipped, saying why."""
    monkeypatch.setenv("SAMHQ_FAST_DISABLE_FUSED", "1")
    _, report = run(bench, tmp_path, "--backends", "eager,fused", "--dtype", "fp32")
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["eager"]["status"] == "ok"
    assert rows["fused"]["status"] == "skipped" and "SAMHQ_FAST_DISABLE_FUSED" in rows["fused"]["reason"]
    _, report = run(decoder_bench, tmp_path, "--modes", "", "--prompts", "1", "--point-prompts", "", "--e2e", "eager,fused")
    rows = by_test(report)
    assert rows[("e2e", "eager", "box", 1)]["status"] == "ok"
    fused = rows[("e2e", "fused", "box", 1)]
    assert fused["status"] == "skipped" and "SAMHQ_FAST_DISABLE_FUSED" in fused["reason"]


def test_cpu_reference_rates_use_small_sizes(bench):
    """Not a speed figure on the CPU: the GPU's 8192^3 matmul and 2 GiB copy (tens of minutes on a
    2-core CPU, before the first configuration) are not run there, smoke run or not."""
    rates = bench.reference_rates(torch.device("cpu"), torch.float32, smoke=False)
    assert max(rates["matmul_float32"]["shape"]) <= 1024 and rates["copy"]["bytes_copied"] <= 2**28
    assert positive(rates["matmul_bf16"]["tflops"]) and positive(rates["copy"]["gb_per_s_read_plus_write"])
