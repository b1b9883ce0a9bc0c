"""Registers, register spills, shared memory and tensor-core instructions of every kernel config,
compiled offline (no GPU).

    python -m samhq_fast.benchmark.kernel_resources [--arch 90]

Each Triton kernel's launcher runs on meta tensors of real vit_b / vit_h block shapes with a
recorder in place of the kernel; the recorded launch (arguments, constexprs, config) is compiled for
the target (sm_90: Hopper) with the specializations Triton applies to a real launch (16-byte aligned
pointers, integers equal to 1 or divisible by 16), and `cuobjdump -res-usage` (bundled with Triton)
reads the cubin. A candidate over the shared-memory limit cannot launch; one with a stack (spilled
registers) is usually slow; a 16-bit one whose dots compile to Ampere's mma.sync instead of
Hopper's asynchronous warpgroup MMA (wgmma, counted in the PTX) leaves much of an H100 / H200's
tensor-core rate unused; an fp32 one on the tensor cores must split its operands for "tf32x3"
(`cvt.rna.tf32.f32`, counted in the PTX), or its dots would round to TF32. This checks resources, not speed: timings need the GPU (`bench/`).
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from ..kernels import attention, conv3x3, fused_linear, layer_norm
from ..modeling.sam_hq import VARIANTS

SHARED_MEMORY_LIMIT = {90: 232448}  # bytes per block: Hopper's 227 KiB opt-in maximum
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
SHAPE_VARIANTS = ("vit_b", "vit_h")  # head_dim 64 and 80, the two the kernels must handle (vit_l: 64)


@dataclass
class Usage:
    registers: int
    stack_bytes: int  # local memory per thread: spilled registers
    shared_bytes: int
    wgmma: int  # wgmma.mma_async instructions in the PTX (Hopper tensor cores; 0 on other targets)
    tf32_splits: int  # cvt.rna.tf32.f32 instructions in the PTX: fp32 operands split for "tf32x3" dots


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records instead of running."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


@contextlib.contextmanager
def recorded_launches(module, *kernel_names: str):
    """Swaps the named kernels of `module` for recorders (yielded as a list, in that order)."""
    saved = {name: getattr(module, name) for name in kernel_names}
    interpreting = module.interpreting
    recorders = [_LaunchRecorder() for _ in kernel_names]
    for name, recorder in zip(kernel_names, recorders):
        setattr(module, name, recorder)
    module.interpreting = lambda *_: False  # meta tensors: neither CUDA nor the interpreter
    try:
        yield recorders
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
        module.interpreting = interpreting


def _signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) for ASTSource, as Triton specializes a real launch."""
    options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
    constexprs = {k: v for k, v in kwargs.items() if k not in options}
    signature, attrs = {}, {}
    for i, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, TensorDescriptor):  # a TMA descriptor: its element type and block shape
            signature[name] = f"tensordesc<{_POINTER_TYPES[value.base.dtype][1:]}{list(value.block_shape)}>"
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh allocations: 16-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constexprs, attrs, options


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def available() -> bool:
    return os.path.exists(_cuobjdump())


def compile_usage(kernel, args: tuple, kwargs: dict, arch: int = 90) -> Usage:
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("kernel_resources compiles real kernels: run it without TRITON_INTERPRET=1")
    signature, constexprs, attrs, options = _signature(kernel, args, kwargs)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK):(\d+)", report))
    ptx = compiled.asm["ptx"]
    wgmma, tf32_splits = len(re.findall(r"\bwgmma\.mma_async\b", ptx)), len(re.findall(r"\bcvt\.rna\.tf32\.f32\b", ptx))
    return Usage(int(fields["REG"]), int(fields["STACK"]), compiled.metadata.shared, wgmma, tf32_splits)


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def attention_shapes(dtype: torch.dtype):
    """(label, qkv, qkv_bias, rel-pos table, heads, window) of the windowed and global blocks of each variant."""
    for variant in SHAPE_VARIANTS:
        vit = VARIANTS[variant]
        qkv, qkv_bias = _meta(1, vit.grid_size, vit.grid_size, 3 * vit.embed_dim, dtype=dtype), _meta(3 * vit.embed_dim, dtype=dtype)
        for kind, window in ((f"window{vit.window_size}", vit.window_size), ("global", 0)):
            table = _meta(2 * (window or vit.grid_size) - 1, vit.head_dim, dtype=dtype)  # rel_pos_h = rel_pos_w
            yield f"{variant} {kind}", qkv, qkv_bias, table, vit.num_heads, window


