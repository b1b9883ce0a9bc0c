"""Kernel-level profile of one ViT block, eager vs fused: which kernels run and how long each takes.

    python -m samhq_fast.benchmark.profile_block --variant vit_h --batch 1,8 --dtype bf16 --output block-profile.md

For a windowed block and a global block of the variant (random weights), each backend's block runs
--repeats times under torch.profiler after a warm-up (Triton compiles and autotuning happen there);
per kernel: launches and GPU time per block call, and its share of the block. The "before / after"
of the fused backend, kernel by kernel. On a CPU-only machine (--smoke: a tiny block) it profiles
CPU ops instead (fused only under TRITON_INTERPRET=1) and says so: not a speed figure.
"""

import argparse
import copy
import datetime

import torch
from torch.profiler import ProfilerActivity, profile

from ..build import SHORT_DTYPE_NAMES, resolve_dtype
from ..fused import FusedBlock, fused_available
from ..modeling.image_encoder import Block, ViTConfig
from ..modeling.sam_hq import VARIANTS
from . import common

def make_blocks(config: ViTConfig, device, dtype) -> dict[str, Block]:
    """One windowed and one global block with PyTorch's random init (timing does not depend on values)."""
    blocks = {}
    for kind, window in (("windowed", config.window_size), ("global", 0)):
        block = Block(config.embed_dim, config.num_heads, config.mlp_dim, window, config.grid_size)
        blocks[kind] = block.to(device=device, dtype=dtype).eval()
    return blocks


def profile_calls(fn, x: torch.Tensor, repeats: int) -> list[dict]:
    """-> per kernel (CUDA) or leaf op (CPU): name, launches and microseconds per call of fn, sorted."""
    on_cuda = x.is_cuda
    for _ in range(3):
        fn(x)
    if on_cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn(x)
        if on_cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if us > 0 and not (on_cuda and event.device_type == torch.autograd.DeviceType.CPU):
            rows.append({"name": event.key, "launches": event.count / repeats, "us": us / repeats})
    return sorted(rows, key=lambda r: -r["us"])


def profile_setup(args, title: str, per_call: str, details: str = "") -> tuple[torch.device, torch.dtype, list[str]]:
    """(device, dtype, Markdown header) of a profile run: CUDA in args.dtype, or the CPU in fp32 for
    --smoke (or without CUDA), labelled not a speed figure. title gets the dtype appended; per_call
    names what one profiled call is; details go before the repeat count."""
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.smoke else resolve_dtype(args.dtype)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU: NOT A SPEED FIGURE (op times of the CPU)"
    header = [
        f"# {title}, {str(dtype).removeprefix('torch.')}",
        "",
        f"{machine}; torch {torch.__version__}; {datetime.date.today().isoformat()}; random weights; {details}"
        f"{args.repeats} calls profiled after 3 warm-up calls; times are "
        + ("GPU kernel time per " if device.type == "cuda" else "CPU op time per ") + per_call,
    ]
    return device, dtype, header


def markdown(results: dict, header: list[str], section=lambda key: "{} block, batch {}".format(*key)) -> str:
    """results {key: {backend: profile_calls rows}} -> a Markdown section per key (titled section(key)),
    a kernel table per backend."""
    lines = [*header, ""]
    for key, backends in results.items():
        totals = {b: sum(r["us"] for r in rows) for b, rows in backends.items()}
        lines += [f"## {section(key)}: " + ", ".join(f"{b} {t:.1f} us" for b, t in totals.items()), ""]
        for backend, rows in backends.items():
            lines += [f"### {backend}", "", "| kernel | launches / call | us / call | share |", "|---|---:|---:|---:|"]
            for r in rows:
                name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
                lines.append(f"| `{name}` | {r['launches']:g} | {r['us']:.1f} | {100 * r['us'] / totals[backend]:.1f}% |")
            lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_h", choices=sorted(VARIANTS))
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--dtype", default="bf16", choices=SHORT_DTYPE_NAMES)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="a tiny block on the CPU (checks the tool; not a speed figure)")
    p.add_argument("--output", default=None, help="write the Markdown here (default: print it)")
    args = p.parse_args(argv)
    args.batches = common.comma_list(args.batch, int)
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    title = f"One ViT block, kernel by kernel: {'smoke (tiny block)' if args.smoke else args.variant}"
    device, dtype, header = profile_setup(args, title, "block call")
    config = common.SMOKE_CONFIG.encoder if args.smoke else VARIANTS[args.variant]
    fused_ok, why_not = fused_available(device, dtype)
    if not fused_ok:
        header[-1] += f"; fused not run ({why_not})"
    results = {}
    with torch.inference_mode():
        for kind, block in make_blocks(config, device, dtype).items():
            backends = {"eager": block}
            if fused_ok:
                backends["fused"] = FusedBlock(copy.deepcopy(block))
            for batch in args.batches:
                x = torch.randn(batch, config.grid_size, config.grid_size, config.embed_dim, device=device, dtype=dtype)
                results[(kind, batch)] = {name: profile_calls(fn, x, args.repeats) for name, fn in backends.items()}
                if args.output:  # after every profile: a run cut by a time limit keeps what it finished
                    with open(args.output, "w") as f:
                        f.write(markdown(results, header))
    text = markdown(results, header)
    if not args.output:
        print(text)
    return text


if __name__ == "__main__":
    main()
