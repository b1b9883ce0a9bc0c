"""Image-encoder throughput on one GPU: eager vs torch.compile vs fused (Triton; also replayed from a
CUDA graph per batch size: fused-graphed) vs HF transformers (SDPA attention: hf; eager attention: hf-eager).

    python -m samhq_fast.benchmark.encoder --variants vit_b,vit_h --batch 1,8,32 --dtype bf16 \
        --backends eager,compile,fused,fused-graphed,hf,hf-eager --output bench/results/encoder-$(date +%F).json

Per (variant, batch, backend): first-call time (Triton compiles / autotuning, torch.compile), then
median and p90 of CUDA-event timings over back-to-back calls rotating three inputs, peak memory,
images/s, achieved TFLOP/s and its share of the GPU's own matmul rate measured in the run's dtype, the speedup
over eager in the same run, and the relative L2 error of the image embeddings against eager in the
same dtype and against eager fp32. Writes JSON (plus a Markdown table next to it) after every
configuration, so a run killed by a time limit still leaves its finished results. One failing
backend or configuration is recorded with its error and the run goes on.

Order: per variant eager (the numerics reference), fused, fused-graphed, hf, hf-eager; then torch.compile for every variant,
last, because max-autotune compiles take minutes: no configuration starts after --time-budget-s
(420 s) and no compile one with less than --compile-reserve-s (150 s) left; those are recorded as
skipped. Drop compile with `--backends eager,fused,hf` for a quick run.

`--smoke` runs a tiny model on the CPU so the script itself can be tested without a GPU; its
timings are not speed figures.
"""

import argparse
import statistics
import time

import torch

from ..build import build_sam_hq
from ..checkpoint import hf_config_kwargs
from ..flops import encoder_flops, encoder_flops_breakdown
from ..fused import KILL_SWITCH, fused_disabled
from ..graphs import GraphedEncoder
from ..modeling import SamHQConfig
from . import common
from .common import FP32_SLACK, NUMERICS_TOL, SMOKE_CONFIG  # noqa: F401  (module attributes the tests use)

ALL_BACKENDS = ("eager", "compile", "fused", "fused-graphed", "hf", "hf-eager")
# transformers' attn_implementation per HF backend, and the vision attention class it must build
HF_ATTENTION = {"hf": ("sdpa", "SamHQVisionSdpaAttention"), "hf-eager": ("eager", "SamHQVisionAttention")}
# NUMERICS_TOL and FP32_SLACK (common.py) decide whether a backend's neck output is close enough to
# eager's (or to eager fp32's) to get a speed figure.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,8,32; smoke: 1)")
    p.add_argument("--backends", default=None, help=f"comma list of {','.join(ALL_BACKENDS)} (default all; smoke: eager,compile)")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode for the 'compile' backend")
    p.add_argument("--compile-reserve-s", type=float, default=150.0,
                   help="start no 'compile' configuration with less than this left of the budget (max-autotune is slow)")
    common.add_run_args(p, "encoder", target_s=2.0, time_budget_s=420.0)
    args = p.parse_args(argv)

    smoke = args.smoke
    args.batches = common.comma_list(args.batch or ("1" if smoke else "1,8,32"), int)
    args.backend_list = common.comma_list(args.backends or ("eager,compile" if smoke else ",".join(ALL_BACKENDS)))
    unknown = sorted(set(args.backend_list) - set(ALL_BACKENDS))
    if unknown:
        p.error(f"unknown backends {unknown}; choose from {ALL_BACKENDS}")
    common.finish_run_args(args, "encoder", target_s=2.0)
    return args


# ---------------------------------------------------------------------------------------------
# Reference rates


