"""Prompt-decoder speed on one GPU: eager vs torch.compile vs torch.compile + CUDA graphs.

    python -m samhq_fast.benchmark.decoder --variants vit_b,vit_h --prompts 1,16,64,256,1024 --dtype bf16 \
        --modes eager,compiled,graphed,graphed-conv,graphed-manual --output bench/results/decoder-$(date +%F).json

Timed: prompt encoder + HQ mask decoder for N prompts against ONE image's cached features, with
SAM-HQ's output rule (multimask_output=True: the best of the 3 multimask masks by predicted IoU,
plus the HQ mask) -> low-res logits [N, 1, 256, 256] and scores [N, 1]; no upsampling to the image
(postprocess_masks). The image embeddings and HQ features are computed once per image (set_image:
one random image through model.encode_image per variant) and are NOT in the timings; nor is the
compiled decoder's per-image work (PromptDecoder.prepare_images, which set_image runs on the fused
backend; here the first call on the image does it). Modes:
  eager     model.prompt_encoder + model.mask_decoder, as SamHQPredictor.predict_torch's eager branch
  compiled  samhq_fast.decoding.PromptDecoder(model, cuda_graphs=False): prompts padded to buckets
            (1, 4, 16, 64, 256 prompts; more run in chunks of 256) under torch.compile, no CUDA graphs
  graphed   PromptDecoder(model, cuda_graphs="trees"): the same compiled function replayed as
            Inductor's CUDA-graph trees (mode="reduce-overhead")
  graphed-conv  PromptDecoder(model, conv_kernels=True): graphed, with the HQ branch's first 3x3
            convolution (+ LayerNorm2d, GELU, the folded tap filters) as the Triton kernel of
            kernels/conv3x3.py instead of cuDNN + Inductor's code (NOTES predictions 20, 23, 28)
  graphed-manual  PromptDecoder(model) (cuda_graphs="manual", the default): the compiled function
            captured by hand in a torch.cuda.CUDAGraph per bucket shape (samhq_fast.graphs.GraphCache),
            what predict_torch runs with the fused backend
The decoder does not depend on the ViT size (vit_dim only enters the per-image HQ features), so
vit_b and vit_h should agree up to noise; both run as a check.

Per (mode, variant, prompt kind, N): first-call time (compiles the bucket shapes this mode has not
seen yet), warm-up time (CUDA-graph capture), then median / p90 of CUDA-event timings of
back-to-back calls rotating 3 prompt sets; prompts/s = N / median. Prompt kinds: "box" (one random
box per prompt, input frame) at every --prompts N, and "point" (one random foreground point) at
--point-prompts N. Single-prompt latency per mode: p50 / p99 over --latency-calls calls of one box,
each timed alone: wall clock from the call to a torch.cuda.synchronize after it, the GPU idle before.
End to end per variant: SamHQPredictor.set_image(random uint8 768x1024 CUDA frame) + predict_torch
of one box, p50 wall-clock latency, eager model vs fused (Triton encoder + graphed decoder): this
INCLUDES THE IMAGE ENCODER.
Numerics: each mode's low-res logits for prompt set 0 vs eager's in the same run (rel L2), and its
first rows vs an fp32 eager decoder; a mode over tolerance gets its figures under invalid_speed.
They are compared with multimask_output=False (mask token 0 + HQ): the multimask pick is an argmax
over predicted IoUs that random weights leave nearly tied, so bf16 noise can flip it to another,
equally right, mask.
Targets from the issue, printed for comparison and not asserted: a single prompt in <= 0.3 ms,
>= 20,000 prompts/s batched.

Order: eager for every variant (the numerics reference), graphed, graphed-conv, end to end, graphed-manual, compiled; the JSON
(and a Markdown table next to it) is rewritten after every configuration; none starts after
--time-budget-s (220 s): those are recorded as skipped. One failing configuration is recorded with
its error and the run goes on. `--smoke` runs a tiny model on the CPU (eager + compiled, prompts
1,4): it tests the script; its timings are not speed figures.
"""

import argparse
import copy
import statistics
import time

import torch

