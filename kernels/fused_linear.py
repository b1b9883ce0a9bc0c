"""Fused linear layer: ``out = act(x @ weight.T + bias) [+ residual]`` in one Triton kernel.

Where the ViT block uses it (x is channels-last tokens [B, H, W, C] or [B, L, C]):

* MLP ``lin1``: ``fused_linear(x, w1, b1, activation="gelu")``        (GELU fused into the epilogue)
* MLP ``lin2``: ``fused_linear(h, w2, b2, residual=x)``                 (residual add fused)
* attention ``proj``: ``fused_linear(o, wp, bp, residual=shortcut)``
* attention ``qkv``: ``fused_linear(x, wqkv, bqkv)``                 (bias only; Triton or cuBLAS, as timed)

Fusing the bias, the activation and the residual into the matmul epilogue saves one full
read + write of the [M, N] output per fused op compared with eager PyTorch.

Two kernels share the tile order and the epilogue: ``_fused_linear_kernel`` (a program per output
tile, pointer loads; any GPU Triton supports) and ``_fused_linear_tma_kernel`` (Hopper: tiles copied by
the tensor-memory accelerator, a persistent grid of one program per multiprocessor looping over the
output tiles), for operands whose layout the TMA can read.

Layout: kernels -> ``_linear`` (one launch with a given config) -> ``fused_linear`` (checks, and the
config tuned per shape among a few tiles of each kernel and the plain cuBLAS op, see ``autotune``) ->
tiny ``FusedLinear`` module wrapper. Inference only: no backward is defined, the output carries no
autograd history.

Triton API use is restricted to what both triton 3.6 (GPU image) and 3.9 (CPU dev box) have:
plain pointer arithmetic, masked tl.load/tl.store, host-side TensorDescriptor loads,
tl.range(..., flatten=True), tl.dot(..., input_precision=...), tl.erf.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

from samhq_fast.kernels import FP32_PRECISION, autotune, dot_precision, interpreting, on_device

__all__ = ["fused_linear", "FusedLinear", "ACTIVATIONS"]

ACTIVATIONS = ("none", "gelu")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _gelu(x):
    """Exact (erf) GELU in fp32, as nn.GELU(): 0.5 * x * (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_inplace_kernel(x_ptr, n, BLOCK: tl.constexpr):
    """x[:n] = gelu(x[:n]), in fp32, rounded to x's dtype: lin1's epilogue where cuBLAS does the GEMM."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]; n passes 2**31 at batch 64
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(x_ptr + offs, _gelu(x).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile number `tile` in grouped ("swizzled") order:
    consecutive tiles sweep GROUP_M row blocks for one column block before moving right, so a group
    re-reads the same weight tiles and x rows while they are still in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((tile % num_pid_in_group) % group_size_m), (tile % num_pid_in_group) // group_size_m


@triton.jit
def _epilogue(acc, row0, col0, M, N, b_ptr, r_ptr, out_ptr, stride_rm, stride_rn, stride_om, stride_on,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Finishes and stores the output tile acc [BLOCK_M, BLOCK_N] (fp32) at rows row0..., columns
    col0..., in two halves of BLOCK_N // 2 columns: the GELU's and the residual's fp32 temporaries
    of half a tile at a time keep the 128 x 256 tiles free of register spills (sm_90, Triton 3.6
    and 3.9)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))  # columns [:half], [half:]
    _epilogue_part(left, rows, col0 + tl.arange(0, BLOCK_N // 2), M, N, b_ptr, r_ptr, out_ptr,
                   stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
    _epilogue_part(right, rows, col0 + BLOCK_N // 2 + tl.arange(0, BLOCK_N // 2), M, N, b_ptr, r_ptr, out_ptr,
                   stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)


@triton.jit
def _epilogue_part(acc, offs_m, offs_n, M, N, b_ptr, r_ptr, out_ptr, stride_rm, stride_rn, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    """acc [rows, cols] fp32 of rows offs_m, columns offs_n: bias -> activation -> residual (the ViT
    block's order), all in fp32, then stored in the output's dtype (rows >= M and columns >= N are
    not stored)."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [cols]
        acc += bias[None, :]
    if ACTIVATION == "gelu":
        acc = _gelu(acc)

    mask = mask_m[:, None] & mask_n[None, :]  # [rows, cols]
    offs_m64 = offs_m.to(tl.int64)
    if HAS_RESIDUAL:
        r_ptrs = r_ptr + offs_m64[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)

    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]  (nn.Linear layout; read as its transpose [K, N])
    b_ptr,  # [N]     (dummy pointer when HAS_BIAS is False)
    r_ptr,  # [M, N]  (dummy pointer when HAS_RESIDUAL is False)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none" | "gelu"
    INPUT_PRECISION: tl.constexpr,  # fp32: "tf32x3" (tuned candidates) or "ieee"; 16-bit: "tf32" (ignored)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]

    # Rows/columns past the M/N edge are wrapped back in range (% M, % N) instead of masked:
    # the main-loop loads then only need the K mask; the wrapped rows/columns are computed and
    # simply not stored. int64 row offsets: M * K can pass 2**31 at real batch sizes.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] of weight.T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0  # K tail: zero-fill past the end so it adds nothing
        a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    _epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, b_ptr, r_ptr, out_ptr, stride_rm, stride_rn, stride_om, stride_on,
              HAS_BIAS, HAS_RESIDUAL, ACTIVATION, BLOCK_M, BLOCK_N)


