"""Fused linear layer: ``out = act(x @ weight.T + bias) [+ residual]`` in one Triton kernel.

Where the ViT block uses it (x is channels-last tokens [B, H, W, C] or [B, L, C]):

* MLP ``lin1``: ``fused_linear(x, w1, b1, activation="gelu")``        (GELU fused into the epilogue)
* MLP ``lin2``: ``fused_linear(h, w2, b2, residual=x)``                 (residual add fused)
* attention ``proj``: ``fused_linear(o, wp, bp, residual=shortcut)``
* attention ``qkv``: ``fused_linear(x, wqkv, bqkv)``                 (bias only; Triton or cuBLAS, as timed)

Fusing the bias, the activation and the residual into the matmul epilogue saves one full
read + write of the [M, N] output per fused op compared with eager PyTorch.

Layout: kernel -> ``_linear`` (one launch with a given config) -> ``fused_linear`` (checks, and the
config tuned per shape among a few tiles and the plain cuBLAS op, see ``autotune``) -> tiny
``FusedLinear`` module wrapper. Inference only: no backward is defined, the output carries no autograd history.

Triton API use is restricted to what both triton 3.6 (GPU image) and 3.9 (CPU dev box) have:
plain pointer arithmetic, masked tl.load/tl.store, tl.dot(..., input_precision=...), tl.erf.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

from samhq_fast.kernels import autotune, dot_precision, interpreting, on_device

__all__ = ["fused_linear", "FusedLinear", "ACTIVATIONS"]

ACTIVATIONS = ("none", "gelu")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 (exact, TF32 off); "tf32" = default for 16-bit
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ("swizzled") program order: consecutive programs sweep GROUP_M row-blocks for one
    # column-block before moving right, so a group re-reads the same weight tiles and x rows
    # while they are still in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mask_m = offs_m < M
    mask_n = offs_n < N

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

    # Epilogue, all in fp32: bias -> activation -> residual (the ViT block's order).
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        acc += bias[None, :]
    if ACTIVATION == "gelu":
        # Exact (erf) GELU as nn.GELU(): 0.5 * x * (1 + erf(x / sqrt(2))).
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))

    mask = mask_m[:, None] & mask_n[None, :]  # [BLOCK_M, BLOCK_N]
    offs_m64 = offs_m.to(tl.int64)
    if HAS_RESIDUAL:
        r_ptrs = r_ptr + offs_m64[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)

    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# The interpreter pays per program and per op: few 64x64 tiles keep the tests fast, and the test
# shapes (M 37/200, N 48/100/240, K 33/80/160) still exercise every tail.
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
# cuBLAS matmul with bias (addmm), then GELU / residual as separate torch ops: the eager model's own
# computation, offered to the tuner so a shape where cuBLAS wins keeps cuBLAS.
TORCH_OP = {"impl": "torch"}


def _tile(m: int, n: int, k: int, warps: int, stages: int) -> dict:
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=warps, num_stages=stages)


def candidate_configs(dtype: torch.dtype) -> list[dict]:
    """The pruned GPU config space, the untuned default first (see samhq_fast.kernels.autotune)."""
    if dtype == torch.float32:
        # "ieee" fp32 dots run on the FMA units, not tensor cores: small tiles keep the fp32
        # operand tiles and the accumulator within registers / shared memory.
        return [_tile(64, 128, 32, 4, 3), _tile(64, 64, 32, 4, 3), _tile(32, 64, 32, 4, 2), _tile(128, 64, 16, 8, 2), TORCH_OP]
    # fp16 / bf16 on Hopper (wgmma): 3-4 stage pipelines, at most 3 * (128*64 + 64*256) * 2 B =
    # 144 KiB of shared memory (Hopper has 227 KiB). Compiled offline for sm_90 (Triton 3.6 and 3.9)
    # with the GELU + residual epilogue, all but 128x256 run without register spills; 128x256 spills
    # ~400 B per thread in the epilogue only and stays as the large-tile option. (256x128 and
    # 128x128x32 with 4 warps, which spill, were dropped.)
    return [
        _tile(128, 128, 64, 8, 3), _tile(128, 256, 64, 8, 3), _tile(128, 128, 64, 8, 4),
        _tile(64, 128, 64, 4, 4), _tile(128, 64, 64, 4, 4), _tile(64, 256, 64, 8, 3), TORCH_OP,
    ]


def _linear(x2, weight, bias, r2, activation: str, config: dict) -> torch.Tensor:
    """[M, K] x [N, K]^T (+ bias, activation, + [M, N] residual) -> [M, N] with one config."""
    if config.get("impl") == "torch":
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        if activation == "gelu":
            out = F.gelu(out)
        return out.add_(r2) if r2 is not None else out
    (M, K), N = x2.shape, weight.shape[0]
    out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    _fused_linear_kernel[grid](
        x2,
        weight,
        bias if bias is not None else x2,  # dummy pointers: never read, the constexpr flag is False
        r2 if r2 is not None else x2,
        out,
        M,
        N,
        K,
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        weight.stride(1),
        r2.stride(0) if r2 is not None else 0,
        r2.stride(1) if r2 is not None else 0,
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=r2 is not None,
        ACTIVATION=activation,
        INPUT_PRECISION=dot_precision(x2.dtype),
        **config,
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
    apply the epilogue in fp32; where the tuner keeps cuBLAS (``TORCH_OP``), torch's matmul precision
    settings apply and GELU / residual run on its rounded output, as in the eager model.

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
            "fused_linear", shape_key, candidate_configs(x.dtype),
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
