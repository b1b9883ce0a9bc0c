"""Flash attention with SAM's decomposed relative-position bias, for windowed and global ViT blocks.

One kernel serves both block kinds: a global block is a single window as large as the token grid.
The kernel reads q/k/v straight from the qkv projection of the REAL tokens [B, H, W, 3C] and
writes the head-merged [B, H, W, C] layout the `proj` linear wants:
- window partition, bottom/right padding and crop are index math, never copies;
- padded tokens (zeros after norm1 in the original) have q = k = v = the qkv bias: padded keys and
  values are taken from the bias and stay in the softmax, exactly as in the original (not masked);
  padded queries are skipped, their outputs would be cropped;
- the bias rel_h[q, ky] + rel_w[q, kx] comes from a small pre-pass over the UNSCALED q
  ([B, heads, H, W, window] each), gathered per (query, key) tile inside the kernel; the N x N bias
  and score matrices never exist in memory;
- head_dim 64 and 80 (vit_h) without padding in memory: the head dim is masked up to a power of two
  in registers only.
"""

import torch
import triton
import triton.language as tl

from samhq_fast.kernels import autotune, interpreting
from samhq_fast.modeling.image_encoder import get_rel_pos

LOG2E = 1.4426950408889634


@triton.jit
def _rel_pos_attention_kernel(
    qkv_ptr,  # [B, H, W, 3 * C]: q | k | v, each head-major (head * HEAD_DIM + d)
    qkv_bias_ptr,  # [3 * C]: the q | k | v of a padded (all-zero) token
    rel_h_ptr,  # [B, heads, H, W, WIN_H] fp32: q . Rh[y % WIN_H, ky]
    rel_w_ptr,  # [B, heads, H, W, WIN_W] fp32: q . Rw[x % WIN_W, kx]
    out_ptr,  # [B, H, W, C]
    sm_scale,
    H, W,  # real token grid
    stride_qkv_b, stride_qkv_y, stride_qkv_x,
    stride_out_b, stride_out_y, stride_out_x,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two (registers only)
    WIN_H: tl.constexpr,
    WIN_W: tl.constexpr,
    WINDOWS_X: tl.constexpr,  # windows per row of the padded grid
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 (no TF32), "tf32" (ignored) for 16-bit inputs
):
    pid_m = tl.program_id(0)  # query tile within the window
    pid_win = tl.program_id(1)  # window: wy * WINDOWS_X + wx
    pid_bh = tl.program_id(2)  # image * NUM_HEADS + head
    b = pid_bh // NUM_HEADS
    head = pid_bh % NUM_HEADS
    wy = pid_win // WINDOWS_X
    wx = pid_win % WINDOWS_X
    TOKENS: tl.constexpr = WIN_H * WIN_W
    C: tl.constexpr = NUM_HEADS * HEAD_DIM

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    # Queries: token t of the window sits at grid (wy * WIN_H + t // WIN_W, wx * WIN_W + t % WIN_W).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qy = wy * WIN_H + offs_m // WIN_W
    qx = wx * WIN_W + offs_m % WIN_W
    q_real = (offs_m < TOKENS) & (qy < H) & (qx < W)  # padded queries: output cropped, skip
    qkv_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + head * HEAD_DIM
    q_ptrs = qkv_base + qy[:, None] * stride_qkv_y + qx[:, None] * stride_qkv_x + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_real[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    # Row (b, head, y, x) of the rel-pos pre-pass for each query.
    rel_row = ((pid_bh.to(tl.int64) * H + qy) * W + qx)

    k_pad = tl.load(qkv_bias_ptr + C + head * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
    v_pad = tl.load(qkv_bias_ptr + 2 * C + head * HEAD_DIM + offs_d, mask=d_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
    for start_n in range(0, TOKENS, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ky_win = offs_n // WIN_W  # key coordinates inside the window (index the rel-pos terms)
        kx_win = offs_n % WIN_W
        ky = wy * WIN_H + ky_win
        kx = wx * WIN_W + kx_win
        k_in = offs_n < TOKENS
        k_real = k_in & (ky < H) & (kx < W)
        kv_offs = ky * stride_qkv_y + kx * stride_qkv_x
        # K^T tile [BLOCK_D, BLOCK_N]; padded keys take the k bias.
        kt = tl.load(qkv_base + C + kv_offs[None, :] + offs_d[:, None], mask=k_real[None, :] & d_mask[:, None], other=0.0)
        kt = tl.where(k_real[None, :], kt, k_pad[:, None].to(kt.dtype))
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        tile_mask = q_real[:, None] & k_in[None, :]
        rel_h = tl.load(rel_h_ptr + rel_row[:, None] * WIN_H + ky_win[None, :], mask=tile_mask, other=0.0)
        rel_w = tl.load(rel_w_ptr + rel_row[:, None] * WIN_W + kx_win[None, :], mask=tile_mask, other=0.0)
        s = s + (rel_h + rel_w) * 1.4426950408889634
        s = tl.where(k_in[None, :], s, float("-inf"))  # only the tail tile past the window's tokens

        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(qkv_base + 2 * C + kv_offs[:, None] + offs_d[None, :], mask=k_real[:, None] & d_mask[None, :], other=0.0)
        v = tl.where(k_real[:, None], v, v_pad[None, :].to(v.dtype))  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + b.to(tl.int64) * stride_out_b + qy[:, None] * stride_out_y + qx[:, None] * stride_out_x \
        + head * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_real[:, None] & d_mask[None, :])


INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64)  # fewer, larger programs: the interpreter pays per op


def candidate_configs(dtype: torch.dtype, tokens: int) -> list[dict]:
    """The pruned GPU config space for `tokens` queries per window, the untuned default first."""
    if dtype == torch.float32:
        # "ieee" fp32 dots run on the FMA units. Compiled offline for sm_90 (triton 3.9), 128x64 fp32
        # tiles with head_dim 80 ask for 262 KB of shared memory (over Hopper's 227 KB); 64x32 takes 107 KB.
        return [dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2), dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
                dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2), dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)]
    # 16-bit inputs on Hopper (wgmma; 49-115 KB shared memory when compiled offline for sm_90). A
    # 14x14 window (196 tokens) fills 4 query tiles of 64 or 2 of 128; a global grid has 4,096 queries.
    small = [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)]
    large = [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2), dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2),
             dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)]
    return small + large if tokens <= 256 else large + small


def rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-pass: q [B, H, W, heads, D] (unscaled) -> rel_h [B, heads, H, W, win_h], rel_w [B, heads, H, W, win_w] (fp32).

    rel_h[b, n, y, x, ky] = q[b, y, x, n] . Rh[y % win_h, ky] with Rh = get_rel_pos(win_h, win_h, rel_pos_h),
    the same terms the reference adds inside each window (a global block is one window of the whole grid).
    """
    _, h, w, _, _ = q.shape
    win_h, win_w = window
    rh = get_rel_pos(win_h, win_h, rel_pos_h.float())[torch.arange(h, device=q.device) % win_h]  # [H, win_h, D]
    rw = get_rel_pos(win_w, win_w, rel_pos_w.float())[torch.arange(w, device=q.device) % win_w]  # [W, win_w, D]
    q = q.float()
    rel_h = torch.einsum("byxnc,ykc->bnyxk", q, rh).contiguous()
    rel_w = torch.einsum("byxnc,xkc->bnyxk", q, rw).contiguous()
    return rel_h, rel_w


def rel_pos_attention(
    qkv: torch.Tensor, qkv_bias: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, num_heads: int, window_size: int
) -> torch.Tensor:
    """Attention of a SAM ViT block from its qkv projection.

    qkv: [B, H, W, 3C] = qkv linear of the (normed) real tokens, channels-last, last dim contiguous.
    qkv_bias: [3C], the qkv of a zero (padded) token. rel_pos_h / rel_pos_w: [2 * win - 1, D] tables.
    window_size: 0 for a global block, else the window side (the grid is padded to a multiple).
    Returns the head-merged attention output [B, H, W, C] (before `proj`), in qkv's dtype.
    """
    if qkv.ndim != 4:
        raise ValueError(f"qkv must be [B, H, W, 3C], got shape {list(qkv.shape)}")
    b, h, w, c3 = qkv.shape
    if c3 % 3 or (c3 // 3) % num_heads:
        raise ValueError(f"qkv last dim {c3} must be 3 * num_heads * head_dim (num_heads={num_heads})")
    c = c3 // 3
    head_dim = c // num_heads
    if qkv_bias.shape != (c3,):
        raise ValueError(f"qkv_bias must have shape [{c3}], got {list(qkv_bias.shape)}")
    if rel_pos_h.ndim != 2 or rel_pos_h.shape[1] != head_dim or rel_pos_w.ndim != 2 or rel_pos_w.shape[1] != head_dim:
        raise ValueError(f"rel_pos_h / rel_pos_w must be [L, {head_dim}], got {list(rel_pos_h.shape)} / {list(rel_pos_w.shape)}")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    if window_size < 0:
        raise ValueError(f"window_size must be >= 0 (0 = global), got {window_size}")
    interpreted = interpreting(qkv, "rel_pos_attention")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    win_h, win_w = (h, w) if window_size == 0 else (window_size, window_size)
    windows_y, windows_x = triton.cdiv(h, win_h), triton.cdiv(w, win_w)

    q = qkv[..., :c].unflatten(-1, (num_heads, head_dim))  # a view: [B, H, W, heads, D]
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, (win_h, win_w))
    bias = qkv_bias.to(qkv.dtype).contiguous()
    out = torch.empty((b, h, w, c), device=qkv.device, dtype=qkv.dtype)
    if b == 0:
        return out

    tokens = win_h * win_w
    block_d = max(16, triton.next_power_of_2(head_dim))

    def launch(config: dict) -> None:
        grid = (triton.cdiv(tokens, config["BLOCK_M"]), windows_y * windows_x, b * num_heads)
        _rel_pos_attention_kernel[grid](
            qkv, bias, rel_h, rel_w, out, head_dim ** -0.5, h, w,
            qkv.stride(0), qkv.stride(1), qkv.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            WIN_H=win_h, WIN_W=win_w, WINDOWS_X=windows_x,
            DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
            **config,
        )

    if interpreted:
        config = INTERPRETER_CONFIG
    else:
        shape_key = (str(qkv.dtype), triton.next_power_of_2(b), h, w, num_heads, head_dim, win_h, win_w)
        config = autotune.pick(
            "rel_pos_attention", shape_key, candidate_configs(qkv.dtype, tokens),
            lambda c: autotune.bench_ms(lambda: launch(c)), qkv.device, autotune.tuning_enabled(qkv.device),
        )
    launch(config)
    return out
