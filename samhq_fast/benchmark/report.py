"""Results of `samhq-fast bench` as one table: flat rows, a Markdown table, a bar chart.

Reads both the merged JSON that `samhq-fast bench` writes ({"runs": [report, ...]}) and the
single-benchmark reports of `python -m samhq_fast.benchmark.encoder / .decoder` (one report each).
A row is a speed figure only when it was measured on a GPU, not in a smoke run, not under the
Triton interpreter, and its numerics were checked and agree with eager; every other row says why it
is not one, and a row whose numerics disagree shows no figures at all (the JSON keeps them under
invalid_speed, for diagnosis).
"""

import json
import warnings
from pathlib import Path

from .common import fmt, machine_line, withheld_reason

NOT_SPEED_FIGURES = "NOT SPEED FIGURES"
# Backends / decoder modes that run Triton kernels on a GPU: this package's (fused) or Inductor's
# (compile, compiled, graphed): under TRITON_INTERPRET=1 all of them run in the interpreter.
TRITON_BACKENDS = ("fused", "fused-graphed", "compile", "compiled", "graphed", "graphed-manual")
COLUMNS = ("what", "variant", "dtype", "backend", "size", "median ms", "p90 ms", "throughput", "TFLOP/s", "% of matmul",
           "speedup vs eager", "peak GB", "first call s", "rel L2 vs eager", "note")


def runs_of(data: dict) -> list[dict]:
    """The benchmark reports in a results JSON (merged or single)."""
    return list(data["runs"]) if "runs" in data else [data]


def run_kind(run: dict) -> str:
    return run.get("what") or ("encoder" if "flops_per_image" in run else "decoder")


def not_speed_reasons(run: dict, backend: str | None) -> list[str]:
    """Why figures of this run (and backend) are not speed figures; empty when they are."""
    machine = run["machine"]
    reasons = []
    if run.get("smoke"):
        reasons.append("smoke run, tiny model")
    if not machine.get("gpu"):
        reasons.append("measured on the CPU")
    if backend in TRITON_BACKENDS and machine.get("env", {}).get("TRITON_INTERPRET") == "1":
        reasons.append("Triton kernels in the interpreter")
    return reasons


def _row(run: dict, r: dict, what: str, backend: str, size: str, unit: str, per_call: int) -> dict:
    # a result whose numerics disagree with eager has its figures under invalid_speed (withheld); one
    # that did not finish ("error", "skipped") has none to show
    s = (r.get("speed") or {}) if r.get("status") == "ok" else {}
    median = s.get("median_ms")
    withheld = withheld_reason(r)
    reasons = [withheld] if withheld else not_speed_reasons(run, backend)
    if not withheld and r.get("numerics_ok") is None:
        reasons.append("numerics not checked (no reference in this run)")
    return {
        "what": what, "variant": r["variant"], "dtype": r.get("dtype", run["settings"].get("dtype")), "backend": backend,
        "size": size, "status": r.get("status"), "median_ms": median, "p90_ms": s.get("p90_ms"),
        "throughput": per_call * 1e3 / median if median else None, "unit": unit,
        "tflops": s.get("tflops"), "pct_of_matmul": s.get("pct_of_matmul"), "speedup_vs_eager": s.get("speedup_vs_eager"),
        "peak_memory_gb": r.get("peak_memory_gb"), "first_call_s": r.get("first_call_s"), "flops": r.get("flops"),
        "rel_l2_vs_eager": r.get("numerics", {}).get("rel_l2_vs_eager"), "numerics_ok": r.get("numerics_ok"),
        "speed_figure": r.get("status") == "ok" and not reasons, "note": "; ".join(reasons),
    }


def rows_of(run: dict) -> list[dict]:
    """One flat row per result of a benchmark report (see COLUMNS)."""
    rows = []
    for r in run["results"]:
        if run_kind(run) == "encoder":
            rows.append(_row(run, r, "encoder", r["backend"], f"batch {r['batch']}", "img/s", r["batch"]))
        elif r["test"] == "throughput":
            rows.append(_row(run, r, "decoder", r["mode"], f"{r['prompts']} {r['prompt']}", "prompts/s", r["prompts"]))
        elif r["test"] == "latency":
            rows.append(_row(run, r, "decoder latency", r["mode"], "1 box, alone", "calls/s", 1))
        else:
            rows.append(_row(run, r, "e2e", r["backend"], "set_image + 1 box", "img/s", 1))
    return rows


def load_rows(data: dict) -> list[dict]:
    return [row for run in runs_of(data) for row in rows_of(run)]


def rate_lines(runs: list[dict]) -> list[str]:
    """The GPU's own matmul rate and copy bandwidth, measured in each encoder run: what '% of matmul' divides by."""
    lines = []
    for run in runs:
        rates = run.get("reference_rates") or {}
        matmul = rates.get("matmul_reference")
        if matmul:
            lines.append(f"Measured in the {run['settings'].get('dtype')} encoder run: {matmul.get('dtype')} matmul "
                         f"{fmt(matmul.get('tflops'), '.0f')} TFLOP/s ({'x'.join(map(str, matmul.get('shape', [])))}), copy "
                         f"{fmt(rates.get('copy', {}).get('gb_per_s_read_plus_write'), '.0f')} GB/s (read + write).")
    return lines


