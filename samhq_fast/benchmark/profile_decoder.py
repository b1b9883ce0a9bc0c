"""Kernel-level profile of one prompt-decoder call, eager vs compiled: where the decoder's GPU time goes.

    python -m samhq_fast.benchmark.profile_decoder --prompts 1,64,256 --dtype bf16 --output decoder-profile.md

The decoder is the same network for every variant (random weights, vit_h's model; its image inputs
are one random image's embeddings and HQ features, as set_image stores them). It decodes N box
prompts with multimask_output=True, in each mode:
  eager     prompt encoder + HQ mask decoder, as SamHQPredictor.predict_torch's eager branch;
  compiled  PromptDecoder(model, cuda_graphs=False): the padded function the fused backend's CUDA
            graphs record, so its kernels and their GPU times are the graphs', without the replay;
  compiled-conv  the same with conv_kernels=True: the HQ branch's first 3x3 convolution (+ LayerNorm2d
            + GELU, projected by the folded last convolution's tap filters) by kernels/conv3x3.py
            (only where the Triton kernels run: a CUDA GPU, or the interpreter).
Per kernel: launches and GPU time per call, and its share of the call's GPU time. Each section's
title also gives the wall-clock time per call (synchronized): above the GPU time by the host's
launch work, which a CUDA graph replay removes (the graphed decoder's own wall time is in the
decoder benchmark). On a CPU-only machine (--smoke: the tiny model, compiled with Dynamo's "eager"
backend) it profiles CPU ops and says so: not a speed figure.
"""

import argparse
import time

import torch

from ..build import SHORT_DTYPE_NAMES
from ..decoding import PromptDecoder
from ..fused import fused_available
from ..modeling.sam_hq import SamHQConfig
from . import common
from .decoder import Image, eager_decode, make_prompts
from .profile_block import markdown, profile_calls, profile_setup


def decoder_calls(image: Image, smoke: bool) -> dict:
    """{mode: fn(prompts)} for prompts = (coords, labels, boxes) in the input frame."""
    model = image.model
    image_pe = model.prompt_encoder.get_dense_pe()  # once, as set_image does for the eager branch
    torch._dynamo.reset()  # a fresh compile: earlier runs' variants do not count toward Dynamo's limits
    backend = "eager" if smoke else "inductor"
    decoders = {"compiled": PromptDecoder(model, cuda_graphs=False, backend=backend)}
    if fused_available(model.device, model.dtype)[0]:
        decoders["compiled-conv"] = PromptDecoder(model, cuda_graphs=False, backend=backend, conv_kernels=True)
    calls = {"eager": lambda prompts: eager_decode(model.prompt_encoder, model.mask_decoder, image.embeddings, image_pe,
                                                   image.hq_features, *prompts)}
    for mode, decoder in decoders.items():
        calls[mode] = lambda prompts, decoder=decoder: decoder(image.embeddings, image.hq_features, *prompts, None, True, False)
    return calls


def wall_ms(fn, repeats: int, device: torch.device) -> float:
    """Mean wall-clock milliseconds of fn() over `repeats` back-to-back calls, synchronized at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - start) / repeats


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="1,64,256", help="comma list of box prompts per call")
    p.add_argument("--dtype", default="bf16", choices=SHORT_DTYPE_NAMES)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="the tiny model on the CPU (checks the tool; not a speed figure)")
    p.add_argument("--output", default=None, help="write the Markdown here (default: print it)")
    args = p.parse_args(argv)
    args.prompt_counts = common.comma_list(args.prompts, int)
    if not args.prompt_counts or min(args.prompt_counts) < 1:
        p.error(f"--prompts must list prompt counts >= 1, got {args.prompts!r}")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    title = f"One prompt-decoder call, kernel by kernel: {'smoke (tiny model)' if args.smoke else 'vit_h'}"
    device, dtype, header = profile_setup(args, title, "call", details="box prompts, multimask_output=True; ")
    header[-1] += "; wall: synchronized wall clock per call, back to back"
    config = common.SMOKE_CONFIG if args.smoke else SamHQConfig.from_variant("vit_h")
    image = Image(config, device, dtype, args.seed)
    results, walls = {}, {}
    with torch.inference_mode():
        calls = decoder_calls(image, args.smoke)
        for count in args.prompt_counts:
            prompts = make_prompts("box", count, config, device, args.seed)[0]
            results[count] = {mode: profile_calls(lambda _, fn=fn: fn(prompts), image.embeddings, args.repeats) for mode, fn in calls.items()}
            walls[count] = {mode: wall_ms(lambda fn=fn: fn(prompts), args.repeats, device) for mode, fn in calls.items()}
            text = markdown(results, header, section=lambda n: f"{n} box prompts (wall ms per call: "
                            + ", ".join(f"{mode} {ms:.3f}" for mode, ms in walls[n].items()) + ")")
            if args.output:  # after every prompt count: a run cut by a time limit keeps what it finished
                with open(args.output, "w") as f:
                    f.write(text)
    if not args.output:
        print(text)
    return text


if __name__ == "__main__":
    main()
