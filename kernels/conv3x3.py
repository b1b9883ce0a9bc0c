"""3x3 convolutions (stride 1, zero padding 1) as implicit GEMMs with their epilogues fused: the HQ
decoder's mask-feature branch.

Per prompt, SAM-HQ's decoder runs at the low-res mask grid (256 x 256 for a 1024 input):
  conv3x3 32 -> 64, LayerNorm2d(64), GELU, conv3x3 64 -> 32, + the image's HQ features,
  then the HQ token's hypernetwork vector dotted over the 32 channels -> the HQ mask.
The compiled decoder folds the dot into the last convolution (`decoding.folded_hq_masks`): per
prompt, 9 filters over the 64 channels (one per tap), whose maps are shifted into place and summed.
What is left per prompt is the first convolution (2.4 GFLOP) and a 64-channel map (8 MB in bf16)
that the filters read once. Two epilogues of one kernel:
  "ln_gelu":         + bias, LayerNorm over the output channels, exact GELU -> a channels-last map
                     (a tile holds all output channels of BLOCK_M pixels, so the LayerNorm is an
                     epilogue);
  "ln_gelu_project": the same, then projected by a per-image matrix [T, C_out] (T <= 16: the 9 tap
                     filters) -> T maps per image; the C_out-channel map is never written.
Implicit GEMM per image: M = pixels, N = output channels, K = 9 taps x input channels. The weight is
read through its strides: nn.Conv2d's [C_out, C_in, 3, 3] works, `pack_weight`'s layout (output
channels contiguous) makes the weight tiles coalesced loads.

Layout as the other families: kernel -> ``_conv3x3`` (one launch with a given config) ->
``conv3x3_ln_gelu`` / ``conv3x3_ln_gelu_project`` (checks, tuned config) -> custom ops for
torch.compile (``torch.ops.samhq_fast.conv3x3_ln_gelu`` / ``conv3x3_ln_gelu_project``). Inference
only: no backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from samhq_fast.kernels import autotune, dot_precision, interpreting, on_device

__all__ = ["conv3x3_ln_gelu", "conv3x3_ln_gelu_project", "pack_weight"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_OUT_CHANNELS = 256  # a tile holds every output channel of its pixels (the LayerNorm and the projection need them all)
MAX_PROJECTIONS = 16  # rows of the projection: one tl.dot's N


@triton.jit
def _conv3x3_kernel(
    x_ptr,  # [B, C_in, H, W], any strides
    w_ptr,  # [C_out, C_in, 3, 3], any strides
    bias_ptr,  # [C_out]
    norm_w_ptr,  # [C_out] LayerNorm weight
    norm_b_ptr,  # [C_out] LayerNorm bias
    proj_ptr,  # [B, T, C_out] per-image projection ("ln_gelu_project")
    out_ptr,  # [B, C_out or T, H, W] at the out strides
    H,
    W,
    C_IN,
    C_OUT,
    T,  # projection rows ("ln_gelu_project")
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_pb, stride_pt, stride_pc,
    stride_ob, stride_oc, stride_oh, stride_ow,
    eps,
    EPILOGUE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # pixels per program (row-major over one image)
    BLOCK_N: tl.constexpr,  # C_out rounded up to a power of two: all output channels in one tile
    BLOCK_K: tl.constexpr,  # input channels per step
    BLOCK_T: tl.constexpr,  # T rounded up to 16 ("ln_gelu_project")
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
    # Padded columns stay exactly 0 through the epilogue: their weights, biases and LayerNorm
    # parameters load as 0, and GELU(0) = 0.
    acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(acc, 1) / C_OUT  # [BLOCK_M]
    centered = tl.where(col_in[None, :], acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 1) / C_OUT + eps)  # biased variance, as LayerNorm2d
    norm_w = tl.load(norm_w_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    norm_b = tl.load(norm_b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    normed = centered * rstd[:, None] * norm_w[None, :] + norm_b[None, :]
    out = 0.5 * normed * (1.0 + tl.erf(normed * 0.7071067811865476))  # exact GELU, as nn.GELU(): [BLOCK_M, BLOCK_N]
    out_cols, out_col_in = cols, col_in  # the channels written
    if EPILOGUE == "ln_gelu_project":
        rows = tl.arange(0, BLOCK_T)
        row_in = rows < T
        proj = tl.load(
            proj_ptr + image * stride_pb + rows[None, :] * stride_pt + cols[:, None] * stride_pc,
            mask=col_in[:, None] & row_in[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_T]: the projection's transpose
        # the map rounded to the input dtype first, as the unfused path writes it
        out = tl.dot(out.to(proj.dtype), proj, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_T]
        out_cols, out_col_in = rows, row_in
    out_ptrs = out_ptr + image * stride_ob + out_cols[None, :] * stride_oc + (y * stride_oh + x * stride_ow)[:, None]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=pix_in[:, None] & out_col_in[None, :])


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


def pack_weight(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """nn.Conv2d's [C_out, C_in, 3, 3] weight with output channels contiguous in memory (a view of
    a [3, 3, C_in, C_out] copy): the same tensor values, laid out for coalesced weight tiles.
    out: an earlier packing of a weight of this shape, written in place (its layout kept)."""
    if out is not None:
        return out.copy_(weight)
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _torch_conv3x3(x, weight, bias, norm_weight, norm_bias, eps, projection) -> torch.Tensor:
    """The same function from torch ops (the eager model's computation, in x's dtype)."""
    y = F.conv2d(x, weight, bias, padding=1)
    mean = y.mean(1, keepdim=True)
    var = (y - mean).pow(2).mean(1, keepdim=True)
    y = (y - mean) / torch.sqrt(var + eps)
    y = F.gelu(norm_weight[:, None, None] * y + norm_bias[:, None, None])
    if projection is None:  # "ln_gelu"
        return y.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last, as the kernel's output
    return (projection @ y.flatten(2)).view(projection.shape[0], projection.shape[1], *y.shape[2:])


def _empty_output(x: torch.Tensor, c_out: int, projection: torch.Tensor | None) -> torch.Tensor:
    """The output an epilogue writes (and the custom ops declare): "ln_gelu" [B, C_out, H, W]
    channels-last in memory (a tile's store is one contiguous run); "ln_gelu_project" [B, T, H, W]
    contiguous."""
    B, _, H, W = x.shape
    if projection is None:
        return x.new_empty((B, H, W, c_out)).permute(0, 3, 1, 2)
    return x.new_empty((B, projection.shape[1], H, W))


def _conv3x3(x, weight, bias, norm_weight, norm_bias, eps, projection, config: dict) -> torch.Tensor:
    """One launch with one config (inputs checked by the callers); projection None: "ln_gelu"."""
    if config.get("impl") == "torch":
        return _torch_conv3x3(x, weight, bias, norm_weight, norm_bias, eps, projection)
    B, C_in, H, W = x.shape
    C_out = weight.shape[0]
    out = _empty_output(x, C_out, projection)
    rows = 0 if projection is None else projection.shape[1]
    block_k = max(16, min(config["BLOCK_K"], triton.next_power_of_2(C_in)))
    grid = (triton.cdiv(H * W, config["BLOCK_M"]), B)
    _conv3x3_kernel[grid](
        x, weight, bias, norm_weight, norm_bias,
        projection if projection is not None else bias,  # a dummy pointer for "ln_gelu": never read
        out, H, W, C_in, C_out, rows,
        *x.stride(), *weight.stride(), *(projection.stride() if projection is not None else (0, 0, 0)), *out.stride(),
        float(eps),
        EPILOGUE="ln_gelu" if projection is None else "ln_gelu_project", INPUT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=max(16, triton.next_power_of_2(C_out)), BLOCK_K=block_k,
        BLOCK_T=max(16, triton.next_power_of_2(rows)),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


def _check_tensors(who: str, x, expected: dict) -> None:
    """expected: name -> (tensor, shape); each must have that shape, x's device and x's dtype."""
    for name, (t, shape) in expected.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{who}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(f"{who}: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")


def _check_inputs(who: str, x, weight, bias, norm_weight, norm_bias, eps) -> int:
    """The convolution's and the LayerNorm's inputs (types, dtypes, devices, shapes) -> C_out."""
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
    C_out = weight.shape[0]
    _check_tensors(who, x, {"weight": (weight, weight.shape), "bias": (bias, (C_out,)),
                            "norm_weight": (norm_weight, (C_out,)), "norm_bias": (norm_bias, (C_out,))})
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{who}: eps must be a positive finite number, got {eps!r}")
    return C_out


def _run(who: str, x, weight, bias, norm_weight, norm_bias, eps, projection) -> torch.Tensor:
    interpreted = interpreting(x, who)
    B, C_in, H, W = x.shape
    if B * H * W == 0:  # nothing to compute (and no empty launch for the tuner to time), as the other families
        return _empty_output(x, weight.shape[0], projection)
    launch = lambda config: _conv3x3(x, weight, bias, norm_weight, norm_bias, eps, projection, config)  # noqa: E731
    with on_device(x):
        if interpreted:
            return launch(INTERPRETER_CONFIG)
        # Tuned per power-of-two image count: the decoder's prompt buckets share a choice each.
        epilogue = "ln_gelu" if projection is None else "ln_gelu_project"
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
    _check_inputs("conv3x3_ln_gelu", x, weight, bias, norm_weight, norm_bias, eps)
    return _run("conv3x3_ln_gelu", x, weight, bias, norm_weight, norm_bias, eps, None)


def conv3x3_ln_gelu_project(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
    projection: torch.Tensor,
) -> torch.Tensor:
    """``einsum("btc,bchw->bthw", projection, conv3x3_ln_gelu(x, ...))`` without writing the
    C_out-channel map: each image's map projected by its own matrix (the decoder's 9 tap filters of
    the folded last convolution).

    x, weight, bias, norm_weight, norm_bias, eps: as `conv3x3_ln_gelu`; projection: [B, T, C_out] with
    1 <= T <= 16 (any strides), x's device and dtype. The map is rounded to x's dtype before the
    projection (as an unfused map would be written), accumulation in fp32. Returns [B, T, H, W] in
    x's dtype, contiguous.
    """
    who = "conv3x3_ln_gelu_project"
    C_out = _check_inputs(who, x, weight, bias, norm_weight, norm_bias, eps)
    if not isinstance(projection, torch.Tensor):
        raise TypeError(f"{who}: projection must be a torch.Tensor, got {type(projection).__name__}")
    B = x.shape[0]
    if projection.dim() != 3 or (projection.shape[0], projection.shape[2]) != (B, C_out) or not 1 <= projection.shape[1] <= MAX_PROJECTIONS:
        raise ValueError(f"{who}: projection must be [{B}, T, {C_out}] (B = x.shape[0], C_out = weight.shape[0]) with "
                         f"1 <= T <= {MAX_PROJECTIONS}, got {list(projection.shape)}")
    _check_tensors(who, x, {"projection": (projection, projection.shape)})  # x's device and dtype
    return _run(who, x, weight, bias, norm_weight, norm_bias, eps, projection)


# Custom ops, so torch.compile(fullgraph=True) keeps each as one opaque call (the launcher's checks
# and the tuner are Python that Dynamo must not trace); Inductor calls them like a library kernel.
@torch.library.custom_op("samhq_fast::conv3x3_ln_gelu", mutates_args=())
def _conv3x3_ln_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    return conv3x3_ln_gelu(x, weight, bias, norm_weight, norm_bias, eps)


@_conv3x3_ln_gelu_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, eps):
    return _empty_output(x, weight.shape[0], None)


@torch.library.custom_op("samhq_fast::conv3x3_ln_gelu_project", mutates_args=())
def _conv3x3_ln_gelu_project_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
    projection: torch.Tensor,
) -> torch.Tensor:
    return conv3x3_ln_gelu_project(x, weight, bias, norm_weight, norm_bias, eps, projection)


@_conv3x3_ln_gelu_project_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, eps, projection):
    return _empty_output(x, weight.shape[0], projection)
