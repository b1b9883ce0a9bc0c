"""3x3 convolutions (stride 1, zero padding 1) as implicit GEMMs with their epilogues fused: the HQ
decoder's mask-feature branch.

Per prompt, SAM-HQ's decoder runs at the low-res mask grid (256 x 256 for a 1024 input):
  conv3x3 32 -> 64, LayerNorm2d(64), GELU, conv3x3 64 -> 32, + the image's HQ features,
  then the HQ token's hypernetwork vector dotted over the 32 channels -> the HQ mask.
The two convolutions are 4.8 of the decoder's 8.4 GFLOP per prompt (bench/NOTES.md, prediction 17),
and unfused every map between them is written and read again (a 64-channel bf16 map is 8 MB).
Two epilogues of one kernel:
  "ln_gelu": + bias, LayerNorm over the output channels, exact GELU -> a channels-last map
             (a tile holds all output channels of BLOCK_M pixels, so the LayerNorm is an epilogue);
  "dot":     + bias, + a residual map, dot with a per-image vector over the output channels
             -> one map per image; the C_out-channel sum is never written.
Implicit GEMM per image: M = pixels, N = output channels, K = 9 taps x input channels. The weight is
read through its strides: nn.Conv2d's [C_out, C_in, 3, 3] works, `pack_weight`'s layout (output
channels contiguous) makes the weight tiles coalesced loads.

Layout as the other families: kernel -> ``_conv3x3`` (one launch with a given config) ->
``conv3x3_ln_gelu`` / ``conv3x3_dot`` (checks, tuned config) -> custom ops for torch.compile
(``torch.ops.samhq_fast.conv3x3_ln_gelu`` / ``conv3x3_dot``). Inference only: no backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from samhq_fast.kernels import autotune, dot_precision, interpreting, on_device

__all__ = ["conv3x3_ln_gelu", "conv3x3_dot", "pack_weight"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_OUT_CHANNELS = 256  # a tile holds every output channel of its pixels (the LayerNorm and the dot need them all)


@triton.jit
def _conv3x3_kernel(
    x_ptr,  # [B, C_in, H, W], any strides
    w_ptr,  # [C_out, C_in, 3, 3], any strides
    bias_ptr,  # [C_out]
    norm_w_ptr,  # [C_out] LayerNorm weight ("ln_gelu")
    norm_b_ptr,  # [C_out] LayerNorm bias ("ln_gelu")
    res_ptr,  # [B or 1, C_out, H, W] residual ("dot"); stride_rb = 0 broadcasts one map
    vec_ptr,  # [B, C_out] per-image vector ("dot")
    out_ptr,  # "ln_gelu": [B, C_out, H, W] at the out strides; "dot": [B, H * W], rows at stride_ob
    H,
    W,
    C_IN,
    C_OUT,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_rb, stride_rc, stride_rh, stride_rw,
    stride_vb, stride_vc,
    stride_ob, stride_oc, stride_oh, stride_ow,
    eps,
    EPILOGUE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # pixels per program (row-major over one image)
    BLOCK_N: tl.constexpr,  # C_out rounded up to a power of two: all output channels in one tile
    BLOCK_K: tl.constexpr,  # input channels per step
):
    image = tl.program_id(1).to(tl.int64)  # B * C * H * W passes 2**31 at a few hundred prompts
    pix = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    pix_in = pix < H * W
    y = pix // W
    x = pix % W
    cols = tl.arange(0, BLOCK_N)  # output channels
    col_in = cols < C_OUT
    chans = tl.arange(0, BLOCK_K)  # input channels of one step
    x_image = x_ptr + image * stride_xb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_steps = tl.cdiv(C_IN, BLOCK_K)
    for step in range(0, 9 * k_steps):  # one loop over taps x channel blocks, so it can be pipelined
        tap = step // k_steps
        dy = tap // 3
        dx = tap % 3
        c = (step % k_steps) * BLOCK_K + chans  # [BLOCK_K]
        c_in = c < C_IN
        yy = y + dy - 1
        xx = x + dx - 1
        inside = pix_in & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)  # outside: the zero padding
        a = tl.load(
            x_image + c[None, :] * stride_xc + (yy * stride_xh + xx * stride_xw)[:, None],
            mask=inside[:, None] & c_in[None, :], other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = tl.load(
            w_ptr + c[:, None] * stride_wi + cols[None, :] * stride_wo + dy * stride_wh + dx * stride_ww,
            mask=c_in[:, None] & col_in[None, :], other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    # Padded columns stay exactly 0 here: their weights and bias load as 0.
    acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == "ln_gelu":
        mean = tl.sum(acc, 1) / C_OUT  # [BLOCK_M]
        centered = tl.where(col_in[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 1) / C_OUT + eps)  # biased variance, as LayerNorm2d
        norm_w = tl.load(norm_w_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
        norm_b = tl.load(norm_b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
        normed = centered * rstd[:, None] * norm_w[None, :] + norm_b[None, :]
        out = 0.5 * normed * (1.0 + tl.erf(normed * 0.7071067811865476))  # exact GELU, as nn.GELU()
        out_ptrs = out_ptr + image * stride_ob + cols[None, :] * stride_oc + (y * stride_oh + x * stride_ow)[:, None]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=pix_in[:, None] & col_in[None, :])
    else:  # "dot"
        res = tl.load(
            res_ptr + image * stride_rb + cols[None, :] * stride_rc + (y * stride_rh + x * stride_rw)[:, None],
            mask=pix_in[:, None] & col_in[None, :], other=0.0,
        ).to(tl.float32)
        vec = tl.load(vec_ptr + image * stride_vb + cols * stride_vc, mask=col_in, other=0.0).to(tl.float32)
        out = tl.sum((acc + res) * vec[None, :], 1)  # [BLOCK_M]
        tl.store(out_ptr + image * stride_ob + pix, out.to(out_ptr.dtype.element_ty), mask=pix_in)


def _config(block_m: int, block_k: int, warps: int, stages: int) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


# The interpreter pays per program and per op, ~5 ms a loop step whatever the tile: 1,024-pixel tiles
# decode a 64 x 64 mask grid in 4 programs per prompt (64-pixel tiles took 10x longer). The tests
# launch small tiles too (`_conv3x3` with a config), so that tiles cross image rows.
INTERPRETER_CONFIG = _config(1024, 32, 4, 1)
# torch's conv2d (cuDNN), then the epilogue as separate torch ops: offered to the tuner so a shape or
# GPU where cuDNN wins keeps it.
TORCH_OP = {"impl": "torch"}


def candidate_configs(dtype: torch.dtype) -> list[dict]:
    """The tuner's candidates, the untuned default first. BLOCK_N is C_out rounded up (64 / 32 in the
    decoder); BLOCK_K is capped by C_in at launch."""
    if dtype == torch.float32:  # "ieee" dots on the FMA units: small tiles
        return [_config(64, 32, 4, 2), _config(32, 32, 4, 2), _config(128, 16, 8, 2), TORCH_OP]
    return [_config(128, 32, 4, 3), _config(128, 64, 8, 3), _config(256, 32, 8, 3), _config(64, 32, 4, 4), _config(128, 32, 8, 4), TORCH_OP]


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d's [C_out, C_in, 3, 3] weight with output channels contiguous in memory (a view of
    a [3, 3, C_in, C_out] copy): the same tensor values, laid out for coalesced weight tiles."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _torch_conv3x3(x, weight, bias, norm_weight, norm_bias, eps, residual, vector, epilogue: str) -> torch.Tensor:
    """The same function from torch ops (the eager model's computation, in x's dtype)."""
    y = F.conv2d(x, weight, bias, padding=1)
    if epilogue == "ln_gelu":
        mean = y.mean(1, keepdim=True)
        var = (y - mean).pow(2).mean(1, keepdim=True)
        y = (y - mean) / torch.sqrt(var + eps)
        y = F.gelu(norm_weight[:, None, None] * y + norm_bias[:, None, None])
        return y.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last, as the kernel's output
    return (vector[:, None, :] @ (y + residual).flatten(2))[:, 0].contiguous()


def _empty_output(x: torch.Tensor, c_out: int, epilogue: str) -> torch.Tensor:
    """The output an epilogue writes (and the custom ops declare): "ln_gelu" [B, C_out, H, W]
    channels-last in memory (a tile's store is one contiguous run); "dot" [B, H * W]."""
    B, _, H, W = x.shape
    return x.new_empty((B, H, W, c_out)).permute(0, 3, 1, 2) if epilogue == "ln_gelu" else x.new_empty((B, H * W))


def _conv3x3(x, weight, bias, norm_weight, norm_bias, eps, residual, vector, epilogue: str, config: dict) -> torch.Tensor:
    """One launch with one config (inputs checked by the callers)."""
    if config.get("impl") == "torch":
        return _torch_conv3x3(x, weight, bias, norm_weight, norm_bias, eps, residual, vector, epilogue)
    B, C_in, H, W = x.shape
    C_out = weight.shape[0]
    out = _empty_output(x, C_out, epilogue)
    if epilogue == "ln_gelu":
        out_strides = out.stride()
        res_strides, vec_strides = (0, 0, 0, 0), (0, 0)
    else:
        out_strides = (out.stride(0), 0, 0, 0)
        res_strides = (residual.stride(0) if residual.shape[0] > 1 else 0, *residual.stride()[1:])
        vec_strides = vector.stride()
    block_k = max(16, min(config["BLOCK_K"], triton.next_power_of_2(C_in)))
    grid = (triton.cdiv(H * W, config["BLOCK_M"]), B)
    _conv3x3_kernel[grid](
        x, weight, bias,
        norm_weight if norm_weight is not None else bias,  # dummy pointers: never read by the other epilogue
        norm_bias if norm_bias is not None else bias,
        residual if residual is not None else x,
        vector if vector is not None else bias,
        out, H, W, C_in, C_out,
        *x.stride(), *weight.stride(), *res_strides, *vec_strides, *out_strides,
        float(eps),
        EPILOGUE=epilogue, INPUT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=max(16, triton.next_power_of_2(C_out)), BLOCK_K=block_k,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


def _check_input(who: str, x, weight) -> int:
    """x and the conv weight (types, dtype, shapes) -> C_out."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{who}: x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if x.dim() != 4:
        raise ValueError(f"{who}: x must be [B, C_in, H, W], got shape {list(x.shape)}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{who}: weight must be a torch.Tensor, got {type(weight).__name__}")
    C_in = x.shape[1]
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (C_in, 3, 3) or not 1 <= weight.shape[0] <= MAX_OUT_CHANNELS:
        raise ValueError(f"{who}: weight must be [C_out, {C_in}, 3, 3] with 1 <= C_out <= {MAX_OUT_CHANNELS} "
                         f"(C_in = x.shape[1]), got {list(weight.shape)}")
    return weight.shape[0]


def _check_tensors(who: str, x, expected: dict) -> None:
    """expected: name -> (tensor, shape); each must have that shape, x's device and x's dtype."""
    for name, (t, shape) in expected.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{who}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(f"{who}: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")


def _run(who: str, x, weight, bias, norm_weight, norm_bias, eps, residual, vector, epilogue: str) -> torch.Tensor:
    interpreted = interpreting(x, who)
    B, C_in, H, W = x.shape
    if B * H * W == 0:  # nothing to compute (and no empty launch for the tuner to time), as the other families
        return _empty_output(x, weight.shape[0], epilogue)
    launch = lambda config: _conv3x3(x, weight, bias, norm_weight, norm_bias, eps, residual, vector, epilogue, config)  # noqa: E731
    with on_device(x):
        if interpreted:
            return launch(INTERPRETER_CONFIG)
        # Tuned per power-of-two image count: the decoder's prompt buckets share a choice each.
        shape_key = (str(x.dtype), epilogue, triton.next_power_of_2(B), C_in, weight.shape[0], H, W)
        if x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
            shape_key += ("tf32",)  # the cuDNN candidate then runs TF32 (the Triton ones never do)
        return autotune.run("conv3x3", shape_key, candidate_configs(x.dtype), launch, x.device)


def conv3x3_ln_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``GELU(LayerNorm2d(conv2d(x, weight, bias, padding=1)))``: SAM-HQ's conv -> LayerNorm2d -> GELU.

    x: [B, C_in, H, W] (any strides); weight: [C_out, C_in, 3, 3] (any strides, e.g. `pack_weight`'s);
    bias, norm_weight, norm_bias: [C_out]; all on x's device in x's dtype (float32, float16,
    bfloat16); eps > 0. Accumulation and epilogue in fp32. Returns [B, C_out, H, W] in x's dtype,
    channels-last in memory.
    """
    C_out = _check_input("conv3x3_ln_gelu", x, weight)
    _check_tensors("conv3x3_ln_gelu", x, {"weight": (weight, weight.shape), "bias": (bias, (C_out,)),
                                          "norm_weight": (norm_weight, (C_out,)), "norm_bias": (norm_bias, (C_out,))})
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"conv3x3_ln_gelu: eps must be a positive finite number, got {eps!r}")
    return _run("conv3x3_ln_gelu", x, weight, bias, norm_weight, norm_bias, eps, None, None, "ln_gelu")


def conv3x3_dot(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``sum_c vector[b, c] * (conv2d(x, weight, bias, padding=1) + residual)[b, c]``: SAM-HQ's second
    mask-feature conv, the HQ features added, and the HQ token's hypernetwork dot, without writing
    the C_out-channel map.

    x: [B, C_in, H, W] (any strides); weight: [C_out, C_in, 3, 3] (any strides); bias: [C_out];
    residual: [B or 1, C_out, H, W] (one map broadcast over the batch); vector: [B, C_out]; all on
    x's device in x's dtype. Accumulation in fp32. Returns [B, H * W] in x's dtype.
    """
    C_out = _check_input("conv3x3_dot", x, weight)
    B, _, H, W = x.shape
    if isinstance(residual, torch.Tensor) and (residual.dim() != 4 or residual.shape[0] not in (1, B) or tuple(residual.shape[1:]) != (C_out, H, W)):
        raise ValueError(f"conv3x3_dot: residual must be [{B} or 1, {C_out}, {H}, {W}], got {list(residual.shape)}")
    _check_tensors("conv3x3_dot", x, {"weight": (weight, weight.shape), "bias": (bias, (C_out,)),
                                      "residual": (residual, getattr(residual, "shape", ())), "vector": (vector, (B, C_out))})
    return _run("conv3x3_dot", x, weight, bias, None, None, 1.0, residual, vector, "dot")


# Custom ops, so torch.compile(fullgraph=True) keeps each as one opaque call (the launcher's checks
# and the tuner are Python that Dynamo must not trace); Inductor calls them like a library kernel.
@torch.library.custom_op("samhq_fast::conv3x3_ln_gelu", mutates_args=())
def _conv3x3_ln_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    return conv3x3_ln_gelu(x, weight, bias, norm_weight, norm_bias, eps)


@_conv3x3_ln_gelu_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, eps):
    return _empty_output(x, weight.shape[0], "ln_gelu")


@torch.library.custom_op("samhq_fast::conv3x3_dot", mutates_args=())
def _conv3x3_dot_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return conv3x3_dot(x, weight, bias, residual, vector)


@_conv3x3_dot_op.register_fake
def _(x, weight, bias, residual, vector):
    return _empty_output(x, weight.shape[0], "dot")
