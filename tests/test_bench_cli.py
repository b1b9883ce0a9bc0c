"""`samhq-fast bench` on the CPU: a smoke run writes valid merged JSON, a Markdown table and a plot;
`--table` turns a results file into the README table; bad arguments exit 2 with a clear message."""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samhq_fast.benchmark import report
from samhq_fast.benchmark.common import SMOKE_CONFIG
from samhq_fast.cli import build_parser, main
from samhq_fast.flops import encoder_flops


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_smoke_writes_json_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "results.json", tmp_path / "results.png"
    code = main(["bench", "--smoke", "--dtype", "fp32", "--backends", "eager", "--what", "encoder,decoder", "--prompts", "1",
                 "--batch", "1,2", "--output", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "random weights" in printed and "NOT SPEED FIGURES" in printed

    data = json.loads(out.read_text())
    assert data["tool"] == "samhq-fast bench" and data["schema_version"] == 1
    assert data["speed_figures"] is False and "NOT SPEED FIGURES" in data["note"]
    assert data["weights"] == "random weights of a tiny test model (smoke run)"
    assert all(run["weights"] == data["weights"] for run in data["runs"])
    machine = data["machine"]
    assert machine["gpu"] is None and machine["torch"] and machine["date"] and "triton" in machine
    assert {"python", "torch", "triton", "transformers", "cuda", "cpu_count", "samhq_fast_commit", "allow_tf32_matmul", "env"} <= set(machine)
    # what ran is what the settings say: the smoke model's name, the options passed on to each benchmark
    settings = data["settings"]
    assert (settings["variants"], settings["dtypes"], settings["device"]) == (["smoke"], ["fp32"], "cpu")
    assert [r["what"] for r in data["runs"]] == ["encoder", "decoder"]
    encoder, decoder = data["runs"]
    assert encoder["settings"]["batches"] == [1, 2] and decoder["settings"]["prompts"] == [1]
    assert {r["variant"] for run in data["runs"] for r in run["results"]} == {"smoke"}
    assert encoder["flops_per_image"]["smoke"]["total"] == encoder_flops(SMOKE_CONFIG.encoder)
    # fp32 results are measured against the fp32 matmul rate, not the bf16 one
    rates = encoder["reference_rates"]
    assert rates["matmul_reference"] == rates["matmul_float32"] != rates["matmul_bf16"]
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert row["status"] == "ok" and row["dtype"] == "fp32" and row["backend"] == "eager"
        assert positive(row["median_ms"]) and positive(row["throughput"])
        assert row["speed_figure"] is False and "measured on the CPU" in row["note"] and "smoke" in row["note"]
    encoder_rows = [r for r in data["rows"] if r["what"] == "encoder"]
    assert [r["size"] for r in encoder_rows] == ["batch 1", "batch 2"]
    for batch, enc in enumerate(encoder_rows, 1):
        assert enc["flops"] == encoder_flops(SMOKE_CONFIG.encoder, batch)
        assert enc["tflops"] == pytest.approx(enc["flops"] / (enc["median_ms"] * 1e-3) / 1e12)
        assert enc["pct_of_matmul"] == pytest.approx(100 * enc["tflops"] / rates["matmul_float32"]["tflops"])
        assert enc["throughput"] == pytest.approx(batch * 1e3 / enc["median_ms"])
    assert {r["what"] for r in data["rows"]} == {"encoder", "decoder", "decoder latency"}

    table = out.with_suffix(".md").read_text()
    assert "Machine: CPU" in table and "| encoder | smoke | fp32 | eager | batch 1 |" in table
    assert (tmp_path / "results.encoder-fp32.json").is_file() and (tmp_path / "results.decoder-fp32.json").is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_interrupted_writes_what_finished(tmp_path, capsys, monkeypatch):
    """A stage's time limit sends SIGINT (KeyboardInterrupt): the merged JSON, table and status still
    come out, from the configurations the interrupted run had saved."""
    from samhq_fast.benchmark import common

    make_recorder = common.make_recorder

    def interrupting_recorder(*args):
        record = make_recorder(*args)

        def record_then_interrupt(entry):
            record(entry)  # saved to the run's own JSON first, as after every configuration
            raise KeyboardInterrupt

        return record_then_interrupt

    monkeypatch.setattr(common, "make_recorder", interrupting_recorder)
    out = tmp_path / "cut.json"
    code = main(["bench", "--smoke", "--dtype", "fp32", "--backends", "eager", "--what", "encoder", "--batch", "1,2", "--output", str(out)])
    assert code == 130
    data = json.loads(out.read_text())
    assert data["interrupted"].startswith("interrupted during the encoder run") and data["runs"][0]["interrupted"] is True
    assert [(r["what"], r["size"]) for r in data["rows"]] == [("encoder", "batch 1")]  # batch 2 never ran
    assert "**Incomplete: interrupted during the encoder run" in out.with_suffix(".md").read_text()


def test_commit_from_the_environment_without_git(monkeypatch, tmp_path):
    """The GPU machine runs a copy of the tree without .git: SAMHQ_FAST_COMMIT names the code timed."""
    from samhq_fast.benchmark import common

    monkeypatch.setattr(common, "ROOT", tmp_path)  # no repository there
    monkeypatch.delenv(common.COMMIT_ENV, raising=False)
    assert common.machine_info(torch.device("cpu"))["samhq_fast_commit"] is None
    monkeypatch.setenv(common.COMMIT_ENV, "3d5da8a ")
    assert common.machine_info(torch.device("cpu"))["samhq_fast_commit"] == "3d5da8a"


def test_smoke_results_stay_out_of_the_committed_ones():
    """Without --output a smoke run writes under bench/results/smoke/, which git ignores and which
    `--table bench/results/*.json` (the README table) does not read; a real run writes to bench/results/."""
    from samhq_fast.benchmark import common

    smoke, real = common.default_output("bench", smoke=True), common.default_output("bench", smoke=False)
    assert real.parent == common.results_dir() and smoke.parent.parent == common.results_dir()
    assert subprocess.run(["git", "check-ignore", "-q", str(smoke)], cwd=common.ROOT).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=common.ROOT).returncode == 1


def test_free_memory_survives_a_sticky_cuda_error(monkeypatch):
    """After a kernel fault every CUDA call raises the same error; free_memory runs in `finally`
    blocks, where raising it again would lose the failing configuration's record and the run."""
    from samhq_fast.benchmark import common

    def sticky(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", sticky)
    monkeypatch.setattr(torch.cuda, "empty_cache", sticky)
    common.free_memory(torch.device("cuda"))


def gpu_results() -> dict:
    """A hand-made encoder report as the GPU session will write one (numbers invented for the test only)."""
    machine = {"date": "2026-01-01T00:00:00+00:00", "gpu": "NVIDIA H200", "driver": "570.1", "torch": "2.11.0", "triton": "3.6.0",
               "transformers": "5.17.0", "cuda": "12.8", "env": {},
               "samhq_fast_commit": "0123abcd"}
    speed = {"median_ms": 10.0, "p90_ms": 11.0, "tflops": 94.2, "pct_of_matmul": 15.0}

    def result(backend, factor, **extra):
        return {"variant": "vit_b", "batch": 1, "backend": backend, "dtype": "bf16", "status": "ok", "flops": 942_000_000_000,
                "first_call_s": 2.0, "peak_memory_gb": 1.5, "numerics_ok": True, "numerics": {"rel_l2_vs_eager": 1e-3},
                "speed": {**speed, "median_ms": 10.0 / factor, "speedup_vs_eager": factor}, **extra}

    wrong = result("fused-graphed", 3.0, numerics_ok=False, numerics={"rel_l2_vs_eager": 0.4, "rel_l2_vs_fp32": 0.41})
    wrong["invalid_speed"] = wrong.pop("speed")
    rates = {"matmul_reference": {"shape": [8192, 8192, 8192], "dtype": "bfloat16", "tflops": 790.4},
             "copy": {"gb_per_s_read_plus_write": 4012.0}}
    return {"smoke": False, "machine": machine, "settings": {"variants": ["vit_b"], "dtype": "bf16"}, "flops_per_image": {}, "weights": "random weights",
            "total_s": 321.0, "reference_rates": rates, "results": [result("eager", 1.0), result("fused", 2.0), wrong, result("hf", 0.5, numerics_ok=None, numerics={}),
                        {"variant": "vit_b", "batch": 8, "backend": "compile", "dtype": "bf16", "status": "skipped",
                         "reason": "time budget: 500 s of 420 s used"}]}


def test_bench_checkpoint_runs_its_own_architecture(tiny_checkpoints, tmp_path):
    """--checkpoint: the checkpoint's architecture (here "custom") is what every benchmark runs and
    reports, whatever --variant says (it used to look up --variant's and fail)."""
    out = tmp_path / "ckpt.json"
    argv = ["bench", "--checkpoint", str(tiny_checkpoints["pth"]), "--smoke", "--variant", "vit_h", "--what", "encoder,decoder",
            "--backends", "eager", "--prompts", "1", "--output", str(out)]
    assert main(argv) == 0
    merged = json.loads(out.read_text())
    assert {run["what"]: run["settings"]["variants"] for run in merged["runs"]} == {"encoder": ["custom"], "decoder": ["custom"]}
    assert merged["settings"]["variants"] == ["custom"]
    assert {row["variant"] for row in merged["rows"]} == {"custom"}


def test_bench_table_runs_nothing_and_says_so(tmp_path, capsys):
    """--table only prints: run options given with it are refused (a --plot would never be drawn), and a
    file named twice (a glob overlapping a name) gives one table."""
    path = tmp_path / "encoder-gpu.json"
    path.write_text(json.dumps(gpu_results()))
    assert main(["bench", "--table", str(path), "--plot", str(tmp_path / "p.png"), "--smoke"]) == 2
    assert "--table only prints the table of results files and runs nothing: drop --plot, --smoke" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
    assert main(["bench", "--table", str(path), str(tmp_path / ".." / tmp_path.name / "encoder-gpu.json")]) == 0
    assert capsys.readouterr().out.count("Machine: NVIDIA H200") == 1


def test_bench_table_from_results(tmp_path, capsys):
    path = tmp_path / "encoder-gpu.json"
    path.write_text(json.dumps(gpu_results()))
    assert main(["bench", "--table", str(path)]) == 0
    table = capsys.readouterr().out
    assert "Machine: NVIDIA H200, driver 570.1, torch 2.11.0, triton 3.6.0" in table
    assert "; samhq-fast 0123abcd" in table  # which code was timed (SAMHQ_FAST_COMMIT on the GPU machine, which has no .git)
    assert ("Measured in the bf16 encoder run: bfloat16 matmul 790 TFLOP/s (8192x8192x8192), copy 4012 GB/s "
            "(read + write).") in table  # what "% of matmul" divides by
    assert "| encoder | vit_b | bf16 | eager | batch 1 | 10.000 | 11.000 | 100.0 img/s | 94.20 | 15 | 1.00 | 1.5 | 2.0 | 1.0e-03 |  |" in table
    assert "| encoder | vit_b | bf16 | fused | batch 1 | 5.000 | 11.000 | 200.0 img/s | 94.20 | 15 | 2.00 | 1.5 | 2.0 | 1.0e-03 |  |" in table
    assert "| encoder | vit_b | bf16 | compile | batch 8 | - |" in table and "skipped: time budget" in table
    # numerics that disagree with eager: no figure quoted, only why (the JSON keeps them under invalid_speed)
    assert ("| encoder | vit_b | bf16 | fused-graphed | batch 1 | - | - | - | - | - | - | 1.5 | 2.0 | 4.0e-01 | INVALID: numerics "
            "disagree with eager (rel L2 vs eager 4.0e-01, vs fp32 4.1e-01): figures withheld |") in table
    assert "| encoder | vit_b | bf16 | hf | batch 1 | 20.000 |" in table and "numerics not checked" in table  # no reference
    assert "NOT SPEED FIGURES" in table


def test_bench_table_flags_a_run_that_was_cut_off(tmp_path, capsys):
    """A benchmark report is rewritten after every configuration and gets total_s when it finishes: one
    without it was killed (a time limit's SIGKILL) and holds only part of the run: the table says so."""
    results = gpu_results()
    path = tmp_path / "done.json"
    path.write_text(json.dumps(results))
    assert main(["bench", "--table", str(path)]) == 0
    assert "Incomplete" not in capsys.readouterr().out
    del results["total_s"]
    path.write_text(json.dumps(results))
    assert main(["bench", "--table", str(path)]) == 0
    assert "**Incomplete: the encoder run ended before it finished (no total_s).**" in capsys.readouterr().out


def test_bench_table_shows_no_figures_of_a_failed_row(tmp_path, capsys):
    """A row whose status is not "ok" shows no speed, whatever the JSON holds."""
    results = gpu_results()
    results["results"][1].update(status="error", error="CUDA error: an illegal memory access")  # fused, batch 1
    path = tmp_path / "failed.json"
    path.write_text(json.dumps(results))
    assert main(["bench", "--table", str(path)]) == 0
    (fused,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| encoder | vit_b | bf16 | fused | batch 1")]
    assert fused.split(" | ")[5:11] == ["-"] * 6  # median, p90, throughput, TFLOP/s, % of matmul, speedup


def test_bench_table_skips_other_files_among_results(tmp_path, capsys):
    """`--table bench/results/*.json` with a pytest-benchmark JSON (automatic masks) or a hand-edited
    file among the results: the results' tables, and a warning naming each file skipped."""
    good, other, broken = tmp_path / "encoder.json", tmp_path / "automatic-masks.json", tmp_path / "edited.json"
    good.write_text(json.dumps(gpu_results()))
    other.write_text(json.dumps({"machine_info": {}, "benchmarks": []}))
    results = gpu_results()
    del results["results"][0]["variant"]
    broken.write_text(json.dumps(results))
    with pytest.warns(UserWarning) as caught:  # the CLI prints each as "samhq-fast: warning: ..."
        assert main(["bench", "--table", str(good), str(other), str(broken)]) == 0
    out = capsys.readouterr().out
    assert f"Results from `{good}`." in out and str(other) not in out and str(broken) not in out
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all(m.startswith("skipped: ") for m in messages)
    assert f"{other} is not a samhq-fast bench results file" in messages[0]
    assert f"{broken} is not a samhq-fast bench results file: a result lacks or mistypes 'variant'" in messages[1]
    assert main(["bench", "--table", str(broken)]) == 2  # alone, it is an error
    assert "a result lacks or mistypes 'variant'" in capsys.readouterr().err


def test_bench_table_rows_in_run_order_and_one_table_per_file(tmp_path, capsys):
    """Rows come in the order the run measured them (eager first), each has the header's number of
    cells (withheld and skipped rows too), and `--table A B` prints one table per file, each naming its source."""
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path in paths:
        path.write_text(json.dumps(gpu_results()))
    assert main(["bench", "--table", *map(str, paths)]) == 0
    first, second = capsys.readouterr().out.split(f"Results from `{paths[1]}`.")
    assert f"Results from `{paths[0]}`." in first
    for table in (first, second):
        rows = [line for line in table.splitlines() if line.startswith("| encoder")]
        assert [row.split(" | ")[3] for row in rows] == ["eager", "fused", "fused-graphed", "hf", "compile"]
        assert all(row.count("|") == len(report.COLUMNS) + 1 for row in rows)


@pytest.mark.parametrize("backends, expected", [(("eager", "fused"), True), (None, False)], ids=["all-valid", "mixed"])
def test_bench_speed_figures_only_when_every_row_is_one(tmp_path, capsys, monkeypatch, backends, expected):
    """The merged JSON's speed_figures is true only when every row is a speed figure (here a GPU run:
    the mixed one has a withheld, an unchecked and a skipped row)."""
    from samhq_fast.benchmark import encoder

    results = gpu_results()
    if backends:
        results["results"] = [r for r in results["results"] if r["backend"] in backends]
    monkeypatch.setattr(encoder, "main", lambda argv, **overrides: results)
    out = tmp_path / "merged.json"
    assert main(["bench", "--what", "encoder", "--backends", "eager", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["speed_figures"] is expected and ("note" in data) is not expected


SEGMENT_JSON = {"image": "assets/chelsea.jpg", "checkpoint": "sam_hq_vit_b.pth", "variant": "vit_b", "image_size": [300, 451],
                "prompts": [{"points": [[220, 150]], "labels": [1], "box": None, "score": 0.9, "area": 1000}]}


@pytest.mark.parametrize("text", [
    json.dumps(SEGMENT_JSON),  # what `samhq-fast segment --json` writes
    json.dumps({"runs": [{"what": "encoder"}]}),
    json.dumps([1, 2]),
    "{not json",
    "",
    json.dumps({"machine": {}, "results": []}),  # hand-made: no versions, no date
    json.dumps({"machine": "H200", "results": []}),
], ids=["segment_json", "runs_without_machine", "list", "invalid_json", "empty", "empty_machine", "machine_not_a_dict"])
def test_bench_table_rejects_other_files(text, tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(text)
    assert main(["bench", "--table", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samhq-fast: error:") and f"{path} is not a samhq-fast bench results file" in err
    assert "Traceback" not in err and "KeyError" not in err


def test_bench_table_of_a_folder(tmp_path, capsys):
    """`--table bench/results/` instead of `bench/results/*.json`: named, not an IsADirectoryError."""
    assert main(["bench", "--table", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"samhq-fast: error: cannot read {tmp_path}: Is a directory") and "Traceback" not in err


def test_bench_dtype_names_are_those_load_accepts():
    args = build_parser().parse_args(["bench", "--dtype", "half,FP16,bfloat16,float32,bf16"])
    assert args.dtype == ["fp16", "bf16", "fp32"]  # short names, once each, in order


def test_interpreter_rows_are_not_speed_figures():
    """A run with TRITON_INTERPRET=1 (bench --interpret): rows of backends that run Triton kernels (the
    fused ones, and torch.compile's, whose GPU kernels are Triton too) are labelled, eager's and HF's are not."""
    data = gpu_results()
    data["machine"]["env"] = {"TRITON_INTERPRET": "1"}
    data["results"][-1] = {**data["results"][0], "backend": "compile"}
    rows = {row["backend"]: row for row in report.load_rows(data)}
    assert rows["eager"]["speed_figure"] is True and rows["eager"]["note"] == ""
    assert rows["hf"]["note"] == "numerics not checked (no reference in this run)"
    for backend in ("fused", "compile"):
        assert rows[backend]["speed_figure"] is False and rows[backend]["note"] == "Triton kernels in the interpreter"


def test_bench_plot_leaves_out_withheld_figures(tmp_path):
    """The bar chart draws only rows with figures: invalid numerics, skips and errors get no bar."""
    pytest.importorskip("matplotlib")
    data = gpu_results()
    drawn = {row["backend"] for row in report.load_rows(data) if row["throughput"] is not None}
    assert drawn == {"eager", "fused", "hf"}
    report.plot(data, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_interrupted_before_anything_finished(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the first configuration (or the reference rates): exit 130 with one line, no
    traceback, and no merged JSON made of nothing, nor of an earlier run's part file at the same output."""
    from samhq_fast.benchmark import encoder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(encoder, "reference_rates", interrupted)
    out = tmp_path / "cut.json"
    stale_part = tmp_path / "cut.encoder-fp32.json"  # what an earlier run with this --output left
    stale_part.write_text(json.dumps({"settings": {"variants": ["smoke"]}, "machine": {}, "results": []}))
    code = main(["bench", "--smoke", "--dtype", "fp32", "--backends", "eager", "--what", "encoder", "--output", str(out)])
    assert code == 130 and not out.exists() and not stale_part.exists()
    assert "before any configuration finished: nothing written" in capsys.readouterr().err


def test_bench_makes_the_plot_folder(tmp_path, capsys):
    """--plot, like --output, may name a folder that does not exist yet."""
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "new" / "r.json", tmp_path / "figures" / "r.png"
    assert main(["bench", "--smoke", "--dtype", "fp32", "--backends", "eager", "--what", "encoder", "--output", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_nothing_to_run_says_why_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "new" / "r.json"
    assert main(["bench", "--smoke", "--what", "e2e", "--backends", "compile", "--output", str(out)]) == 2
    assert "e2e eager and fused" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv, message", [
    (["--variant", "vit_x"], "unknown variant vit_x"),
    (["--batch", "0,8"], "positive integers"),
    (["--dtype", "fp8"], "unknown dtype fp8"),
    (["--backends", "eager,tpu"], "unknown backend tpu"),
    (["--what", "everything"], "unknown benchmark everything"),
    (["--backends", "fused"], "pass --interpret"),
    (["--backends", "fused-graphed", "--interpret"], "fused-graphed backend replays CUDA graphs: it needs a CUDA device"),
    (["--interpret", "--dtype", "fp32,bf16"], "--interpret with --dtype bf16: bfloat16 cannot run in the Triton interpreter"),
    (["--what", "decoder", "--backends", "hf"], "nothing to run"),
    (["--plot", "out.jpg"], "--plot must end in .png"),
    (["--output", "out.txt"], "--output must end in .json"),
    (["--time-budget-s", "-5"], "expected a positive number of seconds, got '-5'"),
    (["--time-budget-s", "nan"], "expected a positive number of seconds, got 'nan'"),
])
def test_bench_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--smoke", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_interpret_needs_the_environment_variable(monkeypatch, capsys):
    """Triton decides interpreted vs compiled when it is imported (by `import samhq_fast`): --interpret
    alone would leave its own jit functions compiled and the kernels failing."""
    monkeypatch.delenv("TRITON_INTERPRET")
    assert main(["bench", "--smoke", "--interpret", "--dtype", "fp32"]) == 2
    assert "TRITON_INTERPRET=1 samhq-fast bench --interpret" in capsys.readouterr().err


def test_bench_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert main(["bench", "--smoke", "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install 'samhq-fast[plot]'" in capsys.readouterr().err


GPU_SESSION = Path(__file__).parents[1] / "bench" / "gpu_session.sh"


def gpu_session_commands(module: str) -> list[list[str]]:
    """The arguments bench/gpu_session.sh gives `python3 -m MODULE`, its commented optional call
    included: line continuations joined, $out and the date filled in, shell redirections cut."""
    text = GPU_SESSION.read_text()
    text = re.sub(r"\\\n#?\s*", " ", text)
    commands = []
    for line in text.splitlines():
        if f"-m {module} " in line:
            arguments = line.split(f"-m {module} ", 1)[1].split(" 2>&1")[0]
            for variable, value in (('"${plot[@]}"', ""), ("$(date +%F)", "2026-01-01"), ('"$out"', "OUT"), ("OUT_DIR", "OUT")):
                arguments = arguments.replace(variable, value)
            commands.append(shlex.split(arguments))
    return commands


def test_gpu_session_command_lines_parse(monkeypatch):
    """The GPU session's command lines are accepted by every parser they reach, as on a GPU: a
    mistyped option there would cost a device call (there is no GPU to try them on first)."""
    from samhq_fast.benchmark import decoder, encoder, profile_block, profile_decoder
    from samhq_fast.cli import _bench_plan, _bench_runs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    bench_lines = gpu_session_commands("samhq_fast.cli")
    assert [argv[0] for argv in bench_lines] == ["bench"] * 3  # the encoder, decoder and fp32 stages
    stages = []
    for argv in bench_lines:
        args = build_parser().parse_args(argv)
        device, backends = _bench_plan(args)
        assert device == "cuda"
        for what, run_argv in _bench_runs(args, backends, device):
            parsed = {"encoder": encoder, "decoder": decoder}[what].parse_args([*run_argv, "--output", "OUT/part.json"])
            stages.append((what, parsed))
    (_, enc), (_, dec), (_, enc_fp32) = stages
    assert enc.variant_list == ["vit_h", "vit_b"] and set(enc.backend_list) == {"eager", "fused", "fused-graphed", "hf", "hf-eager", "compile"}
    assert {"graphed", "graphed-manual", "eager", "compiled"} <= set(dec.mode_list) and dec.e2e_list == ["eager", "fused"]
    assert enc_fp32.dtype == "fp32" and enc_fp32.backend_list == ["eager", "fused"]
    (profile,) = gpu_session_commands("samhq_fast.benchmark.profile_block")
    assert profile_block.parse_args(profile).batches == [1, 8]
    (decoder_profile,) = gpu_session_commands("samhq_fast.benchmark.profile_decoder")
    assert profile_decoder.parse_args(decoder_profile).prompt_counts == [1, 64, 256]
    (compile_baseline,) = gpu_session_commands("samhq_fast.benchmark.encoder")
    assert encoder.parse_args(compile_baseline).backend_list == ["eager", "compile"]


def test_gpu_session_test_files_exist():
    """The GPU test stage names its first files: one renamed away would stop pytest before any test ran."""
    (listed,) = re.findall(r"first=\(([^)]*)\)", GPU_SESSION.read_text())
    missing = [f for f in listed.split() if not (GPU_SESSION.parents[1] / f).is_file()]
    assert len(listed.split()) >= 6 and not missing, missing


# A stand-in for the device's python3: `-m samhq_fast.cli bench ... --output X.json` writes the per-run
# part files as the real run does, then the merged X.json (+ .md) if STUB_FINISHES=1, else it is
# killed first (exit 137: the time limit's SIGKILL). The import probes for optional packages fail.
PYTHON3_STUB = """#!/bin/bash
case "$1" in
  -c) [[ $2 == *"import torch"* ]] && echo "torch stub triton stub" && exit 0; exit 1 ;;
  -m) [[ $2 == pip ]] && exit 0 ;;
esac
prev=""; out=""; dtype=""
for arg in "$@"; do [[ $prev == --output ]] && out=$arg; [[ $prev == --dtype ]] && dtype=$arg; prev=$arg; done
[[ $out == */* ]] || exit 1  # not a benchmark run (pytest of the tests stage...): nothing to write
echo '{}' > "${out%.json}.encoder-$dtype.json"; echo table > "${out%.json}.encoder-$dtype.md"
[[ $STUB_FINISHES == 1 ]] || exit 137
echo '{}' > "$out"; echo table > "${out%.json}.md"
"""


def run_gpu_session(tmp_path, stages: list[str], finishes: bool):
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python3", PYTHON3_STUB), ("nvidia-smi", "#!/bin/sh\necho 'NVIDIA H200, 570.1, 143771 MiB'\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_FINISHES": str(int(finishes)),
           "SAMHQ_FAST_CACHE_DIR": str(tmp_path / "cache"), "SAMHQ_FAST_COMMIT": "0123abcd"}
    done = subprocess.run(["bash", str(GPU_SESSION), str(out), *stages], cwd=GPU_SESSION.parents[1], env=env,
                          capture_output=True, text=True, timeout=60)
    return done, out


@pytest.mark.parametrize("stage, name, dtype", [("encoder", "encoder", "bf16"), ("fp32", "encoder-fp32", "fp32")])
@pytest.mark.parametrize("finishes", [True, False], ids=["merged", "killed"])
def test_gpu_session_keeps_the_results_of_a_killed_run(tmp_path, finishes, stage, name, dtype):
    """The encoder stages (bf16, fp32) leave what the device should return: the merged JSON when the
    run wrote it (its part files and the .md tables deleted: the device returns at most 8 files), the
    part JSON when the run was killed before merging (deleting it would lose every finished configuration)."""
    done, out = run_gpu_session(tmp_path, [stage], finishes)
    assert done.returncode == 0, done.stderr
    names = {p.name for p in out.iterdir()}
    day = next(n for n in names if n.startswith(f"{name}-2")).removeprefix(f"{name}-")[:10]
    kept = f"{name}-{day}.json" if finishes else f"{name}-{day}.encoder-{dtype}.json"
    assert names == {"gpu.txt", f"{name}.log", kept}
    log = (out / "gpu.txt").read_text()
    assert "samhq-fast commit 0123abcd" in log and f"{name} exit {0 if finishes else 137}" in log
    assert ("its part JSON is kept" in log) is not finishes


def test_gpu_session_needs_its_stages(tmp_path):
    """All five stages take ~25 minutes, a device call at most 10: STAGES is not optional."""
    done, out = run_gpu_session(tmp_path, [], finishes=True)
    assert done.returncode != 0 and "usage: bench/gpu_session.sh OUT_DIR STAGES" in done.stderr
    assert not out.exists()