from ..build import build_sam_hq
from ..decoding import PROMPT_BUCKETS, PromptDecoder
from ..fused import KILL_SWITCH, apply_fused_backend, fused_disabled
from ..modeling import SamHQConfig
from ..modeling.sam_hq import decode_eager
from ..predictor import SamHQPredictor
from . import common

MODES = ("eager", "graphed", "graphed-conv", "graphed-manual", "compiled")
# eager first (the numerics reference), then what matters most, so a tight time budget cuts the
# least useful: the default graphs, the Triton convolutions against them, the whole pipeline
# (set_image + 1 prompt), the alternative graphs, and compiled-without-graphs last, a diagnostic
# (what the graphs save).
RUN_ORDER = ("eager", "graphed", "graphed-conv", "e2e", "graphed-manual", "compiled")
E2E_BACKENDS = ("eager", "fused")
# End to end the two backends run different image encoders: correct bf16 encoders differ by up to
# ~2.5e-2 (rel L2, bench_encoder), and that reaches the logits.
E2E_TOL = {torch.bfloat16: 5e-2, torch.float16: 5e-2, torch.float32: 1e-2}
FP32_ROWS = 16  # prompts compared with the fp32 decoder (rows are independent; keeps it cheap at N = 1024)
LATENCY_MAX_S = 15.0  # stop a latency series early after this long
TARGETS = {"single_prompt_ms": 0.3, "prompts_per_s": 20_000}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default=None, help="comma list of box prompts per call N (default 1,16,64,256,1024; smoke: 1,4)")
    p.add_argument("--point-prompts", default="1", help="comma list of N for the one-point-prompt rows ('' for none)")
    p.add_argument("--modes", default=None, help=f"comma list of {','.join(MODES)} (default all; smoke: eager,compiled)")
    p.add_argument("--e2e", default=None, help="end-to-end backends, comma list of eager,fused ('' for none; default both; smoke: eager)")
    p.add_argument("--latency-calls", type=int, default=None, help="single-prompt calls timed per mode (default 200; smoke: 20)")
    p.add_argument("--e2e-calls", type=int, default=None, help="end-to-end calls timed per backend (default 20; smoke: 3)")
    common.add_run_args(p, "decoder", target_s=0.25, time_budget_s=220.0)
    args = p.parse_args(argv)

    smoke = args.smoke
    args.prompt_list = common.comma_list(args.prompts or ("1,4" if smoke else "1,16,64,256,1024"), int)
    args.point_prompt_list = common.comma_list(args.point_prompts, int)
    args.mode_list = common.comma_list(args.modes if args.modes is not None else ("eager,compiled" if smoke else ",".join(MODES)))
    args.e2e_list = common.comma_list(args.e2e if args.e2e is not None else ("eager" if smoke else ",".join(E2E_BACKENDS)))
    for name, given, allowed in (("modes", args.mode_list, MODES), ("e2e backends", args.e2e_list, E2E_BACKENDS)):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            p.error(f"unknown {name} {unknown}; choose from {allowed}")
    if min(args.prompt_list + args.point_prompt_list, default=1) < 1:
        p.error("prompt counts must be >= 1")
    args.latency_calls = args.latency_calls or (20 if smoke else 200)
    args.e2e_calls = args.e2e_calls or (3 if smoke else 20)
    common.finish_run_args(args, "decoder", target_s=0.25)
    return args


# ---------------------------------------------------------------------------------------------
# One image per variant, its prompts, and the decoder modes


def frame_size(config: SamHQConfig) -> tuple[int, int]:
    """(H, W) of the benchmark's landscape frame: 768 x 1024 for a 1024 model (no resize needed)."""
    return 3 * config.img_size // 4, config.img_size


class Image:
    """A variant's random-weight model, one random image's cached features (what set_image stores),
    and an fp32 copy of the prompt encoder + decoder for the numerics truth."""

    def __init__(self, config: SamHQConfig, device, dtype, seed: int, state_dict: dict | None = None):
        torch.manual_seed(seed)
        with torch.device(device):  # random init on the GPU: a CPU init of vit_h takes seconds
            self.model = build_sam_hq(config, device=device, dtype=dtype, backend="eager")
        if state_dict is not None:  # --checkpoint
            self.model.load_state_dict(state_dict, strict=True)
        gen = torch.Generator(device=device).manual_seed(seed)
        image = torch.randint(0, 256, (1, 3, *frame_size(config)), generator=gen, device=device, dtype=torch.uint8)
        with torch.inference_mode():
            self.embeddings, _, self.hq_features = self.model.encode_image(self.model.preprocess(image))
        self.fp32_parts = tuple(copy.deepcopy(m).float() for m in (self.model.prompt_encoder, self.model.mask_decoder))


