"""What the encoder and decoder benchmarks share: machine info, CUDA-event timing with rotated
inputs, median / p90 / p99 summaries, the numerics verdict, command-line options, JSON + Markdown
saving. Driven by `samhq-fast bench` (samhq_fast/cli.py), `python -m samhq_fast.benchmark.encoder`
/ `.decoder` (every option of one benchmark), and the bench/ pytest-benchmark suite.
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from ..build import SHORT_DTYPE_NAMES, resolve_dtype
from ..modeling import SamHQConfig, ViTConfig

ROOT = Path(__file__).resolve().parents[2]  # the checkout (editable install): git commit, default output folder

# rel L2 vs eager in the same dtype above which an implementation is suspect (and gets no speed figure).
NUMERICS_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-3}
# ...but bf16 eager is itself far from fp32 with random weights (image encoder: rel L2 1.5e-2 on
# vit_b, 2.5e-2 on vit_h, measured on the CPU), so two correct bf16 implementations can be > 2e-2
# apart. A suspect one still passes when it is as close to the fp32 truth as eager in the same dtype
# is, with this much slack.
FP32_SLACK = 1.25
SMOKE_VARIANT = "smoke"  # the name --smoke's model runs and is reported under (not vit_tiny, Light HQ-SAM)
SMOKE_CONFIG = SamHQConfig(
    ViTConfig(img_size=256, embed_dim=160, depth=4, num_heads=2, mlp_dim=320, global_attn_indexes=(1, 3))
)
SMOKE_NOTE = (
    "SMOKE RUN ON THE CPU WITH A TINY MODEL: checks that the script works. "
    "THESE TIMINGS ARE NOT SPEED FIGURES; do not quote them."
)


# ---------------------------------------------------------------------------------------------
# Command line


def add_run_args(p: argparse.ArgumentParser, name: str, target_s: float, time_budget_s: float) -> None:
    """Options every benchmark has; `finish_run_args` fills the smoke-dependent defaults."""
    p.add_argument("--variants", default="vit_b,vit_h", help="comma list of vit_b / vit_l / vit_h")
    p.add_argument("--dtype", default="bf16", choices=SHORT_DTYPE_NAMES)
    p.add_argument("--output", default=None, help=f"JSON path (default bench/results/{name}-<date>.json); a .md goes next to it")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first one (default 3; smoke: 1)")
    p.add_argument("--min-repeats", type=int, default=None, help="timed calls at least (default 10; smoke: 3)")
    p.add_argument("--max-repeats", type=int, default=200)
    p.add_argument("--target-s", type=float, default=None,
                   help=f"aim for this much timed time per config (default {target_s:g}; smoke: {target_s / 10:g})")
    p.add_argument("--time-budget-s", type=float, default=time_budget_s,
                   help="start no configuration after this many seconds from the script's start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: tests the script, not speed")


def finish_run_args(args: argparse.Namespace, name: str, target_s: float) -> None:
    smoke = args.smoke
    args.variant_list = [SMOKE_VARIANT] if smoke else comma_list(args.variants)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.min_repeats = args.min_repeats if args.min_repeats is not None else (3 if smoke else 10)
    args.target_s = args.target_s if args.target_s is not None else (target_s / 10 if smoke else target_s)
    if args.output is None:
        args.output = str(default_output(name, smoke))


def results_dir() -> Path:
    """bench/results of the checkout when running from one (editable install), else ./bench/results."""
    return (ROOT if (ROOT / "pyproject.toml").is_file() else Path.cwd()) / "bench" / "results"


def default_output(name: str, smoke: bool) -> Path:
    """Where a run writes its JSON without --output: bench/results/NAME-DATE.json, the results that get
    committed; a smoke run's in bench/results/smoke/ (git-ignored), out of `--table bench/results/*.json`."""
    return results_dir() / ("smoke" if smoke else "") / f"{name}-{datetime.date.today().isoformat()}.json"