def attention_launches(dtype: torch.dtype) -> list[tuple[str, dict, tuple, dict]]:
    """(shape label, config, args, kwargs) of every attention candidate at real windowed / global blocks.

    Windowed blocks over SAM's grid (windows pass it) launch twice, labelled "interior" and "border":
    only the border windows' kernel scores padded keys."""
    launches = []
    for label, qkv, qkv_bias, table, heads, window in attention_shapes(dtype):
        for config in attention.candidate_configs(dtype, global_block=window == 0):
            with recorded_launches(attention, "_rel_pos_attention_kernel", "_rel_pos_terms_kernel") as (rec, _):
                attention.rel_pos_attention(qkv, qkv_bias, table, table, heads, window, config)
            for args, kwargs in rec.launches:
                part = "" if len(rec.launches) == 1 else " border" if kwargs["PADDED_GRID"] else " interior"
                launches.append((label + part, config, args, kwargs))
    return launches


def rel_pos_terms_launches(dtype: torch.dtype) -> list[tuple[str, dict, tuple, dict]]:
    """(shape label, config, args, kwargs) of the rel-pos pre-pass (fixed config: rows, then columns)."""
    launches = []
    for label, qkv, _, table, heads, window in attention_shapes(dtype):
        win = window or qkv.shape[1]
        with recorded_launches(attention, "_rel_pos_terms_kernel") as (rec,):
            attention.rel_pos_terms(qkv, table, table, heads, (win, win))
        for axis, (args, kwargs) in zip(("rows", "columns"), rec.launches):
            launches.append((f"{label} {axis}", dict(BLOCK_RUN=kwargs["BLOCK_RUN"], num_warps=kwargs["num_warps"]), args, kwargs))
    return launches


def linear_launches(dtype: torch.dtype) -> list[tuple[str, dict, tuple, dict]]:
    """(shape label, config, args, kwargs) of every Triton GEMM candidate at vit_h's four block GEMMs."""
    launches, vit = [], VARIANTS["vit_h"]
    tokens, dim = vit.grid_size ** 2, vit.embed_dim
    gemms = (("qkv", 3 * dim, dim, "none", False), ("proj", dim, dim, "none", True),
             ("lin1", vit.mlp_dim, dim, "gelu", False), ("lin2", dim, vit.mlp_dim, "none", True))
    for name, n, k, activation, residual in gemms:
        x, w, b = _meta(tokens, k, dtype=dtype), _meta(n, k, dtype=dtype), _meta(n, dtype=dtype)
        r = _meta(tokens, n, dtype=dtype) if residual else None
        for config in fused_linear.candidate_configs(dtype, activation):
            if "impl" in config:  # cuBLAS
                continue
            with recorded_launches(fused_linear, "_fused_linear_kernel", "_fused_linear_tma_kernel") as (pointer_rec, tma_rec):
                fused_linear._linear(x, w, b, r, activation, config)
            (args, kwargs), = pointer_rec.launches + tma_rec.launches
            launches.append((f"vit_h {name}", config, args, kwargs))
    return launches


def layer_norm_launches(dtype: torch.dtype) -> list[tuple[str, dict, tuple, dict]]:
    """(shape label, config, args, kwargs) of every Triton LayerNorm candidate at each variant's width
    (a batch-8 block's rows: real launches at large M)."""
    launches = []
    for variant in SHAPE_VARIANTS:
        vit = VARIANTS[variant]
        x, w = _meta(8 * vit.grid_size ** 2, vit.embed_dim, dtype=dtype), _meta(vit.embed_dim, dtype=dtype)
        for config in layer_norm.candidate_configs():
            if config is layer_norm.TORCH_OP:
                continue
            with recorded_launches(layer_norm, "_layer_norm_kernel") as (rec,):
                layer_norm._layer_norm(x, w, w, 1e-6, config)
            (args, kwargs), = rec.launches
            launches.append((f"{variant} norm", config, args, kwargs))
    return launches