@triton.jit
def _fused_linear_tma_kernel(
    x_desc,  # tensor descriptor of x [M, K], blocks [BLOCK_M, BLOCK_K]
    w_desc,  # tensor descriptor of weight [N, K], blocks [BLOCK_N, BLOCK_K]
    b_ptr,  # [N]     (dummy pointer when HAS_BIAS is False)
    r_ptr,  # [M, N]  (dummy pointer when HAS_RESIDUAL is False)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    num_programs,  # the grid: one program per multiprocessor, each looping over output tiles
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none" | "gelu"
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Hopper's tensor-memory accelerator (TMA) copies the x and weight tiles to shared memory: no
    # per-thread addresses or masks (it zero-fills past the M, N and K edges), and the loads of the
    # next tile overlap this one's dots and epilogue in the flattened, pipelined tile loop of a
    # persistent grid. Same function as _fused_linear_kernel.
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(k_steps):
            a = x_desc.load([row0, step * BLOCK_K])  # [BLOCK_M, BLOCK_K]
            w = w_desc.load([col0, step * BLOCK_K])  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(a, w.T, acc, input_precision=INPUT_PRECISION)
        _epilogue(acc, row0, col0, M, N, b_ptr, r_ptr, out_ptr, stride_rm, stride_rn, stride_om, stride_on,
                  HAS_BIAS, HAS_RESIDUAL, ACTIVATION, BLOCK_M, BLOCK_N)


# The interpreter pays per program and per op: few 64x64 tiles keep the tests fast, and the test
# shapes (M 37/200, N 48/100/240, K 33/80/160) still exercise every tail.
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
# cuBLAS matmul with bias (addmm), then GELU / residual as separate torch ops: the eager model's own
# computation, offered to the tuner so a shape where cuBLAS wins keeps cuBLAS.
TORCH_OP = {"impl": "torch"}
# The same with the GELU as a Triton kernel, in place on the GEMM's output: torch's GELU ran at
# ~2.7 TB/s on the H200 (31 us per vit_h image and block, bench/results/block-profile-vit_h-*.md),
# under the ~4 TB/s a copy reaches. Offered for activation="gelu" only.
TORCH_GEMM_TRITON_GELU = {"impl": "torch", "gelu": "triton"}
GELU_BLOCK, GELU_WARPS = 4096, 8  # 16 elements per thread: two 16-byte loads of a 16-bit dtype


def _tile(m: int, n: int, k: int, warps: int, stages: int, tma: bool = False, precision: str | None = None) -> dict:
    config = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=warps, num_stages=stages)
    if precision is not None:  # tl.dot's input_precision, else `dot_precision` of the dtype
        config["INPUT_PRECISION"] = precision
    return dict(config, TMA=True) if tma else config