def comma_list(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def check_vit_only(configs: dict) -> None:
    """ValueError naming the {variant: config} entries that are not SAM ViT encoders: the kernels,
    FLOP counts and HF backends measured here are the ViT's."""
    not_vit = [name for name, config in configs.items() if not isinstance(config.encoder, ViTConfig)]
    if not_vit:
        raise ValueError(f"the benchmarks measure ViT image encoders (vit_b / vit_l / vit_h), not {', '.join(not_vit)} "
                         "(Light HQ-SAM's TinyViT)")


def run_setup(args, overrides: dict | None = None) -> tuple[torch.device, torch.dtype, dict, Path]:
    """device (the CPU for --smoke, else CUDA), dtype, {variant: config} (SMOKE_CONFIG as SMOKE_VARIANT for
    --smoke) and the output path. overrides: attributes the command line has no option for, set on
    args first (samhq-fast bench: allow_cpu, checkpoint, configs)."""
    vars(args).update(overrides or {})
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(args, "allow_cpu", False):  # samhq-fast bench: real sizes on the CPU, labelled not-a-speed-figure
        device = torch.device("cpu")
    else:
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke to test the script on the CPU")
    if getattr(args, "configs", None):  # given by the caller (samhq-fast bench --checkpoint: the checkpoint's architecture)
        configs = args.configs
        args.variant_list = list(configs)  # what the runs iterate and the JSON reports, not --variant's
    else:
        configs = {SMOKE_VARIANT: SMOKE_CONFIG} if args.smoke else {v: SamHQConfig.from_variant(v) for v in args.variant_list}
    check_vit_only(configs)
    return device, resolve_dtype(args.dtype), configs, Path(args.output)


# ---------------------------------------------------------------------------------------------
# Machine


def _nvidia_smi(fields: str, uuid: str) -> str | None:
    """`fields` of the GPU whose UUID ends in `uuid` (torch's, without nvidia-smi's "GPU-" prefix):
    on a node with several GPU models the first row may be another GPU. One row that does not match
    is taken anyway (a UUID format this code does not know); several are not."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu=uuid,{fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split(",", 1) for line in out.stdout.strip().splitlines() if "," in line] if out.returncode == 0 else []
    matches = [values.strip() for gpu, values in rows if uuid and gpu.strip().lower().endswith(uuid.lower())]
    if matches:
        return matches[0]
    return rows[0][1].strip() if len(rows) == 1 else None


def package_version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - missing or broken install: just say so
        return None


COMMIT_ENV = "SAMHQ_FAST_COMMIT"  # the commit, for a copy of the tree without .git (the GPU machine's)


def _git_commit() -> str | None:
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV].strip()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    """What ran the benchmark; deliberately no hostname."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "samhq_fast_commit": _git_commit(),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "SAMHQ_FAST_DISABLE_FUSED", "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 1e9, 1),
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            driver=_nvidia_smi("driver_version", str(props.uuid)),
            gpu_clocks_power=_nvidia_smi("clocks.max.sm,clocks.max.mem,power.limit", str(props.uuid)),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return info


RANDOM_WEIGHTS_NOTE = ("random weights of the real architecture (speed does not depend on weight values; "
                       "outputs are meaningless)")


def weights_note(checkpoint: str | None, smoke: bool) -> str:
    """What the weights of a run are, for its report."""
    if checkpoint:
        return f"checkpoint {checkpoint}"
    return "random weights of a tiny test model (smoke run)" if smoke else RANDOM_WEIGHTS_NOTE


def checkpoint_state_dict(args) -> dict | None:
    """The state dict of args.checkpoint (read once, via samhq_fast.load, on the CPU, in args.dtype),
    or None for random weights."""
    if not getattr(args, "checkpoint", None):
        return None
    if getattr(args, "_checkpoint_state", None) is None:
        from ..build import load

        model = load(args.checkpoint, device="cpu", dtype=args.dtype)
        args._checkpoint_state = {k: v.detach() for k, v in model.state_dict().items()}
    return args._checkpoint_state


def new_report(args, argv, device: torch.device, settings: dict, method: dict) -> dict:
    """A report's common head: smoke flag and note, machine, weights, settings (with the argv), method notes."""
    checkpoint = getattr(args, "checkpoint", None)
    return {
        "smoke": args.smoke,
        **({"note": SMOKE_NOTE} if args.smoke else {}),
        "weights": weights_note(checkpoint, args.smoke),
        "machine": machine_info(device),
        "settings": {**settings, "dtype": args.dtype, "seed": args.seed, "time_budget_s": args.time_budget_s,
                     "argv": sys.argv[1:] if argv is None else list(argv)},
        "method": method,
    }


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA memory. Called from `finally` blocks: after a kernel
    fault (illegal address, device assert) every later CUDA call raises the same sticky error, which
    the configuration already recorded; raising it here again would lose that record and the run."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except RuntimeError:
            pass


