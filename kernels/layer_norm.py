"""LayerNorm over the last dim: ``(x - mean) / sqrt(var + eps) * weight + bias``, a row per tile.

The ViT blocks' two LayerNorms (norm1, norm2; C = 768 / 1024 / 1280, eps 1e-6) are memory-bound:
one read and one write of the [B, H, W, C] activation. The H200 profile of a vit_h block
(bench/results/block-profile-vit_h-2026-11-22.md) has torch's LayerNorm kernel at ~1.6 TB/s
(104 us per call at batch 8 for 168 MB moved), well under the ~4.3 TB/s a copy reaches: this
kernel keeps whole rows in registers (BLOCK_N = C rounded up to a power of two) and normalizes
ROWS rows per program, statistics in fp32 (two passes over the registers, not E[x^2] - E[x]^2).
torch's F.layer_norm is offered to the tuner too (``TORCH_OP``): the measurement decides.

Layout as the other families: kernel -> ``_layer_norm`` (one launch with a given config) ->
``layer_norm`` (checks, tuned config). Inference only: no backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from samhq_fast.kernels import autotune, interpreting, on_device

__all__ = ["layer_norm"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows longer than this run torch's kernel: a whole row per tile would no longer fit in registers
# (4 warps hold 16,384 fp32 values as 128 per thread, before the centered copy).
MAX_TILED_ROW = 8192


@triton.jit
def _layer_norm_kernel(
    x_ptr,  # [M, N], unit stride along N
    weight_ptr,  # [N]
    bias_ptr,  # [N]
    out_ptr,  # [M, N], unit stride along N
    M,
    N,
    stride_x,
    stride_out,
    eps,
    BLOCK_N: tl.constexpr,  # N rounded up to a power of two: one tile holds whole rows
    ROWS: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_in = cols < N
    mask = (rows < M)[:, None] & col_in[None, :]  # [ROWS, BLOCK_N]
    rows64 = rows.to(tl.int64)  # M * N passes 2**31 at real batch sizes (vit_h: 32 images)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / N  # [ROWS]
    centered = tl.where(mask, x - mean[:, None], 0.0)  # the padded columns must not enter the variance
    rstd = tl.rsqrt(tl.sum(centered * centered, 1) / N + eps)  # [ROWS], biased variance as nn.LayerNorm
    weight = tl.load(weight_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    out = centered * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


INTERPRETER_CONFIG = dict(ROWS=16, num_warps=4)  # few programs: the interpreter pays per program and op
TORCH_OP = {"impl": "torch"}  # F.layer_norm, the eager model's own kernel


def candidate_configs() -> list[dict]:
    """The tuner's candidates, the untuned default first. Compiled offline for sm_90 (Triton 3.6 and
    3.9) at C = 768 and 1280 in bf16 and fp32, none spills (benchmark/kernel_resources.py). Rows of a
    program share the weight and bias loads; more rows per program mean fewer, larger programs."""
    return [dict(ROWS=4, num_warps=8), dict(ROWS=1, num_warps=4), dict(ROWS=2, num_warps=4), dict(ROWS=8, num_warps=8), TORCH_OP]


def _layer_norm(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, config: dict) -> torch.Tensor:
    """[M, N] rows (unit stride along N) -> [M, N] normalized, with one config."""
    M, N = x2.shape
    if config.get("impl") == "torch":
        return F.layer_norm(x2, (N,), weight, bias, eps)
    out = torch.empty_like(x2)
    rows = config["ROWS"]
    _layer_norm_kernel[(triton.cdiv(M, rows),)](
        x2, weight, bias, out, M, N, x2.stride(0), out.stride(0), eps,
        BLOCK_N=triton.next_power_of_2(N), ROWS=rows, num_warps=config["num_warps"],
    )
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` in x's dtype (statistics and affine in fp32).

    x: [..., C] (e.g. [B, H, W, C] channels-last tokens; copied first if its last dim is strided);
    weight, bias: [C], on x's device in x's dtype (float32, float16 or bfloat16); eps > 0.
    Returns [..., C], a new tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"layer_norm: x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x must be [..., C] with C >= 1, got shape {list(x.shape)}")
    C = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"layer_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (C,):
            raise ValueError(f"layer_norm: {name} must have shape ({C},) to match x's last dim, got {tuple(t.shape)}")
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(f"layer_norm: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"layer_norm: eps must be a positive finite number, got {eps!r}")
    interpreted = interpreting(x, "layer_norm")

    M = x.numel() // C  # all leading dims flattened into rows
    if M == 0:
        return torch.empty_like(x)
    x2 = x.reshape(M, C)  # a view where the rows have one pitch (the kernel takes it), else a copy
    if x2.stride(1) != 1:  # the kernel reads a row as one unit-stride run
        x2 = x2.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    with on_device(x):
        if C > MAX_TILED_ROW:
            out = _layer_norm(x2, weight, bias, float(eps), TORCH_OP)
        elif interpreted:
            out = _layer_norm(x2, weight, bias, float(eps), INTERPRETER_CONFIG)
        else:
            shape_key = (str(x.dtype), triton.next_power_of_2(M), C)
            out = autotune.run("layer_norm", shape_key, candidate_configs(),
                               lambda config: _layer_norm(x2, weight, bias, float(eps), config), x.device)
    return out.view(x.shape)