# Warm-up calls before a reference rate is timed: cuBLAS heuristics, and ~0.1 s of back-to-back work
# so the clocks have ramped up (8192^3 bf16 takes ~1.4 ms on an H200); a rate read low would
# overstate every "% of the matmul rate".
REFERENCE_WARMUP = 64


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, warmup: int, repeats: int = 20) -> dict:
    """Dense n x n x n matmul: the achievable GEMM rate of this GPU in `dtype` (the ceiling that
    achieved TFLOP/s is compared with; the datasheet peak is not reachable)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    common.time_calls(torch.matmul, [(a, b)] * warmup, device)
    ms = statistics.median(common.time_calls(torch.matmul, [(a, b)] * repeats, device))
    return {"shape": [n, n, n], "dtype": str(dtype).removeprefix("torch."), "median_ms": ms,
            "tflops": 2 * n**3 / (ms * 1e-3) / 1e12, "repeats": repeats}


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, repeats: int = 20) -> dict:
    """Device-to-device copy of nbytes: GB/s counting bytes read + written (the memory-bound ceiling)."""
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    common.time_calls(dst.copy_, [(src,)] * warmup, device)
    ms = statistics.median(common.time_calls(dst.copy_, [(src,)] * repeats, device))
    return {"bytes_copied": src.numel() * 4, "median_ms": ms, "gb_per_s_read_plus_write": 2 * src.numel() * 4 / (ms * 1e-3) / 1e9,
            "repeats": repeats}


def reference_rates(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    # On the CPU (never a speed figure) small sizes and a short warm-up: an 8192^3 bf16 matmul takes
    # ~30 s on a 2-core CPU, so the GPU's sizes would take most of an hour before the first configuration.
    on_gpu = device.type == "cuda" and not smoke
    n, nbytes, warmup = (8192, 2 * 2**30, REFERENCE_WARMUP) if on_gpu else (512, 64 * 2**20, 3)
    rates = {"matmul_bf16": matmul_rate(device, torch.bfloat16, n, warmup)}
    if dtype != torch.bfloat16:
        rates[f"matmul_{str(dtype).removeprefix('torch.')}"] = matmul_rate(device, dtype, n, warmup)
    rates["copy"] = copy_bandwidth(device, nbytes, warmup)
    return rates


# ---------------------------------------------------------------------------------------------
# Models: one set of random weights per variant, shared by every backend


def randomize_extras_(model, seed: int) -> None:
    """PyTorch's init leaves the rel-pos tables and pos_embed at zero, which would let a backend that
    mishandles them pass the numerics check: give them values (speed does not depend on them)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        enc = model.image_encoder
        enc.pos_embed.copy_(0.1 * torch.randn(enc.pos_embed.shape, generator=gen, device=model.device))
        for block in enc.blocks:
            for table in (block.attn.rel_pos_h, block.attn.rel_pos_w):
                table.copy_(0.5 * torch.randn(table.shape, generator=gen, device=model.device))


