"""bench/bench_encoder.py --smoke on the CPU: the script runs and writes a well-formed report.

The timings of a smoke run are not speed figures; only the report's shape and internal consistency
are checked here (speed is never asserted in tests/).
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from samhq_fast.flops import encoder_flops

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_encoder.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_encoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(bench, tmp_path, *extra) -> tuple[dict, dict]:
    out = tmp_path / "encoder.json"
    returned = bench.main(["--smoke", "--output", str(out), *extra])
    on_disk = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().startswith("**SMOKE RUN")
    return returned, on_disk


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
    assert report["flops_per_image"]["tiny"]["total"] == encoder_flops(config)
    assert report["flops_per_image"]["tiny"]["padded_windows"] == encoder_flops(config, padded_windows=True)

    [entry] = report["results"]
    assert (entry["variant"], entry["batch"], entry["backend"], entry["dtype"], entry["status"]) == ("tiny", 1, "eager", "bf16", "ok")
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
    assert "fp32_reference" in report["numerics_context"]["tiny"]
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


def test_smoke_hf_matches_eager(bench, tmp_path):
    pytest.importorskip("transformers")
    _, report = run(bench, tmp_path, "--backends", "eager,hf")
    hf = next(r for r in report["results"] if r["backend"] == "hf")
    assert hf["status"] == "ok", hf.get("error")
    assert hf["numerics_ok"] is True and hf["numerics"]["rel_l2_vs_eager"] < 2e-2
    assert positive(hf["speed"]["speedup_vs_eager"])