def time_calls(fn, args_list: list, device: torch.device) -> list[float]:
    """Milliseconds of each call of fn(*args) for args in args_list, run back to back.

    CUDA: an event pair around each call, one sync at the end, so the queue stays full and a call's
    time is what it adds in steady state (including any CPU-launch bubbles it causes). CPU: wall clock.
    """
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in args_list]
        for (start, end), args in zip(events, args_list):
            start.record()
            fn(*args)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for args in args_list:
        t0 = time.perf_counter()
        fn(*args)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def wall_latencies(fn, args_list: list, device: torch.device, max_s: float = math.inf) -> tuple[list[float], list[float]]:
    """Milliseconds of each call of fn(*args), alone: synchronize, wall clock around the call and a
    synchronize after it (what a caller waiting for one result sees: CPU launch work + GPU time + the
    sync); and of the same calls until fn returned, before the synchronize (the host's part: Python,
    launches or a graph replay; on a GPU the kernels run on meanwhile, unless fn waits for them).
    Stops early once max_s has passed."""
    times, host_times = [], []
    t_end = time.perf_counter() + max_s
    for args in args_list:
        synchronize(device)
        t0 = time.perf_counter()
        fn(*args)
        t_host = time.perf_counter()
        synchronize(device)
        t1 = time.perf_counter()
        times.append(1e3 * (t1 - t0))
        host_times.append(1e3 * (t_host - t0))
        if t1 > t_end:
            break
    return times, host_times


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def timing_summary(times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)
    return {"median_ms": statistics.median(ordered), "p90_ms": percentile(ordered, 0.9), "p99_ms": percentile(ordered, 0.99),
            "min_ms": ordered[0], "max_ms": ordered[-1], "repeats": len(ordered)}


def rotation(arg_sets: list, count: int, start: int = 0) -> list:
    return [arg_sets[(start + i) % len(arg_sets)] for i in range(count)]


def first_call(fn, args: tuple, device: torch.device, keep=lambda out: out) -> tuple[float, object]:
    """Seconds of one synchronized call (the first one: compiles, autotuning, CUDA-graph warm-up) and
    keep(its output), taken at once (CUDA-graph outputs are overwritten by the next call)."""
    synchronize(device)
    t0 = time.perf_counter()
    kept = keep(fn(*args))
    synchronize(device)
    return time.perf_counter() - t0, kept


def warm_up(fn, arg_sets: list, count: int, device: torch.device) -> float:
    """Seconds of `count` untimed calls rotating arg_sets, synchronized (CUDA graphs are captured here)."""
    t0 = time.perf_counter()
    for args in rotation(arg_sets, count):
        fn(*args)
    synchronize(device)
    return time.perf_counter() - t0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def record_peak_memory(result: dict, device: torch.device) -> None:
    """result["peak_memory_gb"]: the most memory torch held on the GPU since reset_peak_memory (CUDA only)."""
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9


def measure(fn, arg_sets: list[tuple], device: torch.device, args, keep=lambda out: out) -> tuple[dict, object]:
    """first_call on arg_sets[0] (its kept output is returned for numerics), warm_up with
    args.warmup calls, then back-to-back timed calls (time_calls) rotating arg_sets: >=
    args.min_repeats, about args.target_s, at most args.max_repeats. Peak memory (CUDA) over the
    timed calls: the steady state, without the first call's autotune / compile allocations."""
    first_call_s, kept = first_call(fn, arg_sets[0], device, keep)
    result = {"first_call_s": first_call_s, "warmup_s": warm_up(fn, arg_sets, args.warmup, device)}
    reset_peak_memory(device)
    per_call_ms = statistics.median(time_calls(fn, rotation(arg_sets, 1, 1), device))
    repeats = int(min(args.max_repeats, max(args.min_repeats, math.ceil(1e3 * args.target_s / max(per_call_ms, 1e-3)))))
    result["timing"] = timing_summary(time_calls(fn, rotation(arg_sets, repeats), device))
    record_peak_memory(result, device)
    return result, kept


# ---------------------------------------------------------------------------------------------
# Numerics


def rel_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double().flatten(), expected.to(got.device).double().flatten()
    return (torch.linalg.norm(got - expected) / torch.linalg.norm(expected)).item()