def incomplete(data: dict) -> str | None:
    """Why a results JSON holds fewer configurations than its run asked for, or None: an interrupted
    merge says so; a benchmark report without total_s (written by `finish` only) was cut off, e.g.
    by a time limit's SIGKILL, and holds what it had saved after each configuration."""
    if data.get("interrupted"):
        return str(data["interrupted"])
    cut = [run_kind(run) for run in runs_of(data) if "total_s" not in run]
    return f"the {' and '.join(cut)} run ended before it finished (no total_s)" if cut else None


def markdown_table(data: dict, source: str | None = None) -> str:
    """The performance table of one results JSON, headed by the machine(s) it ran on."""
    runs = runs_of(data)
    machines = {}  # one line per machine (runs differ in their date only)
    for run in runs:
        line = machine_line(run["machine"])
        machines.setdefault(line.split(";")[0], line)
    rows = [row for run in runs for row in rows_of(run)]
    cut_short = incomplete(data)
    lines = [f"Results from `{source}`." if source else "", *(f"Machine: {m}" for m in machines.values()),
             *rate_lines(runs), f"Weights: {data.get('weights') or runs[0].get('weights') or 'random'}.",
             f"**Incomplete: {cut_short}.**" if cut_short else None, ""]
    if any(not row["speed_figure"] for row in rows):
        lines += [f"**Rows whose note is not empty are {NOT_SPEED_FIGURES}** (CPU, smoke run, Triton interpreter or "
                  "failed numerics): do not quote them.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [row["what"], row["variant"], row["dtype"], row["backend"], row["size"], fmt(row["median_ms"], ".3f"),
                 fmt(row["p90_ms"], ".3f"), "-" if row["throughput"] is None else f"{row['throughput']:,.1f} {row['unit']}",
                 fmt(row["tflops"], ".2f"), fmt(row["pct_of_matmul"], ".0f"), fmt(row["speedup_vs_eager"], ".2f"),
                 fmt(row["peak_memory_gb"], ".1f"), fmt(row["first_call_s"], ".1f"), fmt(row["rel_l2_vs_eager"], ".1e"),
                 row["note"].replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(line for line in lines if line is not None).lstrip("\n") + "\n"


MACHINE_KEYS = ("torch", "triton", "transformers", "cuda", "date")  # what common.machine_line reads


def read_results(path: str | Path) -> dict:
    """A results JSON (merged, or one benchmark's report), with ValueError naming the file when it is
    not one: every report has "machine" and a list of "results"."""
    not_results = f"{path} is not a samhq-fast bench results file"
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as e:  # invalid JSON or not text at all
        raise ValueError(f"{not_results}: not valid JSON ({e})") from None
    except OSError as e:  # a folder (bench/results/ for bench/results/*.json), unreadable...
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    runs = data.get("runs", [data]) if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs or not all(
        isinstance(run, dict) and isinstance(run.get("machine"), dict) and set(MACHINE_KEYS) <= run["machine"].keys()
        and isinstance(run.get("results"), list) for run in runs
    ):
        raise ValueError(f"{not_results} (no 'machine' with {', '.join(MACHINE_KEYS)} and no 'results' list in it, or in "
                         "each of its 'runs'): pass the JSON that `samhq-fast bench --output` or a benchmark module wrote")
    return data


def table_from_files(paths: list[str]) -> str:
    """`samhq-fast bench --table FILE...`: one table per results JSON. Of several files (a glob over
    bench/results/), one that is not a results JSON (a pytest-benchmark JSON, autotune.json) is
    skipped with a warning; a single one, or none valid, is a ValueError."""
    tables, problems = [], []
    for path in paths:
        try:
            data = read_results(path)
            tables.append(markdown_table(data, source=str(path)))
        except ValueError as e:
            problems.append(str(e))
        except (KeyError, TypeError, AttributeError) as e:  # a results file edited by hand, or of another schema
            problems.append(f"{path} is not a samhq-fast bench results file: a result lacks or mistypes {e}")
    if problems and not tables:
        raise ValueError("; ".join(problems))
    for problem in problems:
        warnings.warn(f"skipped: {problem}", stacklevel=2)
    return "\n".join(tables)


def plot(data: dict, path: str) -> None:
    """Bar chart of throughput per case (variant, dtype, size), one bar per backend, one panel per
    kind of measurement; the title says when the figures are not speed figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in load_rows(data) if r["throughput"] is not None]
    kinds = list(dict.fromkeys(r["what"] for r in rows)) or ["(no results)"]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 3.5 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        sub = [r for r in rows if r["what"] == kind]
        cases = list(dict.fromkeys(f"{r['variant']} {r['dtype']}\n{r['size']}" for r in sub))
        backends = list(dict.fromkeys(r["backend"] for r in sub))
        width = 0.8 / max(1, len(backends))
        for i, backend in enumerate(backends):
            values = {f"{r['variant']} {r['dtype']}\n{r['size']}": r["throughput"] for r in sub if r["backend"] == backend}
            xs = [j + i * width for j, c in enumerate(cases) if c in values]
            ax.bar(xs, [values[c] for c in cases if c in values], width, label=backend)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=8)
        ax.set_ylabel(sub[0]["unit"] if sub else "")
        ax.set_title(kind)
        ax.legend(fontsize=8)
    runs = runs_of(data)
    speed = all(r["speed_figure"] for r in rows) and bool(rows)
    title = machine_line(runs[0]["machine"]).split(";")[0] if runs else ""
    fig.suptitle(title + ("" if speed else f"\n{NOT_SPEED_FIGURES} (CPU / smoke / interpreter / failed numerics)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