def eager_decode(prompt_encoder, mask_decoder, embeddings, image_pe, hq_features, coords, labels, boxes, multimask=True):
    """SamHQPredictor.predict_torch's eager branch (hq_token_only=False)."""
    return decode_eager(prompt_encoder, mask_decoder, embeddings, image_pe, hq_features, coords, labels, boxes, None, multimask, False)


def make_prompts(kind: str, num: int, config: SamHQConfig, device, seed: int) -> list[tuple]:
    """Three different sets of `num` prompts, (coords [N, 1, 2], labels [N, 1], None) for "point" or
    (None, None, boxes [N, 4]) for "box", in the input frame of a frame_size image."""
    gen = torch.Generator(device=device).manual_seed(seed + num + (0 if kind == "box" else 100_000))
    h, w = frame_size(config)
    scale = torch.tensor([float(w), float(h)], device=device)
    sets = []
    for _ in range(3):
        if kind == "box":
            corners = torch.rand(num, 2, 2, generator=gen, device=device).sort(dim=1).values * scale  # x1 <= x2, y1 <= y2
            sets.append((None, None, corners.reshape(num, 4)))
        else:
            coords = torch.rand(num, 1, 2, generator=gen, device=device) * scale
            sets.append((coords, torch.ones(num, 1, dtype=torch.int64, device=device), None))
    return sets


TIMED_CALLS = {
    "eager": "model.prompt_encoder + model.mask_decoder (multimask_output=True) on N prompts, one call",
    "compiled": "PromptDecoder(model, cuda_graphs=False)(..., multimask_output=True): pad to the prompt bucket, compiled "
                "decode (chunks of 256 prompts, mask selection inside)",
    "graphed": "PromptDecoder(model, cuda_graphs='trees')(..., multimask_output=True): pad to the prompt bucket, graph "
               "trees' replay (chunks of 256 prompts, mask selection inside), copy out",
    "graphed-conv": "PromptDecoder(model, cuda_graphs='trees', conv_kernels=True)(..., multimask_output=True): as graphed, the HQ "
                    "branch's first 3x3 convolution (+ LayerNorm2d, GELU, the folded tap filters) by kernels/conv3x3.py",
    "graphed-manual": "PromptDecoder(model) (cuda_graphs='manual', the default)(..., multimask_output=True): pad to the prompt "
                      "bucket, copy into the graph's static inputs, torch.cuda.CUDAGraph replay (chunks of 256, mask selection "
                      "inside), copy out",
}


def decoder_fn(mode: str, image: Image):
    """fn(coords, labels, boxes) -> (low-res logits [N, 1, 4G, 4G], scores [N, 1]) for a mode."""
    model, embeddings, hq_features = image.model, image.embeddings, image.hq_features
    if mode == "eager":
        image_pe = model.prompt_encoder.get_dense_pe()  # once, as SamHQPredictor.set_image does
        return lambda coords, labels, boxes, multimask=True: eager_decode(
            model.prompt_encoder, model.mask_decoder, embeddings, image_pe, hq_features, coords, labels, boxes, multimask)
    # Each PromptDecoder compiles the same lambda code object: start from clean Dynamo caches (and
    # CUDA-graph trees) so the decoders of earlier modes / variants do not count toward the recompile
    # limit. On-disk Inductor / Triton caches stay: first calls may be faster after the first mode.
    torch._dynamo.reset()
    graphs = {"compiled": False, "graphed": "trees", "graphed-conv": "trees", "graphed-manual": "manual"}[mode]
    decoder = PromptDecoder(model, cuda_graphs=graphs, conv_kernels=mode == "graphed-conv")
    return lambda coords, labels, boxes, multimask=True: decoder(embeddings, hq_features, coords, labels, boxes, None, multimask, False)