def make_weights(config: SamHQConfig, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """The variant's random weights (real architecture via build_sam_hq), kept on the CPU so that
    no backend's peak memory includes another model."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_sam_hq(config, device=device, dtype=dtype, backend="eager")
    randomize_extras_(model, seed)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    return weights


def build_ours(config: SamHQConfig, weights: dict, device, dtype, backend: str):
    # Under the device context the random init runs on the GPU: a CPU init of vit_h takes seconds.
    with torch.device(device):
        model = build_sam_hq(config, device=device, dtype=dtype, backend=backend)
    model.load_state_dict(weights, strict=True)
    return model


def hf_config(config: SamHQConfig, attn_implementation: str):
    """transformers' SamHQConfig of the same architecture."""
    from transformers import SamHQConfig as HFSamHQConfig

    return HFSamHQConfig(**hf_config_kwargs(config), attn_implementation=attn_implementation)


def build_hf(config: SamHQConfig, weights: dict, device, dtype, backend: str = "hf"):
    """HF SamHQModel (backend "hf": sdpa attention, "hf-eager": eager attention) holding our weights,
    so its numerics are comparable too."""
    from transformers import SamHQModel

    from ..checkpoint import original_to_hf

    attn_implementation, attention_class = HF_ATTENTION[backend]
    cfg = hf_config(config, attn_implementation)
    try:  # build straight on the GPU: a CPU fp32 init of vit_h takes seconds
        with torch.device(device):
            model = SamHQModel(cfg)
    except Exception:  # noqa: BLE001 - some transformers versions dislike the device context
        model = SamHQModel(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    model.load_state_dict(original_to_hf(weights), strict=True)
    built = type(model.vision_encoder.layers[0].attn).__name__
    if built != attention_class:
        raise RuntimeError(f"HF built {built}, not the {attention_class} that attn_implementation={attn_implementation!r} asks for")
    return model


class Backend:
    """A model and its timed call `fn(images) -> neck output [B, 256, G, G]`, built once per variant.

    For "compile", `for_batch(batch)` compiles afresh per batch size (dynamic=False: a static, fully
    autotuned graph each) after dropping the previous graphs and their CUDA-graph memory pools, so
    one batch's peak memory does not include another's.
    """

    def __init__(self, name: str, config: SamHQConfig, weights: dict, device, dtype, compile_mode: str):
        self.name, self.compile_mode = name, compile_mode
        self.info = {"timed_call": "model.encode_image(x)"}
        if name in ("eager", "fused", "compile"):
            self.model = build_ours(config, weights, device, dtype, "eager" if name == "compile" else name)
            self.encoder = self.model.image_encoder
            self.fn = self._encode
        elif name == "fused-graphed":
            self.model = build_ours(config, weights, device, dtype, "fused")
            self.graphed = GraphedEncoder(self.model)
            self.fn = lambda images: self.graphed(images)[0]
            self.info = {"timed_call": "GraphedEncoder(fused model)(x): copy x into the graph's input, replay the CUDA graph "
                                       "of model.encode_image for this batch size, copy the three outputs out"}
        elif name in HF_ATTENTION:
            self.model = build_hf(config, weights, device, dtype, name)
            self.fn = self._hf_encode
            self.info = {"timed_call": f"SamHQModel.vision_encoder(pixel_values=x), attn_implementation={HF_ATTENTION[name][0]!r} "
                                       "(no HQ feature head)"}
        else:
            raise ValueError(f"unknown backend {name!r}")
        if name == "compile":
            self.info = {"timed_call": f"model.encode_image(x), image_encoder under torch.compile(mode={compile_mode!r}, dynamic=False)"}

    def for_batch(self, batch: int) -> None:
        if self.name == "compile":
            torch._dynamo.reset()
            self.model.image_encoder = torch.compile(self.encoder, mode=self.compile_mode, dynamic=False)

    def after_batch(self) -> None:
        if self.name == "fused-graphed":
            self.graphed._graphs.clear()  # frees this batch size's graph memory pool
        if self.name == "compile":
            self.model.image_encoder = self.encoder
            torch._dynamo.reset()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.name == "compile" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # a new inference step for CUDA-graph trees
        return self.model.encode_image(images)[0]

    def _hf_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.vision_encoder(pixel_values=images).last_hidden_state


# ---------------------------------------------------------------------------------------------
# Measurement of one (variant, batch, backend)


def make_inputs(config: SamHQConfig, batch: int, device, dtype, seed: int) -> list[torch.Tensor]:
    """Three different normalized-image-like inputs (same for every backend), rotated through the
    timed calls so that no cache (L2, cudagraph input buffers) sees the same data every time."""
    gen = torch.Generator(device=device).manual_seed(seed)
    size = config.img_size
    return [torch.randn(batch, 3, size, size, generator=gen, device=device).to(dtype) for _ in range(3)]


def hq_head_flops(config: SamHQConfig, batch: int) -> int:
    """FLOPs of the HQ feature head that encode_image runs after the encoder (not in encoder_flops):
    two ConvT(2x2, s2) stacks, vit_dim -> 256 -> 32 and 256 -> 64 -> 32, on the G x G grid."""
    g2 = config.embedding_size**2
    macs = g2 * 4 * (config.vit_dim * 256 + 256 * 64) + 4 * g2 * 4 * (256 * 32 + 64 * 32)
    return 2 * batch * macs


class References:
    """Numerics references per (variant, batch), all on input 0: eager's neck output in the run
    dtype (whole batch), eager fp32's on image 0 (the truth), and eager's own error vs that truth."""

    def __init__(self):
        self.eager, self.fp32, self.eager_err_fp32 = {}, {}, {}

    def eager_noise(self, variant: str, batch: int) -> float | None:
        """Eager's error vs fp32 for this batch, else the largest seen for the variant (per image it hardly varies)."""
        if (variant, batch) in self.eager_err_fp32:
            return self.eager_err_fp32[(variant, batch)]
        seen = [e for (v, _), e in self.eager_err_fp32.items() if v == variant]
        return max(seen) if seen else None


def check_numerics(neck: torch.Tensor, refs: References, variant: str, batch: int, backend: str, tol: float) -> dict:
    """numerics_ok: within `tol` (rel L2) of eager in the same dtype, or, failing that, no further
    from the fp32 truth than FP32_SLACK x eager's own distance (bf16 rounding noise is ~1e-2)."""
    out = {"tol": tol, "compared": "neck output on input 0 (vs fp32: image 0)"}
    eager, fp32 = refs.eager.get((variant, batch)), refs.fp32.get((variant, batch))
    err_eager = common.rel_l2(neck, eager) if eager is not None and backend != "eager" else None
    err_fp32 = common.rel_l2(neck[:1], fp32) if fp32 is not None else None
    noise = err_fp32 if backend == "eager" else refs.eager_noise(variant, batch)
    out.update(rel_l2_vs_eager=err_eager, rel_l2_vs_fp32=err_fp32, eager_rel_l2_vs_fp32=noise)
    ok, why = common.numerics_verdict(backend == "eager", err_eager, err_fp32, noise, tol, FP32_SLACK)
    return {"numerics": {**out, "verdict": why}, "numerics_ok": ok}


def speed_figures(timing: dict, batch: int, flops: int, matmul_tflops: float | None) -> dict:
    ms = timing["median_ms"]
    tflops = flops / (ms * 1e-3) / 1e12
    return {
        **timing,
        "ms_per_image": ms / batch,
        "images_per_s": 1e3 * batch / ms,
        "tflops": tflops,
        "pct_of_matmul": 100 * tflops / matmul_tflops if matmul_tflops else None,
    }


def run_config(variant, config, backend: Backend, batch, device, dtype, args, references, matmul_tflops) -> dict:
    """One (variant, batch, backend): common.measure, check numerics, turn timings into speed figures."""
    entry = new_entry(variant, batch, backend.name, args, config)
    inputs = None
    try:
        backend.for_batch(batch)
        inputs = make_inputs(config, batch, device, dtype, args.seed + batch)
        with torch.inference_mode():
            result, neck = common.measure(backend.fn, [(x,) for x in inputs], device, args, keep=lambda out: out.detach().to("cpu", copy=True))
        result.update(check_numerics(neck, references, variant, batch, backend.name, NUMERICS_TOL[dtype]))
        if backend.name == "eager":
            references.eager[(variant, batch)] = neck
            references.eager_err_fp32[(variant, batch)] = result["numerics"]["rel_l2_vs_fp32"]
        if backend.name == "compile":
            # The first call is compile + autotune + one run; the run itself is about the median.
            result["compile_s"] = result["first_call_s"] - result["timing"]["median_ms"] * 1e-3
        common.file_speed(result, speed_figures(result.pop("timing"), batch, entry["flops"], matmul_tflops))
        entry.update(result, status="ok")
    except Exception as e:  # noqa: BLE001 - one failing backend must not stop the run
        entry.update(common.error_fields(e))
    finally:
        del inputs
        try:
            backend.after_batch()
        except Exception:  # noqa: BLE001
            pass
        common.free_memory(device)
    return entry


def new_entry(variant: str, batch: int, backend: str, args, config: SamHQConfig) -> dict:
    return {"variant": variant, "batch": batch, "backend": backend, "dtype": args.dtype,
            "flops": encoder_flops(config.encoder, batch)}


def fp32_references(variant, config, weights, device, dtype, args, refs: References) -> dict:
    """Eager fp32 (the same weights, upcast) on image 0 of each batch's input 0: the numerics truth.
    One image per batch size keeps it cheap (vit_h: ~0.1 s each, a few GB)."""
    model = x = None
    try:
        model = build_ours(config, weights, device, torch.float32, "eager")
        with torch.inference_mode():
            for batch in args.batches:
                x = make_inputs(config, batch, device, dtype, args.seed + batch)[0][:1]
                refs.fp32[(variant, batch)] = model.encode_image(x.float())[0].to("cpu", copy=True)
        return {"fp32_reference": "eager fp32 on image 0 of input 0, per batch size"}
    except Exception as e:  # noqa: BLE001 - numerics then rest on the same-dtype comparison alone
        return {"fp32_reference_error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        del model, x
        common.free_memory(device)


# ---------------------------------------------------------------------------------------------
# Reporting


def finalize(report: dict) -> None:
    """Speedups vs eager of the same variant, batch and run."""
    eager = {(r["variant"], r["batch"]): r["speed"]["median_ms"]
             for r in report["results"] if r["backend"] == "eager" and "speed" in r}
    for r in report["results"]:
        for key in ("speed", "invalid_speed"):
            if key in r and (r["variant"], r["batch"]) in eager:
                r[key]["speedup_vs_eager"] = eager[(r["variant"], r["batch"])] / r[key]["median_ms"]


def markdown_table(report: dict) -> str:
    rates = report.get("reference_rates", {})
    mm = rates.get("matmul_reference", {})
    lines = common.markdown_head(report) + [
        f"Measured matmul rate ({mm.get('dtype', '?')}, {mm.get('shape', '?')}): {common.fmt(mm.get('tflops'), '.0f')} TFLOP/s; "
        f"copy bandwidth: {common.fmt(rates.get('copy', {}).get('gb_per_s_read_plus_write'), '.0f')} GB/s.",
        "TFLOP/s credit every backend with the same work: encoder_flops(config, batch), real tokens.",
        "",
        "| variant | batch | backend | ms/img | img/s | TFLOP/s | % of matmul | peak GB | speedup | rel L2 vs eager / fp32 | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        head = f"| {r['variant']} | {r['batch']} | {r['backend']} |"
        num = r.get("numerics", {})
        err = f"{'ref' if r['backend'] == 'eager' else common.fmt(num.get('rel_l2_vs_eager'), '.1e')} / {common.fmt(num.get('rel_l2_vs_fp32'), '.1e')}"
        lines.append(common.table_row(head, r, 8, lambda s: [
            f"{s['ms_per_image']:.2f}", f"{s['images_per_s']:.1f}", f"{s['tflops']:.1f}", common.fmt(s["pct_of_matmul"], ".0f"),
            common.fmt(r.get("peak_memory_gb"), ".1f"), common.fmt(s.get("speedup_vs_eager"), ".2f"), err, f"{r['first_call_s']:.1f}"]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def method_notes(args, dtype) -> dict:
    return {
        "weights": "random: build_sam_hq (PyTorch default init of the real architecture), rel-pos tables and pos_embed "
                   "drawn N(0, 0.5^2) / N(0, 0.1^2) so the numerics check exercises them; every backend loads the same "
                   "weights. Speed does not depend on weight values.",
        "inputs": "3 random N(0,1) image batches per (variant, batch), identical for every backend, rotated through the timed calls",
        "timed_call": "eager/compile/fused/fused-graphed: model.encode_image(x) = image encoder + HQ feature head (hq_head_flops, not in "
                      "'flops': +0.9% vit_b, +0.2% vit_h); hf / hf-eager: SamHQModel.vision_encoder(pixel_values=x) = encoder + neck "
                      "only, with transformers' SDPA / eager (materialized scores) attention",
        "flops": "encoder_flops(config, batch) with the real-token count (samhq_fast/flops.py): the same work credited to "
                 "every backend. Eager, compile and HF also run qkv/proj on the zero-padded 70x70 windows "
                 "(padded_windows=True: +3.2% vit_b, +5.2% vit_h); that extra work is not credited.",
        "timing": f"first call timed apart (includes Triton compile/autotune and torch.compile); then {args.warmup} warm-up "
                  f"calls; then >= {args.min_repeats} calls back to back (about {args.target_s} s, at most {args.max_repeats}), "
                  "CUDA events around each; median and p90. pct_of_matmul = achieved TFLOP/s / measured matmul rate.",
        "compile_s": "compile backend only: first_call_s minus one median call",
        "numerics": f"rel L2 of the neck output on input 0 vs eager in the same dtype (whole batch) and vs eager fp32 "
                    f"(image 0). numerics_ok: vs-eager <= {NUMERICS_TOL[dtype]:g}, or else vs-fp32 <= max(tol, {FP32_SLACK} x "
                    "eager's own vs-fp32 error) (bf16 eager is 1.5e-2 (vit_b) / 2.5e-2 (vit_h) from fp32 with these random "
                    "weights, so two correct bf16 backends can be over 2e-2 apart). numerics_ok false -> the speed goes "
                    "under 'invalid_speed', not 'speed'.",
        "peak_memory_gb": "torch.cuda.max_memory_allocated during the timed calls (weights + inputs + activations), reset "
                          "after the warm-up (autotune / compile allocations are not counted)",
    }


def prepare_variant(variant, config, device, dtype, args, references, report) -> dict | Exception:
    """The variant's shared weights (random, or --checkpoint's) and its fp32 numerics references (or the error)."""
    try:
        weights = common.checkpoint_state_dict(args) or make_weights(config, device, dtype, args.seed)
    except Exception as e:  # noqa: BLE001 - every config of the variant reports it
        report["numerics_context"][variant] = {"weights_error": f"{type(e).__name__}: {e}"[:2000]}
        common.free_memory(device)
        return e
    report["numerics_context"][variant] = fp32_references(variant, config, weights, device, dtype, args, references)
    return weights


def run_backend(variant, name, config, weights, device, dtype, args, references, matmul_tflops, start, record) -> None:
    """Every batch size of one (variant, backend): the model is built once, on first need."""
    backend, build_error = None, None
    if isinstance(weights, Exception):
        build_error = {"status": "error", "error": f"making the variant's weights: {type(weights).__name__}: {weights}"[:4000]}
    for batch in args.batches:
        elapsed = time.perf_counter() - start
        left = args.time_budget_s - elapsed
        entry = new_entry(variant, batch, name, args, config)
        if left <= 0 or (name == "compile" and left < args.compile_reserve_s):
            record({**entry, "status": "skipped", "reason": f"time budget: {elapsed:.0f} s of {args.time_budget_s:.0f} s used"})
            continue
        if name in HF_ATTENTION and common.package_version("transformers") is None:
            record({**entry, "status": "skipped", "reason": "transformers is not installed"})
            continue
        if name.startswith("fused") and fused_disabled():  # load would build the eager model: not a fused figure
            record({**entry, "status": "skipped", "reason": f"{KILL_SWITCH} is set"})
            continue
        print(f"[bench] {elapsed:6.0f}s  {variant} batch {batch} {name} ...", flush=True)
        if backend is None and build_error is None:
            try:
                t0 = time.perf_counter()
                backend = Backend(name, config, weights, device, dtype, args.compile_mode)
                entry["build_s"] = time.perf_counter() - t0  # once per (variant, backend)
            except Exception as e:  # noqa: BLE001 - recorded for every batch of this backend
                build_error = {**common.error_fields(e), "error": f"building the model: {type(e).__name__}: {e}"[:4000]}
                common.free_memory(device)
        if build_error is not None:
            record({**entry, **build_error})
            continue
        entry.update(backend.info)
        record({**entry, **run_config(variant, config, backend, batch, device, dtype, args, references, matmul_tflops)})
    del backend
    common.free_memory(device)


def run_order(args) -> list[tuple[str, str]]:
    """(variant, backend) pairs: eager first (it is the numerics reference), compile last so its long
    max-autotune compiles cannot starve the others of the time budget."""
    backends = [b for b in ALL_BACKENDS if b in args.backend_list]
    fast = [b for b in backends if b != "compile"]
    order = [(v, b) for v in args.variant_list for b in fast]
    if "compile" in backends:
        order += [(v, "compile") for v in args.variant_list]
    return order


def main(argv=None, **overrides) -> dict:
    """Run the benchmark on argv (its command line); returns the report. overrides: see common.run_setup."""
    args = parse_args(argv)
    start = time.perf_counter()
    device, dtype, configs, out = common.run_setup(args, overrides)

    settings = {"variants": args.variant_list, "batches": args.batches, "backends": args.backend_list, "compile_mode": args.compile_mode}
    report = {
        **common.new_report(args, argv, device, settings, method_notes(args, dtype)),
        "flops_per_image": {v: {"total": encoder_flops(c.encoder), "padded_windows": encoder_flops(c.encoder, padded_windows=True),
                                "hq_head": hq_head_flops(c, 1), "breakdown": encoder_flops_breakdown(c.encoder)}
                            for v, c in configs.items()},
        "reference_rates": {},
        "numerics_context": {},
        "results": [],
    }
    where = report["machine"].get("gpu") or "CPU" + (" (smoke)" if args.smoke else "")
    print(f"[bench] {where}, torch {torch.__version__}, dtype {args.dtype}: measuring the matmul rate and copy bandwidth", flush=True)

    try:
        rates = reference_rates(device, dtype, args.smoke)
        key = "matmul_bf16" if dtype == torch.bfloat16 else f"matmul_{str(dtype).removeprefix('torch.')}"
        rates["matmul_reference"] = rates[key]
        report["reference_rates"] = rates
        print(f"[bench] matmul {rates[key]['tflops']:.3g} TFLOP/s, copy {rates['copy']['gb_per_s_read_plus_write']:.3g} GB/s", flush=True)
    except Exception as e:  # noqa: BLE001
        report["reference_rates"] = {"error": f"{type(e).__name__}: {e}"}
    matmul_tflops = report["reference_rates"].get("matmul_reference", {}).get("tflops")
    common.free_memory(device)

    weights, references = {}, References()
    record = common.make_recorder(report, out, finalize, markdown_table, summary)
    for variant, name in run_order(args):
        config = configs[variant]
        if variant not in weights:
            weights[variant] = prepare_variant(variant, config, device, dtype, args, references, report)
        run_backend(variant, name, config, weights[variant], device, dtype, args, references, matmul_tflops, start, record)
    return common.finish(report, out, start, finalize, markdown_table)


def summary(entry: dict) -> str:
    if entry["status"] != "ok":
        return f"{entry['status']}: {common.first_line(entry, 200)}"
    s = entry.get("speed") or entry["invalid_speed"]
    num = entry.get("numerics", {})
    errs = ", ".join(f"rel L2 vs {ref} {num[key]:.1e}" for ref, key in (("eager", "rel_l2_vs_eager"), ("fp32", "rel_l2_vs_fp32"))
                     if num.get(key) is not None)
    return (f"{s['median_ms']:.2f} ms ({s['ms_per_image']:.2f} ms/img, {s['tflops']:.1f} TFLOP/s), first call "
            f"{entry['first_call_s']:.1f} s, {errs}" + ("" if "speed" in entry else "  NUMERICS FAILED"))


if __name__ == "__main__":
    main()