def candidate_configs(dtype: torch.dtype, activation: str = "none", tma: bool = True) -> list[dict]:
    """The pruned GPU config space for `activation`, the untuned default first (see
    samhq_fast.kernels.autotune). `tma`: offer the persistent TMA kernel's tiles (GPUs of compute
    capability 9.0+)."""
    torch_ops = [TORCH_OP, TORCH_GEMM_TRITON_GELU] if activation == "gelu" else [TORCH_OP]
    if dtype == torch.float32:
        # fp32 dots as "tf32x3" (`FP32_PRECISION`): tensor-core tiles with fp32 operands (twice the
        # shared memory of 16-bit ones per stage: BLOCK_K 32). Compiled offline for sm_90 (Triton 3.6
        # and 3.9) at vit_h's four GEMMs: wgmma, no stack, 130-251 registers, at most 128 KiB.
        # (128x256x32 spills 224-376 bytes per thread.)
        fp32 = functools.partial(_tile, precision=FP32_PRECISION)
        tma_tiles = [fp32(128, 128, 32, 8, 3, tma=True)] if tma else []
        return [fp32(128, 128, 32, 8, 3), fp32(128, 64, 32, 8, 3), fp32(64, 128, 32, 4, 3), fp32(64, 64, 32, 4, 3), *tma_tiles, *torch_ops]
    # fp16 / bf16 on Hopper (wgmma): 3-4 stage pipelines, at most 3 * (128*64 + 64*256) * 2 B =
    # 144 KiB of shared memory for the pointer kernel, 176 KiB for the TMA kernel's 128x256 tile
    # (Hopper has 227 KiB). Compiled offline for sm_90 (Triton 3.6 and 3.9) at vit_h's four GEMMs,
    # none spills (the split epilogue: before it, both kernels' 128x256 tiles spilled 48-160 B per
    # thread). (256x128 and 128x128x32 with 4 warps, which spilled, were dropped.)
    pointer_tiles = [
        _tile(128, 128, 64, 8, 3), _tile(128, 256, 64, 8, 3), _tile(128, 128, 64, 8, 4),
        _tile(64, 128, 64, 4, 4), _tile(128, 64, 64, 4, 4), _tile(64, 256, 64, 8, 3),
    ]
    tma_tiles = [_tile(128, 256, 64, 8, 3, tma=True), _tile(128, 128, 64, 8, 4, tma=True)] if tma else []
    return pointer_tiles + tma_tiles + torch_ops


def tma_supported(device: torch.device) -> bool:
    """Whether the TMA kernel can run on `device` compiled: a GPU of compute capability 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _tma_operands(*tensors: torch.Tensor) -> bool:
    """Whether 2-D tensors meet the TMA's layout rules: unit stride along the last dim, the base
    address and the row pitch 16-byte aligned."""
    return all(t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


@functools.lru_cache(maxsize=None)
def _persistent_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per multiprocessor (a few in the interpreter, so that
    each program still loops over several tiles)."""
    return 3 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def _linear(x2, weight, bias, r2, activation: str, config: dict) -> torch.Tensor:
    """[M, K] x [N, K]^T (+ bias, activation, + [M, N] residual) -> [M, N] with one config. A TMA
    config on operands the TMA cannot read (misaligned views) runs the pointer kernel's same tile."""
    if config.get("impl") == "torch":
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        if activation == "gelu" and config.get("gelu") == "triton":
            _gelu_inplace_kernel[(triton.cdiv(out.numel(), GELU_BLOCK),)](out, out.numel(), BLOCK=GELU_BLOCK, num_warps=GELU_WARPS)
        elif activation == "gelu":
            out = F.gelu(out)
        return out.add_(r2) if r2 is not None else out
    (M, K), N = x2.shape, weight.shape[0]
    out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    tile = {key: value for key, value in config.items() if key != "TMA"}
    bias_arg = bias if bias is not None else x2  # dummy pointers: never read, the constexpr flag is False
    r_arg, (stride_rm, stride_rn) = (r2, r2.stride()) if r2 is not None else (x2, (0, 0))
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, ACTIVATION=activation,
                 INPUT_PRECISION=dot_precision(x2.dtype)) | tile
    if config.get("TMA") and _tma_operands(x2, weight):
        block_m, block_n, block_k = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
        programs = min(triton.cdiv(M, block_m) * triton.cdiv(N, block_n), _persistent_programs(x2.device))
        _fused_linear_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(x2, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
            bias_arg, r_arg, out, M, N, K, stride_rm, stride_rn, out.stride(0), out.stride(1), programs, **flags,
        )
        return out
    grid = (triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(N, tile["BLOCK_N"]),)
    _fused_linear_kernel[grid](
        x2, weight, bias_arg, r_arg, out, M, N, K, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        stride_rm, stride_rn, out.stride(0), out.stride(1), **flags,
    )
    return out