# ---------------------------------------------------------------------------------------------
# Numerics


class References:
    """Per (variant, kind, N), on prompt set 0: eager's low-res logits (the run dtype, all rows), the
    fp32 eager decoder's on the first FP32_ROWS rows (the truth), and eager's own error vs that."""

    def __init__(self):
        self.eager, self.fp32, self.eager_err_fp32 = {}, {}, {}

    def fp32_for(self, key, image: Image, arg_set: tuple) -> torch.Tensor:
        if key not in self.fp32:
            coords, labels, boxes = (None if t is None else t[:FP32_ROWS] for t in arg_set)
            coords = None if coords is None else coords.float()
            with torch.inference_mode():
                prompt_encoder, mask_decoder = image.fp32_parts
                self.fp32[key] = eager_decode(prompt_encoder, mask_decoder, image.embeddings.float(), prompt_encoder.get_dense_pe(),
                                              image.hq_features.float(), coords, labels, boxes, multimask=False)[0]
        return self.fp32[key]


def numerics_logits(fn, arg_set: tuple) -> torch.Tensor:
    """fn's low-res logits with multimask_output=False (mask token 0 + HQ, no IoU argmax), copied out."""
    with torch.inference_mode():
        return fn(*arg_set, multimask=False)[0].detach().clone()


def check_numerics(fn, refs: References, key, mode: str, image: Image, arg_set: tuple, tol: float) -> dict:
    logits = numerics_logits(fn, arg_set)
    fp32 = refs.fp32_for(key, image, arg_set)
    eager = refs.eager.get(key)
    err_eager = common.rel_l2(logits, eager) if eager is not None and mode != "eager" else None
    err_fp32 = common.rel_l2(logits[: fp32.shape[0]], fp32)
    noise = err_fp32 if mode == "eager" else refs.eager_err_fp32.get(key)
    if mode == "eager":
        refs.eager[key], refs.eager_err_fp32[key] = logits, err_fp32
    ok, why = common.numerics_verdict(mode == "eager", err_eager, err_fp32, noise, tol, common.FP32_SLACK)
    numerics = {"tol": tol, "compared": f"low-res logits of prompt set 0 (vs fp32: first {fp32.shape[0]} prompts)",
                "rel_l2_vs_eager": err_eager, "rel_l2_vs_fp32": err_fp32, "eager_rel_l2_vs_fp32": noise, "verdict": why}
    return {"numerics": numerics, "numerics_ok": ok}


# ---------------------------------------------------------------------------------------------
# Measurements


def run_throughput(fn, image: Image, mode, variant, kind, num, config, device, dtype, args, refs) -> dict:
    arg_sets = make_prompts(kind, num, config, device, args.seed)
    with torch.inference_mode():
        result, _ = common.measure(fn, arg_sets, device, args, keep=lambda out: None)
    result.update(check_numerics(fn, refs, (variant, kind, num), mode, image, arg_sets[0], common.NUMERICS_TOL[dtype]))
    timing = result.pop("timing")
    common.file_speed(result, {**timing, "prompts_per_s": 1e3 * num / timing["median_ms"], "us_per_prompt": 1e3 * timing["median_ms"] / num})
    return result


def measure_latency(fn, arg_sets, device, args, calls: int) -> dict:
    """First call and warm-up as `measure`, then `calls` calls each timed alone (common.wall_latencies)."""
    first_call_s, _ = common.first_call(fn, arg_sets[0], device, keep=lambda out: None)
    result = {"first_call_s": first_call_s, "warmup_s": common.warm_up(fn, arg_sets, args.warmup, device)}
    common.reset_peak_memory(device)
    times, host_times = common.wall_latencies(fn, common.rotation(arg_sets, calls), device, max_s=LATENCY_MAX_S)
    stats = common.timing_summary(times)
    result["latency"] = {"p50_ms": stats["median_ms"], **stats, "host_p50_ms": statistics.median(host_times)}
    common.record_peak_memory(result, device)
    return result