def numerics_verdict(is_reference: bool, err_ref: float | None, err_fp32: float | None,
                     ref_err_fp32: float | None, tol: float, slack: float) -> tuple[bool | None, str]:
    """(numerics_ok, why): within `tol` (rel L2) of eager in the same dtype, or, failing that, no
    further from the fp32 truth than `slack` x eager's own distance (ref_err_fp32). NaN fails, and so
    does a disagreement with eager that no fp32 truth can excuse. None: nothing to compare with."""
    if is_reference:
        return True, "the reference"
    if err_ref is not None and err_ref <= tol:
        return True, "within tol of eager"
    if err_fp32 is not None:
        bound = max(tol, slack * ref_err_fp32) if ref_err_fp32 is not None else tol
        ok = bool(err_fp32 <= bound)
        return ok, f"rel L2 vs fp32 {'<=' if ok else '>'} {bound:.2e} (max(tol, {slack} x eager's own))"
    if err_ref is not None:
        return False, f"rel L2 vs eager {err_ref:.2e} > {tol:.0e}, and no fp32 reference to excuse it"
    return None, "no reference to compare with"


def file_speed(result: dict, speed: dict) -> None:
    """Figures of an implementation whose numbers are wrong go under invalid_speed, so no table quotes them."""
    result["invalid_speed" if result["numerics_ok"] is False else "speed"] = speed


# ---------------------------------------------------------------------------------------------
# Reporting


def error_fields(e: BaseException) -> dict:
    return {"status": "error", "error": f"{type(e).__name__}: {e}"[:4000], "traceback": traceback.format_exc(limit=8)[-4000:]}


def first_line(entry: dict, width: int) -> str:
    """Why a skipped / failed entry has no figures, on one line."""
    return ((entry.get("reason") or entry.get("error") or "").splitlines() or [""])[0][:width]


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def withheld_reason(entry: dict) -> str | None:
    """Why a result's figures must not be quoted (failed, skipped, numerics that disagree with eager), else None."""
    if entry.get("status") != "ok":
        return f"{entry.get('status')}: {first_line(entry, 100)}"
    if "invalid_speed" in entry:
        num = entry.get("numerics", {})
        return (f"INVALID: numerics disagree with eager (rel L2 vs eager {fmt(num.get('rel_l2_vs_eager'), '.1e')}, "
                f"vs fp32 {fmt(num.get('rel_l2_vs_fp32'), '.1e')}): figures withheld")
    return None


def table_row(head: str, entry: dict, columns: int, cells) -> str:
    """A Markdown row: head ("| a | b |"), then cells(entry["speed"]) (a list of `columns` strings), or
    why the entry's figures are withheld (see withheld_reason) and empty cells."""
    why = withheld_reason(entry)
    if why is not None:
        return f"{head} {why.replace('|', '/')} |" + " |" * (columns - 1)
    return f"{head} " + " | ".join(cells(entry["speed"])) + " |"


def markdown_head(report: dict) -> list[str]:
    """The smoke warning (if any) and the machine line that open every table."""
    lines = [f"**{SMOKE_NOTE}**", ""] if report.get("smoke") else []
    return lines + [machine_line(report["machine"]) + f", {report['settings']['dtype']}"]


def machine_line(m: dict) -> str:
    """The machine a report ran on, in one line (GPU or CPU, versions, date, the code's commit when known)."""
    commit = m.get("samhq_fast_commit")
    return (f"{m.get('gpu') or 'CPU ' + str(m.get('cpu'))}, driver {m.get('driver')}, torch {m['torch']}, triton {m['triton']}, "
            f"transformers {m['transformers']}, CUDA {m['cuda']}; {m['date']}" + (f"; samhq-fast {commit}" if commit else ""))


def save(report: dict, path: Path, markdown_table) -> None:
    """JSON (written atomically) and markdown_table(report) next to it as .md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown_table(report))


def make_recorder(report: dict, path: Path, finalize, markdown_table, summary):
    """record(entry): append it to the report, save the report (so a run killed by a time limit
    still leaves its finished results) and print a one-line summary."""

    def record(entry: dict) -> None:
        report["results"].append(entry)
        finalize(report)
        save(report, path, markdown_table)
        print(f"[bench]          -> {summary(entry)}", flush=True)

    return record


def finish(report: dict, path: Path, start: float, finalize, markdown_table) -> dict:
    report["total_s"] = time.perf_counter() - start
    finalize(report)
    save(report, path, markdown_table)
    print(markdown_table(report), flush=True)
    print(f"[bench] wrote {path} and {path.with_suffix('.md')} in {report['total_s']:.0f} s", flush=True)
    return report