def _check_tensor(name: str, t, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fused_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"fused_linear: {name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"fused_linear: {name} has dtype {t.dtype} but x has dtype {x.dtype}")


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias) [+ residual]`` in x's dtype. The Triton kernels accumulate and
    apply the epilogue in fp32 (fp32 operands multiply as "tf32x3": `FP32_PRECISION`); where the
    tuner keeps cuBLAS (``TORCH_OP``), torch's matmul precision settings apply and GELU / residual
    run on its rounded output, as in the eager model.

    x: [..., K] (any leading dims, e.g. [B, H, W, C] channels-last tokens); weight: [N, K]
    (nn.Linear layout); bias: [N] or None; activation: "none" | "gelu" (exact erf GELU);
    residual: [..., N] (same shape as the output) or None, added after the activation.
    All tensors share x's device and dtype (float32, float16 or bfloat16). Returns [..., N].
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fused_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fused_linear: x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() < 1:
        raise ValueError("fused_linear: x must have at least one dimension [..., K]")
    _check_tensor("weight", weight, x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"fused_linear: weight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}"
        )
    N, K = weight.shape
    out_shape = (*x.shape[:-1], N)
    if bias is not None:
        _check_tensor("bias", bias, x)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"fused_linear: bias must have shape ({N},), got {tuple(bias.shape)}")
    if residual is not None:
        _check_tensor("residual", residual, x)
        if tuple(residual.shape) != out_shape:
            raise ValueError(
                f"fused_linear: residual must have the output shape {out_shape}, got {tuple(residual.shape)}"
            )
    interpreted = interpreting(x, "fused_linear")

    M = math.prod(x.shape[:-1])  # all leading dims flattened into rows
    if M == 0 or N == 0:
        return torch.empty(out_shape, device=x.device, dtype=x.dtype)
    x2 = x.contiguous().view(M, K)  # [M, K], unit stride along K for coalesced loads
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with unit stride
    r2 = residual.reshape(M, N) if residual is not None else None  # [M, N], view when possible
    with on_device(x):
        if interpreted:
            return _linear(x2, weight, bias, r2, activation, INTERPRETER_CONFIG).view(out_shape)
        # Tuned per power-of-two row count: batch sizes of one model share a choice per bucket. In fp32
        # the cuBLAS candidate runs TF32 when torch allows it (the Triton ones never do): part of the key.
        shape_key = (str(x.dtype), triton.next_power_of_2(M), N, K, activation, bias is not None, r2 is not None)
        if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            shape_key += ("tf32",)
        out = autotune.run(
            "fused_linear", shape_key, candidate_configs(x.dtype, activation, tma=tma_supported(x.device)),
            lambda config: _linear(x2, weight, bias, r2, activation, config), x.device,
        )
        return out.view(out_shape)


class FusedLinear(nn.Linear):
    """nn.Linear whose forward is ``fused_linear`` with a fixed activation; ``residual`` optional.

    Same parameters / state_dict as nn.Linear, so checkpoints load unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "none", **kw):
        if activation not in ACTIVATIONS:
            raise ValueError(f"FusedLinear: activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear(x, self.weight, self.bias, self.activation, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