def run_latency(fn, image: Image, mode, variant, config, device, dtype, args, refs) -> dict:
    arg_sets = make_prompts("box", 1, config, device, args.seed)  # the N = 1 box row's prompts
    with torch.inference_mode():
        result = measure_latency(fn, arg_sets, device, args, args.latency_calls)
    result.update(check_numerics(fn, refs, (variant, "box", 1), mode, image, arg_sets[0], common.NUMERICS_TOL[dtype]))
    common.file_speed(result, result.pop("latency"))
    return result


def e2e_call(backend: str, image: Image, config, device, seed: int) -> tuple:
    """-> (fn, arg_sets): fn(frame, box, multimask=True) = set_image(frame) + predict_torch(one box)
    through SamHQPredictor -> (low-res logits, masks, scores), and three (uint8 frame [H, W, 3], box
    [1, 4]) arg sets on the device. The fused backend swaps the model's encoder blocks in place (same
    weights): run it after eager."""
    model = apply_fused_backend(image.model) if backend == "fused" else image.model
    torch._dynamo.reset()
    predictor = SamHQPredictor(model)
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    frames = [torch.randint(0, 256, (*frame_size(config), 3), generator=gen, device=device, dtype=torch.uint8) for _ in range(3)]
    boxes = [b for _, _, b in make_prompts("box", 1, config, device, seed)]

    def fn(frame, box, multimask=True):
        predictor.set_image(frame)
        masks, scores, low_res = predictor.predict_torch(None, None, box, multimask_output=multimask)
        return low_res, masks, scores

    return fn, list(zip(frames, boxes))


def run_e2e(backend: str, image: Image, config, device, dtype, args, reference: dict) -> dict:
    """End-to-end latency of e2e_call, with its numerics against eager's (run first)."""
    fn, arg_sets = e2e_call(backend, image, config, device, args.seed)
    result = measure_latency(fn, arg_sets, device, args, args.e2e_calls)
    logits = numerics_logits(fn, arg_sets[0])
    tol = E2E_TOL[dtype]
    if backend == "eager":
        reference["logits"] = logits
        err, ok, why = None, True, "the reference"
    elif "logits" in reference:
        err = common.rel_l2(logits, reference["logits"])
        ok = bool(err <= tol)
        why = f"rel L2 vs eager {'<=' if ok else '>'} {tol:g} (whole model: the encoders differ too)"
    else:
        err, ok, why = None, None, "no reference to compare with"
    result.update(numerics={"tol": tol, "compared": "low-res logits of frame 0", "rel_l2_vs_eager": err, "verdict": why},
                  numerics_ok=ok)
    common.file_speed(result, result.pop("latency"))
    return result


def run_e2e_backends(variant, image, config, device, dtype, args, start, record) -> None:
    """End to end for each backend asked for, eager first (the numerics reference)."""
    reference = {}
    for backend in (b for b in E2E_BACKENDS if b in args.e2e_list):
        entry = {"test": "e2e", "variant": variant, "backend": backend, "prompt": "box", "prompts": 1, "dtype": args.dtype,
                 "timed_call": "predictor.set_image(frame) + predictor.predict_torch(None, None, box); wall clock per call"}
        if backend == "fused" and fused_disabled():  # the model would stay eager: not a fused figure
            record({**entry, "status": "skipped", "reason": f"{KILL_SWITCH} is set"})
            continue

        def work():
            if isinstance(image, Exception):
                raise RuntimeError(f"preparing the variant: {type(image).__name__}: {image}")
            return run_e2e(backend, image, config, device, dtype, args, reference)

        record(guarded(entry, start, args, device, work))


def guarded(entry: dict, start: float, args, device, work) -> dict:
    """entry + work()'s fields; skipped past the time budget, an error recorded (not raised)."""
    elapsed = time.perf_counter() - start
    if elapsed > args.time_budget_s:
        return {**entry, "status": "skipped", "reason": f"time budget: {elapsed:.0f} s of {args.time_budget_s:.0f} s used"}
    what = f"{entry['test']} {entry['variant']} {entry.get('mode', entry.get('backend'))} {entry['prompts']} {entry['prompt']}"
    print(f"[bench] {elapsed:6.0f}s  {what} ...", flush=True)
    try:
        return {**entry, **work(), "status": "ok"}
    except Exception as e:  # noqa: BLE001 - one failing configuration must not stop the run
        return {**entry, **common.error_fields(e)}
    finally:
        common.free_memory(device)