def conv3x3_launches(dtype: torch.dtype) -> list[tuple[str, dict, tuple, dict]]:
    """(shape label, config, args, kwargs) of every Triton conv3x3 candidate at the HQ decoder's
    first convolution (64 prompts at 256 x 256: 32 -> 64 + LayerNorm + GELU), with both epilogues:
    the map, and its projection by the 9 tap filters of the folded last convolution."""
    launches, hw, prompts = [], 256, 64
    weights = (conv3x3.pack_weight(_meta(64, 32, 3, 3, dtype=dtype)), _meta(64, dtype=dtype))  # the layout the decoder passes
    x = _meta(prompts, 32, hw, hw, dtype=dtype)
    calls = (("hq conv1 ln_gelu", lambda config: conv3x3._conv3x3(x, *weights, *weights, 1e-6, None, config)),
             ("hq conv1 ln_gelu_project", lambda config: conv3x3._conv3x3(x, *weights, *weights, 1e-6, _meta(prompts, 9, 64, dtype=dtype), config)))
    for label, call in calls:
        for config in conv3x3.candidate_configs(dtype):
            if config is conv3x3.TORCH_OP:
                continue
            with recorded_launches(conv3x3, "_conv3x3_kernel") as (rec,):
                call(config)
            (args, kwargs), = rec.launches
            launches.append((label, config, args, kwargs))
    return launches


def candidate_usage(arch: int = 90, dtypes=(torch.bfloat16, torch.float32)) -> list[dict]:
    rows = []
    linear_kernel = lambda config: fused_linear._fused_linear_tma_kernel if config.get("TMA") else fused_linear._fused_linear_kernel  # noqa: E731
    for family, launches_of, kernel_of in (("attention", attention_launches, lambda _: attention._rel_pos_attention_kernel),
                                           ("rel_pos_terms", rel_pos_terms_launches, lambda _: attention._rel_pos_terms_kernel),
                                           ("fused_linear", linear_launches, linear_kernel),
                                           ("layer_norm", layer_norm_launches, lambda _: layer_norm._layer_norm_kernel),
                                           ("conv3x3", conv3x3_launches, lambda _: conv3x3._conv3x3_kernel)):
        for dtype in dtypes:
            for shape, config, args, kwargs in launches_of(dtype):
                usage = compile_usage(kernel_of(config), args, kwargs, arch)
                rows.append(dict(family=family, dtype=str(dtype).replace("torch.", ""), shape=shape, config=config, **vars(usage)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_LIMIT), help="compute capability x10")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    args = p.parse_args(argv)
    if not available():
        raise SystemExit(f"cuobjdump not found at {_cuobjdump()} (it ships with Triton's NVIDIA backend)")
    if args.json:
        print(json.dumps(candidate_usage(args.arch)))
        return
    limit = SHARED_MEMORY_LIMIT[args.arch]
    print(f"triton {triton.__version__}, sm_{args.arch}, shared-memory limit {limit} B\n")
    print("| kernel | dtype | shape | config | registers | stack B | shared B | wgmma | tf32 splits |\n|---|---|---|---|---|---|---|---|---|")
    for row in candidate_usage(args.arch):
        config = " ".join(f"{k}={v}" for k, v in row["config"].items())
        flag = " (over the limit)" if row["shared_bytes"] > limit else ""
        print(f"| {row['family']} | {row['dtype']} | {row['shape']} | {config} | {row['registers']} | {row['stack_bytes']} | {row['shared_bytes']}{flag} | {row['wgmma']} | {row['tf32_splits']} |")


if __name__ == "__main__":
    main()