def run_mode(mode, variant, image, config, device, dtype, args, refs, start, record) -> None:
    """Every throughput row of one (mode, variant), then its single-prompt latency, one decoder."""
    rows = [("box", n) for n in args.prompt_list] + [("point", n) for n in args.point_prompt_list]
    fn, build_error = None, None
    if isinstance(image, Exception):
        build_error = f"preparing the variant: {type(image).__name__}: {image}"
    elif time.perf_counter() - start <= args.time_budget_s:
        try:
            fn = decoder_fn(mode, image)
        except Exception as e:  # noqa: BLE001 - recorded for every row of this mode
            build_error = f"building the {mode} decoder: {type(e).__name__}: {e}"

    def work(measure_fn, *rest):
        if build_error is not None:
            raise RuntimeError(build_error)
        return measure_fn(fn, image, mode, variant, *rest)

    for kind, num in rows:
        entry = {"test": "throughput", "variant": variant, "mode": mode, "prompt": kind, "prompts": num,
                 "dtype": args.dtype, "timed_call": TIMED_CALLS[mode]}
        record(guarded(entry, start, args, device,
                       lambda: work(run_throughput, kind, num, config, device, dtype, args, refs)))
    entry = {"test": "latency", "variant": variant, "mode": mode, "prompt": "box", "prompts": 1, "dtype": args.dtype,
             "timed_call": TIMED_CALLS[mode] + "; wall clock per call, synchronized"}
    record(guarded(entry, start, args, device, lambda: work(run_latency, config, device, dtype, args, refs)))


# ---------------------------------------------------------------------------------------------
# Reporting


def finalize(report: dict) -> None:
    """Speedups vs eager in the same run, and the best figures next to the issue's targets."""
    def key(r):
        return (r["test"], r["variant"], r["prompt"], r["prompts"])

    eager = {key(r): r["speed"] for r in report["results"] if r.get("mode", r.get("backend")) == "eager" and "speed" in r}
    for r in report["results"]:
        base = eager.get(key(r))
        for field in ("speed", "invalid_speed"):
            if base is not None and field in r:
                stat = "median_ms" if r["test"] == "throughput" else "p50_ms"
                r[field]["speedup_vs_eager"] = base[stat] / r[field][stat]
    best = {}
    for r in report["results"]:
        s = r.get("speed")
        if s is None or r["test"] == "e2e":
            continue
        b = best.setdefault(r["variant"], {})
        if r["test"] == "throughput" and s["prompts_per_s"] > b.get("prompts_per_s", 0):
            b.update(prompts_per_s=s["prompts_per_s"], prompts_per_s_at=f"{r['mode']}, {r['prompts']} {r['prompt']} prompts")
        if r["test"] == "latency" and s["p50_ms"] < b.get("single_prompt_p50_ms", float("inf")):
            b.update(single_prompt_p50_ms=s["p50_ms"], single_prompt_p99_ms=s["p99_ms"], single_prompt_mode=r["mode"])
    for b in best.values():
        b["meets_prompts_per_s"] = b["prompts_per_s"] >= TARGETS["prompts_per_s"] if "prompts_per_s" in b else None
        b["meets_single_prompt"] = b["single_prompt_p50_ms"] <= TARGETS["single_prompt_ms"] if "single_prompt_p50_ms" in b else None
    report["targets"] = {"from_the_issue": TARGETS, "checked": "no (printed for comparison)", "best_valid": best}


def _errors(r: dict) -> str:
    num = r.get("numerics", {})
    eager = "ref" if r.get("mode", r.get("backend")) == "eager" else common.fmt(num.get("rel_l2_vs_eager"), ".1e")
    return f"{eager} / {common.fmt(num.get('rel_l2_vs_fp32'), '.1e')}"


def markdown_table(report: dict) -> str:
    t = report.get("targets", {})
    lines = common.markdown_head(report) + [
        "Decoder only: the image embeddings and HQ features are computed once per image and are not timed. "
        f"Targets (issue, not checked): single prompt <= {TARGETS['single_prompt_ms']} ms, >= {TARGETS['prompts_per_s']:,} prompts/s batched.",
        "",
    ]
    for variant, b in t.get("best_valid", {}).items():
        lines.append(f"- {variant}: best {common.fmt(b.get('prompts_per_s'), ',.0f')} prompts/s ({b.get('prompts_per_s_at', '-')}; "
                     f"target met: {b.get('meets_prompts_per_s')}), best single-prompt p50 {common.fmt(b.get('single_prompt_p50_ms'), '.3f')} ms "
                     f"({b.get('single_prompt_mode', '-')}; target met: {b.get('meets_single_prompt')})")
    lines += ["", "Throughput (CUDA events, back-to-back calls, median):", "",
              "| variant | mode | prompt | N | ms/call | prompts/s | us/prompt | speedup | rel L2 vs eager / fp32 | first call s | warm-up s | peak GB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in report["results"] if r["test"] == "throughput"):
        head = f"| {r['variant']} | {r['mode']} | {r['prompt']} | {r['prompts']} |"
        lines.append(common.table_row(head, r, 8, lambda s: [
            f"{s['median_ms']:.3f}", f"{s['prompts_per_s']:,.0f}", f"{s['us_per_prompt']:.1f}", common.fmt(s.get("speedup_vs_eager"), ".2f"),
            _errors(r), f"{r['first_call_s']:.2f}", f"{r['warmup_s']:.2f}", common.fmt(r.get("peak_memory_gb"), ".1f")]))
    h, w = next(iter(report["settings"]["frame_hw"].values()), (0, 0))
    lines += ["", "Single-prompt latency (one box; wall clock per call, synchronized) and end to end "
              f"(set_image of a {h}x{w} uint8 frame + predict_torch of one box: INCLUDES THE IMAGE ENCODER):", "",
              "| variant | test | mode / backend | p50 ms | p99 ms | host p50 ms | calls | speedup | rel L2 vs eager / fp32 | first call s | peak GB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in report["results"] if r["test"] != "throughput"):
        head = f"| {r['variant']} | {r['test']} | {r.get('mode', r.get('backend'))} |"
        lines.append(common.table_row(head, r, 8, lambda s: [
            f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}", common.fmt(s.get("host_p50_ms"), ".3f"), str(s["repeats"]),
            common.fmt(s.get("speedup_vs_eager"), ".2f"),
            _errors(r), f"{r['first_call_s']:.2f}", common.fmt(r.get("peak_memory_gb"), ".1f")]))
    return "\n".join(lines) + "\n"


def summary(entry: dict) -> str:
    if entry["status"] != "ok":
        return f"{entry['status']}: {common.first_line(entry, 200)}"
    s = entry.get("speed") or entry["invalid_speed"]
    err = entry["numerics"].get("rel_l2_vs_eager")
    figures = (f"{s['median_ms']:.3f} ms, {s['prompts_per_s']:,.0f} prompts/s" if entry["test"] == "throughput"
               else f"p50 {s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms over {s['repeats']} calls")
    return (f"{figures}, first call {entry['first_call_s']:.2f} s" + ("" if err is None else f", rel L2 vs eager {err:.1e}")
            + ("" if "speed" in entry else "  NUMERICS FAILED"))


def method_notes(args, dtype) -> dict:
    return {
        "weights": "random: build_sam_hq (PyTorch default init of the real architecture); speed does not depend on weight values",
        "image": "one random uint8 frame (3/4 img_size x img_size: 768x1024) per variant through model.preprocess + model.encode_image "
                 "(what set_image does); its embeddings and HQ features are computed ONCE and are not timed (the HQ "
                 "features are the only place vit_dim enters the decoder, so vit_b and vit_h decoders cost the same)",
        "prompts": f"3 random prompt sets per (kind, N), in the input frame, rotated through the timed calls: 'box' = one box "
                   f"per prompt; 'point' = one foreground point per prompt (N in {args.point_prompt_list}). PromptDecoder pads "
                   f"N to its buckets {PROMPT_BUCKETS} (chunks of {PROMPT_BUCKETS[-1]} beyond)",
        "timed_call": "decoder only, multimask_output=True, hq_token_only=False, -> low-res logits [N, 1, 4G, 4G] + scores; "
                      "no postprocess_masks. eager: prompt_encoder + mask_decoder as predict_torch's eager branch; compiled: "
                      "PromptDecoder(model, cuda_graphs=False); graphed: CUDA-graph trees; graphed-manual: hand-captured CUDA graphs (the default)",
        "throughput": f"first call timed apart (compiles the bucket shapes not yet compiled in this mode and variant; on-disk "
                      f"Inductor/Triton caches from earlier modes may shorten it), {args.warmup} warm-up calls timed together "
                      f"(warmup_s: CUDA-graph capture happens there), then >= {args.min_repeats} back-to-back calls (about "
                      f"{args.target_s} s, at most {args.max_repeats}) with CUDA events around each; median and p90; "
                      "prompts_per_s = N / median",
        "latency": f"one box prompt, {args.latency_calls} calls each timed alone: torch.cuda.synchronize, wall clock around "
                   "the call and a synchronize after it (CPU launch work + GPU time + the sync, GPU idle before); p50 / p99; "
                   "host_p50_ms: the same calls until they returned, before the synchronize (the host's part)",
        "e2e": f"SamHQPredictor.set_image(random uint8 768x1024 HWC frame on the device, 3 rotated) + predict_torch(one box) incl. postprocess_masks, {args.e2e_calls} calls timed as "
               "'latency'. INCLUDES THE IMAGE ENCODER. eager: the eager model; fused: the same weights with the Triton "
               "encoder blocks (apply_fused_backend) and the graphed PromptDecoder",
        "numerics": f"multimask_output=False (mask token 0 + HQ: no argmax over near-tied random-weight IoUs, which bf16 noise "
                    f"can flip to another mask); rel L2 of the low-res logits of prompt set 0 vs eager in the same dtype (all N rows) and vs an fp32 eager "
                    f"decoder on the same embeddings (first {FP32_ROWS} rows). numerics_ok: vs-eager <= {common.NUMERICS_TOL[dtype]:g}, "
                    f"or else vs-fp32 <= max(tol, {common.FP32_SLACK} x eager's own vs-fp32 error). e2e: vs eager e2e <= "
                    f"{E2E_TOL[dtype]:g} (different encoders). numerics_ok false -> figures under 'invalid_speed', not 'speed'.",
        "peak_memory_gb": "torch.cuda.max_memory_allocated over a throughput, latency or e2e config (both variants' weights and features, the "
                          "eager reference logits, prompts, activations) during the timed calls, reset after the warm-up (autotune / "
                          "compile allocations are not counted)",
    }


def prepare(variant, config, device, dtype, args) -> "Image | Exception":
    try:
        return Image(config, device, dtype, args.seed, common.checkpoint_state_dict(args))
    except Exception as e:  # noqa: BLE001 - every row of the variant reports it
        common.free_memory(device)
        return e


def main(argv=None, **overrides) -> dict:
    """Run the benchmark on argv (its command line); returns the report. overrides: see common.run_setup."""
    args = parse_args(argv)
    start = time.perf_counter()
    device, dtype, configs, out = common.run_setup(args, overrides)
    settings = {"variants": args.variant_list, "prompts": args.prompt_list, "point_prompts": args.point_prompt_list,
                "modes": args.mode_list, "e2e": args.e2e_list, "latency_calls": args.latency_calls, "e2e_calls": args.e2e_calls,
                "frame_hw": {v: frame_size(c) for v, c in configs.items()}}
    report = {**common.new_report(args, argv, device, settings, method_notes(args, dtype)), "results": []}
    print(f"[bench] {report['machine'].get('gpu') or 'CPU (smoke)'}, torch {torch.__version__}, dtype {args.dtype}", flush=True)
    record = common.make_recorder(report, out, finalize, markdown_table, summary)

    images = {v: prepare(v, c, device, dtype, args) for v, c in configs.items()}
    refs = References()
    for step in RUN_ORDER:
        for variant, config in configs.items():
            if step == "e2e":
                run_e2e_backends(variant, images[variant], config, device, dtype, args, start, record)
            elif step in args.mode_list:
                run_mode(step, variant, images[variant], config, device, dtype, args, refs, start, record)
    return common.finish(report, out, start, finalize, markdown_table)


if __name__ == "__main__":
    main()
