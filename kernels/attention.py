"""Flash attention with SAM's decomposed relative-position bias, for windowed and global ViT blocks.

One kernel serves both block kinds: a global block is a single window as large as the token grid.
The kernel reads q/k/v straight from the qkv projection of the REAL tokens [B, H, W, 3C] and
writes the head-merged [B, H, W, C] layout the `proj` linear wants:
- window partition, bottom/right padding and crop are index math, never copies;
- padded tokens (zeros after norm1 in the original) have q = k = v = the qkv bias: padded keys stay
  in the softmax, exactly as in the original (not masked), scored q . k_bias (one value per query)
  plus their rel-pos bias, and add v_bias times their softmax share to the output; padded queries
  are skipped, their outputs would be cropped. Only the last row and column of windows hold padded
  tokens: the interior windows run in a launch of their own, compiled without that work;
- the bias rel_h[q, ky] + rel_w[q, kx] comes from a small pre-pass kernel over the UNSCALED q
  (`rel_pos_terms`: [B, heads, H, W, window] each, fp32, times log2(e) for the base-2 softmax); the
  N x N bias and score matrices never exist in memory.
  Key tiles are laid over the window's rows (see `_rel_pos_attention_kernel`), so a tile needs one
  rel_h value per query and row, and a contiguous run of rel_w: no per-element gathers. In windowed
  blocks the tuner also weighs REL_DOT tiles: the kernel computes its queries' terms itself (q times
  the tables, then a gather along each row: no pre-pass) and adds the bias on the tensor cores (the
  terms times one-hot key matrices, two more dots per key tile);
- head_dim 64 and 80 (vit_h) without padding: 80 is computed as a 64 part and a 16 part (two dots
  each for q.k and p.v), so the attention kernel holds no head dim padded to 128, in memory or in
  registers (only the small rel-pos pre-pass pads it, in registers, with masked loads).

Register use and shared memory per candidate config were checked offline (compiled for sm_90 with
the launch's real specializations, `cuobjdump -res-usage`): see `candidate_configs`.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from samhq_fast.kernels import FP32_PRECISION, autotune, dot_precision, interpreting, on_device
from samhq_fast.modeling.image_encoder import resize_rel_pos

LOG2E = math.log2(math.e)  # the attention kernel's softmax is in base 2: exp(x) = exp2(x * log2(e))
_LOG2E_IN_KERNEL = tl.constexpr(LOG2E)  # the same, readable inside @triton.jit functions


@triton.jit
def _window_rel_terms(q, q_t, table_ptr, q_win, WIN: tl.constexpr, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
                      TABLE_PAD: tl.constexpr, OUTSIDE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One decomposed-bias term of a tile of queries, for REL_DOT: [BLOCK_M, 16] in q's dtype, column c
    = (q . R[q_win - c + WIN - 1]) * log2(e) for the key row (or column) c < WIN of the window, OUTSIDE
    past it. q / q_t: the unscaled q's head-dim pieces; q_win [BLOCK_M]: the query's row (column) in
    its window; table: [2 * WIN - 1, HEAD_DIM]."""
    offs_table = tl.arange(0, TABLE_PAD)
    offs_c = tl.arange(0, 16)
    offs_d = tl.arange(0, D_MAIN)
    table_in = (offs_table < 2 * WIN - 1)[None, :]
    table_t = tl.load(table_ptr + offs_table[None, :] * HEAD_DIM + offs_d[:, None], mask=table_in & (offs_d < HEAD_DIM)[:, None], other=0.0)
    g = tl.dot(q, table_t, input_precision=DOT_PRECISION)  # [BLOCK_M, TABLE_PAD]: q . R[i] for every relative offset i
    if D_TAIL > 0:
        offs_t = D_MAIN + tl.arange(0, D_TAIL)
        table_tail = tl.load(table_ptr + offs_table[None, :] * HEAD_DIM + offs_t[:, None], mask=table_in, other=0.0)
        g = tl.dot(q_t, table_tail, g, input_precision=DOT_PRECISION)
    offset = tl.minimum(tl.maximum(q_win[:, None] - offs_c[None, :] + WIN - 1, 0), TABLE_PAD - 1)  # [BLOCK_M, 16]
    terms = tl.gather(g, offset, 1) * _LOG2E_IN_KERNEL  # the softmax is in base 2
    return tl.where((offs_c < WIN)[None, :], terms, OUTSIDE).to(q.dtype)


@triton.jit
def _rel_pos_attention_kernel(
    qkv_ptr,  # [B, H, W, 3 * C]: q | k | v, each head-major (head * HEAD_DIM + d)
    qkv_bias_ptr,  # [3 * C]: the q | k | v of a padded (all-zero) token
    rel_h_ptr,  # [B, heads, H, W, WIN_H] fp32: (q . Rh[y % WIN_H, ky]) * log2(e) (the pre-pass; not read with REL_DOT)
    rel_w_ptr,  # [B, heads, H, W, WIN_W] fp32: (q . Rw[x % WIN_W, kx]) * log2(e)
    table_h_ptr,  # [2 * WIN_H - 1, HEAD_DIM] in q's dtype: the rel-pos tables, resized (read with REL_DOT only)
    table_w_ptr,  # [2 * WIN_W - 1, HEAD_DIM]
    out_ptr,  # [B, H, W, C]
    qk_scale,  # head_dim ** -0.5 * log2(e): scores and bias both in base 2, one FMA per score
    H, W,  # real token grid
    stride_qkv_b, stride_qkv_y, stride_qkv_x,
    stride_out_b, stride_out_y, stride_out_x,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,  # power of two: HEAD_DIM, its largest power-of-two part, or HEAD_DIM padded up (masked)
    D_TAIL: tl.constexpr,  # HEAD_DIM - D_MAIN when that is a power of two >= 16 (80 = 64 + 16), else 0
    WIN_H: tl.constexpr,
    WIN_W: tl.constexpr,
    WINDOWS_Y: tl.constexpr,  # the launch's windows: see PADDED_GRID
    WINDOWS_X: tl.constexpr,
    KEY_COLS: tl.constexpr,  # WIN_W rounded up to a power of two
    TILE_ROWS: tl.constexpr,  # window rows per key tile: BLOCK_N // KEY_COLS, or 1 when a tile is part of a row
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REL_W_ONCE: tl.constexpr,  # load the rel_w term once, before the key loop (needs BLOCK_N >= KEY_COLS)
    # The bias terms computed here, not by the pre-pass, and added by the tensor cores, as two more
    # dots into the scores (needs whole rows of <= 16 slots per key tile and <= 16 rows visited:
    # windowed blocks): see the key loop. Overrides REL_W_ONCE.
    REL_DOT: tl.constexpr,
    TABLE_PAD: tl.constexpr,  # 2 * max(WIN_H, WIN_W) - 1 rounded up to a power of two >= 16 (REL_DOT)
    # False: the launch covers the top-left WINDOWS_Y x WINDOWS_X windows: all of a grid the windows
    # tile exactly, or the interior of one they pass (all but the last row and column of windows).
    # True: the last row and column of a WINDOWS_Y x WINDOWS_X grid of windows that pass the token
    # grid (H % WIN_H or W % WIN_W): the only windows that can hold padded keys (work per score).
    PADDED_GRID: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # fp32: "tf32x3" (tuned candidates) or "ieee"; 16-bit: "tf32" (ignored)
):
    # Keys are visited as slots of a [WIN_H, KEY_COLS] grid, BLOCK_N slots per tile: a tile is
    # TILE_ROWS whole window rows (BLOCK_N >= KEY_COLS) or a piece of one row; slots past WIN_W or
    # WIN_H are -inf. Within a tile, the rel_h term takes TILE_ROWS values per query and the rel_w
    # term is a contiguous run of each query's rel_w row.
    pid_m = tl.program_id(0)  # query tile within the window
    pid_win = tl.program_id(1)  # window: see PADDED_GRID
    pid_bh = tl.program_id(2)  # image * NUM_HEADS + head
    b = pid_bh // NUM_HEADS
    head = pid_bh % NUM_HEADS
    if PADDED_GRID:  # the last column of windows, then the rest of the last row
        in_last_col = pid_win < WINDOWS_Y
        wy = tl.where(in_last_col, pid_win, WINDOWS_Y - 1)
        wx = tl.where(in_last_col, WINDOWS_X - 1, pid_win - WINDOWS_Y)
    else:
        wy = pid_win // WINDOWS_X
        wx = pid_win % WINDOWS_X
    C: tl.constexpr = NUM_HEADS * HEAD_DIM

    # Queries: token t of the window sits at grid (wy * WIN_H + t // WIN_W, wx * WIN_W + t % WIN_W).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qy = wy * WIN_H + offs_m // WIN_W
    qx = wx * WIN_W + offs_m % WIN_W
    q_real = (offs_m < WIN_H * WIN_W) & (qy < H) & (qx < W)  # padded queries: output cropped, skip
    head_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + head * HEAD_DIM
    q_offs = qy * stride_qkv_y + qx * stride_qkv_x  # [BLOCK_M]
    offs_d = tl.arange(0, D_MAIN)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(head_base + q_offs[:, None] + offs_d[None, :], mask=q_real[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, D_MAIN], tl.float32)
    if D_TAIL > 0:  # the head dims D_MAIN .. HEAD_DIM - 1
        offs_t = D_MAIN + tl.arange(0, D_TAIL)
        q_t = tl.load(head_base + q_offs[:, None] + offs_t[None, :], mask=q_real[:, None], other=0.0)
        acc_t = tl.zeros([BLOCK_M, D_TAIL], tl.float32)
    if PADDED_GRID:
        # Every padded key is k_bias: its q . k is one value per query ([BLOCK_M], fp32). Padded key
        # slots load as zeros and take this score instead; their value v_bias is added once, after
        # the loop, weighted by their running softmax mass `pad_mass`. The k / v tiles themselves
        # are never edited, so they go from memory to shared memory to the tensor cores (a select
        # on them would take every tile through registers and back).
        k_pad = tl.load(qkv_bias_ptr + C + head * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        q_dot_k_pad = tl.sum(q.to(tl.float32) * k_pad.to(tl.float32)[None, :], 1)
        if D_TAIL > 0:
            k_pad_t = tl.load(qkv_bias_ptr + C + head * HEAD_DIM + offs_t)
            q_dot_k_pad += tl.sum(q_t.to(tl.float32) * k_pad_t.to(tl.float32)[None, :], 1)
        pad_mass = tl.zeros([BLOCK_M], tl.float32)
    rel_row = (pid_bh.to(tl.int64) * H + qy) * W + qx  # [BLOCK_M] row (b, head, y, x) of the pre-pass

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    offs_j = tl.arange(0, BLOCK_N)
    if REL_DOT:
        # The bias rel_h[q, ky] + rel_w[q, kx] of a key slot is [BLOCK_M, 16] terms times one-hot
        # [16, BLOCK_N] matrices (c == ky, c == kx): two more dots into the scores on the tensor cores,
        # instead of a bias tile built by selects and adds per score. The terms come from the
        # unscaled q: g = q @ table^T ([BLOCK_M, TABLE_PAD], every relative offset), then
        # rel_h[q, ky] = g_h[q, qy - ky + WIN_H - 1] (get_rel_pos of a window with itself), a gather
        # along the row. Slots outside the window (rows past WIN_H, columns past WIN_W) take the term
        # OUTSIDE: their exp2 is 0, no select per score.
        tl.static_assert(BLOCK_N >= KEY_COLS and KEY_COLS <= 16 and (WIN_H + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS <= 16,
                         "REL_DOT needs whole window rows of <= 16 slots per key tile, and <= 16 rows visited")
        OUTSIDE: tl.constexpr = -65504.0 if q.dtype == tl.float16 else -1.0e30  # finite in q's dtype: 0 * OUTSIDE = 0
        offs_c = tl.arange(0, 16)
        q_win_y, q_win_x = offs_m // WIN_W, offs_m % WIN_W  # the query's place in its window
        q_tail = q_t if D_TAIL > 0 else q  # (not read without a tail)
        rel_h_terms = _window_rel_terms(q, q_tail, table_h_ptr, q_win_y, WIN_H, HEAD_DIM, D_MAIN, D_TAIL, TABLE_PAD, OUTSIDE, DOT_PRECISION)
        rel_w_terms = _window_rel_terms(q, q_tail, table_w_ptr, q_win_x, WIN_W, HEAD_DIM, D_MAIN, D_TAIL, TABLE_PAD, OUTSIDE, DOT_PRECISION)
        col_onehot = (offs_c[:, None] == (offs_j % KEY_COLS)[None, :]).to(q.dtype)  # [16, BLOCK_N]
        # the scores come out of the dots in log2 units, as from (q * scale) @ k^T in the original
        q = (q * qk_scale).to(q.dtype)
        if D_TAIL > 0:
            q_t = (q_t * qk_scale).to(q_t.dtype)
        if PADDED_GRID:
            q_dot_k_pad *= qk_scale
    if REL_W_ONCE and not REL_DOT:
        # Tiles of whole window rows all see the columns kx_win = j % KEY_COLS: one rel_w tile serves
        # the whole loop. Per tile it is more bytes than k and v together (fp32 [BLOCK_M, BLOCK_N]),
        # read 64 times in a global block; held, it costs ~32 more registers per thread.
        tl.static_assert(BLOCK_N >= KEY_COLS, "REL_W_ONCE needs whole window rows per key tile")
        kx_tile = offs_j % KEY_COLS
        rel_w_tile = tl.load(rel_w_ptr + rel_row[:, None] * WIN_W + kx_tile[None, :], mask=q_real[:, None] & (kx_tile < WIN_W)[None, :], other=0.0)
    for start in range(0, WIN_H * KEY_COLS, BLOCK_N):
        slot = start + offs_j
        ky_win = slot // KEY_COLS  # key coordinates inside the window (index the rel-pos terms)
        kx_win = slot % KEY_COLS
        ky = wy * WIN_H + ky_win
        kx = wx * WIN_W + kx_win
        k_in = (ky_win < WIN_H) & (kx_win < WIN_W)
        k_real = k_in & (ky < H) & (kx < W)
        kv_offs = ky * stride_qkv_y + kx * stride_qkv_x  # [BLOCK_N]
        # K^T tile [D, BLOCK_N]; padded keys load as zeros (scored below), slots outside the window too (-inf below)
        kt = tl.load(head_base + C + kv_offs[None, :] + offs_d[:, None], mask=k_real[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if D_TAIL > 0:
            kt_t = tl.load(head_base + C + kv_offs[None, :] + offs_t[:, None], mask=k_real[None, :], other=0.0)
            s = tl.dot(q_t, kt_t, s, input_precision=DOT_PRECISION)
        if PADDED_GRID:
            s = tl.where(k_real[None, :], s, q_dot_k_pad[:, None])  # padded keys score q . k_bias

        if REL_DOT:
            s = tl.dot(rel_h_terms, (offs_c[:, None] == ky_win[None, :]).to(q.dtype), s, input_precision=DOT_PRECISION)
            s = tl.dot(rel_w_terms, col_onehot, s, input_precision=DOT_PRECISION)
        else:
            if REL_W_ONCE:
                bias = rel_w_tile  # slots past WIN_H hold real rel_w values here: they are set to -inf below
            else:
                bias = tl.load(rel_w_ptr + rel_row[:, None] * WIN_W + kx_win[None, :], mask=q_real[:, None] & k_in[None, :], other=0.0)
            # The rel_h term: one value per query and window row of the tile. With a held rel_w tile
            # (REL_W_ONCE) and one row per tile (global blocks), it is added to the row max and
            # subtracted from the max the exponent takes, not added to every score. Otherwise one
            # add per score (adding where(row == r, rel_h, 0.0) for every row costs TILE_ROWS adds:
            # x + 0.0 does not fold away): a freshly loaded rel_w tile takes the add in place; a held
            # one is not rewritten: the rows' values are selected into one tile, added once. Each
            # form issues the fewer instructions per key tile in its case (sm_90 SASS, Triton 3.6 and 3.9).
            for r in tl.static_range(TILE_ROWS):
                row = tl.minimum(start // KEY_COLS + r, WIN_H - 1)  # rows past WIN_H: slots are -inf anyway
                rel_h = tl.load(rel_h_ptr + rel_row * WIN_H + row, mask=q_real, other=0.0)  # [BLOCK_M]
                in_row = (offs_j // KEY_COLS == r)[None, :]
                if TILE_ROWS == 1 and REL_W_ONCE:
                    row_term = rel_h
                elif TILE_ROWS == 1:
                    bias += rel_h[:, None]
                elif REL_W_ONCE:
                    if r == 0:
                        rel_h_tile = rel_h[:, None]
                    else:
                        rel_h_tile = tl.where(in_row, rel_h[:, None], rel_h_tile)
                else:
                    bias = tl.where(in_row, bias + rel_h[:, None], bias)
            if REL_W_ONCE and TILE_ROWS > 1:
                bias += rel_h_tile
            s = s * qk_scale + bias
            s = tl.where(k_in[None, :], s, float("-inf"))  # slots outside the window

        if TILE_ROWS == 1 and REL_W_ONCE and not REL_DOT:  # the scores still lack row_term
            m_new = tl.maximum(m_i, tl.max(s, 1) + row_term)
            p = tl.exp2(s - (m_new - row_term)[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PADDED_GRID:
            # p is 0 outside the window: the rest of the slots that are not real keys are padded keys
            pad_mass = pad_mass * alpha + tl.sum(tl.where(k_real[None, :], 0.0, p), 1)
        v = tl.load(head_base + 2 * C + kv_offs[:, None] + offs_d[None, :], mask=k_real[:, None] & d_mask[None, :], other=0.0)
        p = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        if D_TAIL > 0:
            v_t = tl.load(head_base + 2 * C + kv_offs[:, None] + offs_t[None, :], mask=k_real[:, None], other=0.0)
            acc_t = acc_t * alpha[:, None] + tl.dot(p, v_t, input_precision=DOT_PRECISION)
        m_i = m_new
    if PADDED_GRID:  # the padded keys' values: v_bias times their share of the softmax
        v_pad = tl.load(qkv_bias_ptr + 2 * C + head * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        acc += pad_mass[:, None] * v_pad.to(tl.float32)[None, :]
        if D_TAIL > 0:
            v_pad_t = tl.load(qkv_bias_ptr + 2 * C + head * HEAD_DIM + offs_t)
            acc_t += pad_mass[:, None] * v_pad_t.to(tl.float32)[None, :]

    out_base = out_ptr + b.to(tl.int64) * stride_out_b + head * HEAD_DIM
    out_offs = qy * stride_out_y + qx * stride_out_x
    out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_base + out_offs[:, None] + offs_d[None, :], out, mask=q_real[:, None] & d_mask[None, :])
    if D_TAIL > 0:
        out_t = (acc_t / l_i[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_base + out_offs[:, None] + offs_t[None, :], out_t, mask=q_real[:, None])


INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64)  # fewer, larger programs: the interpreter pays per op
# CUDA's limit on a grid's 2nd and 3rd dimensions. Both kernels put image x head on the 3rd: vit_h's
# 16 heads reach it at 4,096 images (a batch only a small custom image size can hold in memory).
MAX_GRID_YZ = 65535


def batch_chunks(batch: int, num_heads: int) -> list[slice]:
    """Image slices small enough that images x heads fits a grid dimension (one launch each)."""
    step = max(1, MAX_GRID_YZ // num_heads)
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def _config(m: int, n: int, warps: int, stages: int, rel_w_once: bool = False, rel_dot: bool = False, precision: str | None = None) -> dict:
    config = dict(BLOCK_M=m, BLOCK_N=n, REL_W_ONCE=rel_w_once, REL_DOT=rel_dot, num_warps=warps, num_stages=stages)
    if precision is not None:  # tl.dot's input_precision, else `dot_precision` of the dtype
        config["DOT_PRECISION"] = precision
    return config


def candidate_configs(dtype: torch.dtype, global_block: bool = False) -> list[dict]:
    """The pruned GPU config space of a windowed or a global block, the untuned default first.

    Compiled offline for sm_90 with Triton 3.6 and 3.9 (with a real launch's 16-divisibility
    specializations) at vit_b / vit_h windowed and global shapes, every candidate offered runs
    without a stack (no spilled registers; the global-only tile aside, see its comment): the 16-bit
    ones take 110-255 registers and at most 148 KiB of shared memory, the fp32 ones 159-255 registers.
    REL_W_ONCE (the rel_w tile held in registers through the key loop) takes 182-250
    registers in the 8-warp 128x64 tiles (one CTA per SM either way). The 4-warp 64x64 tiles could
    hold it too (194-251 registers) but are not offered it, to keep first-call tuning short.
    """
    if dtype == torch.float32:
        # fp32 dots as "tf32x3" (`FP32_PRECISION`: three tensor-core products per dot): q, the
        # probabilities and their TF32 remainders take registers, so the tiles are narrow. Compiled
        # offline for sm_90 (Triton 3.6 and 3.9), these have no stack at vit_b / vit_h shapes
        # (159-255 registers); 32-key tiles spill at vit_h's windows (8-64 bytes), 64-key ones
        # hundreds of bytes. Global blocks also take 32-key tiles (no stack there).
        fp32 = functools.partial(_config, precision=FP32_PRECISION)
        narrow = [fp32(128, 16, 8, 2), fp32(64, 16, 4, 2)]
        if global_block:  # (REL_W_ONCE needs whole window rows: 64 keys there)
            return narrow + [fp32(128, 32, 8, 2), fp32(64, 32, 4, 2)]
        return narrow + [fp32(128, 16, 8, 2, rel_w_once=True)]
    # 16-bit inputs on Hopper (wgmma). A 14x14 window is 2 query tiles of 128 or 4 of 64; its keys
    # are 4 tiles of 64 slots (4 rows of 16) or 7 of 32; a global 64x64 grid is 4,096 queries and
    # 64 key tiles of one row (BLOCK_N 64) or 128 of half a row (32). 256 x 32 holds a whole window
    # in one program (k, v and the rel-pos terms read once per window and head, not once per query
    # tile; 222-255 registers, no stack); 256 x 64 spills.
    configs = [_config(128, 64, 8, 2), _config(128, 64, 8, 2, rel_w_once=True), _config(128, 64, 8, 3),
               _config(128, 64, 8, 3, rel_w_once=True), _config(64, 64, 4, 2), _config(64, 64, 4, 3), _config(256, 32, 8, 2)]
    if global_block:
        # Half-row key tiles (64 x 32 won vit_b's global shape on the H200), and key tiles of two grid
        # rows (half the loop trips): 223-236 registers, no stack (Triton 3.9; 3.6: 254-255, 24 bytes
        # of stack at vit_h) and 145-165 KiB. Windowed blocks, which also score padded keys, spill
        # with those unless the bias is a dot (below).
        return configs + [_config(128, 32, 8, 2), _config(64, 32, 4, 3), _config(128, 128, 8, 2)]
    # Windowed blocks (rows of 16 key slots): the bias terms computed in the kernel and added by two
    # more dots (REL_DOT; no pre-pass launches), which frees the registers of the bias tile (vit_h
    # 128x64: 177-230 instead of 226-250) and issues 19-40% fewer instructions per key-loop trip than
    # REL_W_ONCE at the same tile, ~400 more once per program (sm_90 SASS, bench/NOTES.md prediction
    # 29). Without the bias tile 128 x 128 fits (a window's 224 key slots in 2 trips, not 4): 220-255
    # registers, no stack. 256 x 32 spills with REL_DOT.
    return configs + [_config(128, 64, 8, 2, rel_dot=True), _config(128, 64, 8, 3, rel_dot=True), _config(64, 64, 4, 3, rel_dot=True),
                      _config(128, 128, 8, 2, rel_dot=True)]


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(D_MAIN, D_TAIL): the kernel's two power-of-two pieces of the head dim (see the kernel)."""
    main = 1 << (head_dim.bit_length() - 1)  # largest power of two <= head_dim
    tail = head_dim - main
    if tail == 0 and main >= 16:
        return main, 0
    if tail >= 16 and tail & (tail - 1) == 0:
        return main, tail
    return max(16, triton.next_power_of_2(head_dim)), 0  # tl.dot needs >= 16; the pad is masked


@triton.jit
def _rel_pos_terms_kernel(
    q_ptr,  # qkv [B, H, W, 3C]: q of head n at channels n * HEAD_DIM + d (only the q part is read)
    table_ptr,  # [2 * WIN - 1, HEAD_DIM] contiguous: the rel-pos table along the line axis
    out_ptr,  # [B, heads, H, W, WIN] fp32
    scale,  # multiplies the terms
    RUNS,  # tokens along the run axis
    stride_q_b, stride_q_line, stride_q_run,
    stride_out_bh, stride_out_line, stride_out_run,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two >= 16 (masked)
    WIN: tl.constexpr,  # window side along the line axis (the grid side for a global block)
    WIN_PAD: tl.constexpr,  # WIN rounded up to a power of two >= 16 (masked)
    BLOCK_RUN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One term of the decomposed bias for BLOCK_RUN tokens of one grid line. rel_h: the line is a
    # grid row y and the run goes along x; rel_w: the line is a column x and the run goes along y.
    # Every token of a line has the same position inside its window (line % WIN), so they share the
    # table rows R[k] = table[line % WIN - k + WIN - 1] (get_rel_pos with equal sizes): one small dot.
    pid_run = tl.program_id(0)
    line = tl.program_id(1)
    pid_bh = tl.program_id(2)  # image * NUM_HEADS + head
    b = pid_bh // NUM_HEADS
    head = pid_bh % NUM_HEADS
    offs_r = pid_run * BLOCK_RUN + tl.arange(0, BLOCK_RUN)
    offs_d = tl.arange(0, D_PAD)
    offs_k = tl.arange(0, WIN_PAD)
    run_in, d_in, k_in = offs_r < RUNS, offs_d < HEAD_DIM, offs_k < WIN
    q_row = q_ptr + b.to(tl.int64) * stride_q_b + line * stride_q_line + head * HEAD_DIM
    q = tl.load(q_row + offs_r[:, None] * stride_q_run + offs_d[None, :], mask=run_in[:, None] & d_in[None, :], other=0.0)
    table_rows = line % WIN - offs_k + WIN - 1  # [WIN_PAD]
    table_t = tl.load(table_ptr + table_rows[None, :] * HEAD_DIM + offs_d[:, None], mask=k_in[None, :] & d_in[:, None], other=0.0)
    terms = tl.dot(q, table_t.to(q.dtype), input_precision=DOT_PRECISION) * scale  # [BLOCK_RUN, WIN_PAD] fp32
    out_row = out_ptr + pid_bh.to(tl.int64) * stride_out_bh + line * stride_out_line
    tl.store(out_row + offs_r[:, None] * stride_out_run + offs_k[None, :], terms, mask=run_in[:, None] & k_in[None, :])


def _checked_qkv(
    qkv: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, num_heads: int, who: str,
) -> tuple[torch.Tensor, int, bool]:
    """The checks both launchers share -> (qkv with a contiguous last dim, head_dim, interpreting?).
    The kernels read a head's q / k / v as unit-stride runs and the tables at a pitch of head_dim."""
    if qkv.ndim != 4:
        raise ValueError(f"{who}: qkv must be [B, H, W, 3C], got shape {list(qkv.shape)}")
    c3 = qkv.shape[3]
    if qkv.shape[1] == 0 or qkv.shape[2] == 0:
        raise ValueError(f"{who}: qkv has an empty token grid: shape {list(qkv.shape)}")
    if num_heads < 1 or c3 == 0 or c3 % 3 or (c3 // 3) % num_heads:
        raise ValueError(f"{who}: qkv last dim {c3} must be 3 * num_heads * head_dim (num_heads={num_heads})")
    head_dim = c3 // 3 // num_heads
    if rel_pos_h.ndim != 2 or rel_pos_h.shape[1] != head_dim or rel_pos_w.ndim != 2 or rel_pos_w.shape[1] != head_dim:
        raise ValueError(f"{who}: rel_pos_h / rel_pos_w must be [L, {head_dim}], got {list(rel_pos_h.shape)} / {list(rel_pos_w.shape)}")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{who}: qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    interpreted = interpreting(qkv, who)
    return (qkv if qkv.stride(-1) == 1 else qkv.contiguous()), head_dim, interpreted


def rel_pos_terms_config(dtype: torch.dtype) -> tuple[int, int]:
    """(tokens per pre-pass program, warps): fixed, not tuned (the pre-pass is under 1% of a block's FLOPs).

    Checked offline for sm_90 like `candidate_configs`: no stack at vit_b / vit_h shapes. fp32 ("ieee"
    dots on the FMA units) spills kilobytes with 32- or 64-token programs of 4 warps at vit_h's global
    blocks, and 200 bytes with 32 tokens and 8 warps under Triton 3.6.
    """
    return (16, 8) if dtype == torch.float32 else (64, 4)


def rel_pos_terms(
    qkv: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, num_heads: int, window: tuple[int, int], scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-pass of the decomposed bias from the UNSCALED q inside qkv [B, H, W, 3C] (copied first if
    its last dim is strided).

    Returns rel_h [B, heads, H, W, win_h] and rel_w [B, heads, H, W, win_w] (fp32) with
    rel_h[b, n, y, x, ky] = q[b, y, x, n] . Rh[y % win_h, ky], Rh = get_rel_pos(win_h, win_h, rel_pos_h):
    the terms the reference adds inside each window (a global block is one window of the grid), times
    `scale` (the attention kernel asks for log2(e): its softmax is in base 2).
    Two launches of one kernel (rows, then columns) that read q where the qkv projection wrote it.
    """
    qkv, head_dim, _ = _checked_qkv(qkv, rel_pos_h, rel_pos_w, num_heads, "rel_pos_terms")
    if window[0] < 1 or window[1] < 1:
        raise ValueError(f"rel_pos_terms: window must be (win_h, win_w) >= 1, got {window}")
    return _launch_rel_pos_terms(qkv, head_dim, rel_pos_h, rel_pos_w, num_heads, window, scale)


def _launch_rel_pos_terms(
    qkv: torch.Tensor, head_dim: int, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, num_heads: int, window: tuple[int, int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rel_pos_terms` on inputs `_checked_qkv` has passed (rel_pos_attention checks them once for both)."""
    b, h, w, _ = qkv.shape
    win_h, win_w = window
    rel_h = torch.empty((b, num_heads, h, w, win_h), device=qkv.device, dtype=torch.float32)
    rel_w = torch.empty((b, num_heads, h, w, win_w), device=qkv.device, dtype=torch.float32)
    if b == 0:
        return rel_h, rel_w
    d_pad = max(16, triton.next_power_of_2(head_dim))
    run_block, warps = rel_pos_terms_config(qkv.dtype)
    # (output, table, window, line count, run count, q strides (line, run), output strides (line, run))
    terms = ((rel_h, rel_pos_h, win_h, h, w, qkv.stride(1), qkv.stride(2), rel_h.stride(2), rel_h.stride(3)),
             (rel_w, rel_pos_w, win_w, w, h, qkv.stride(2), qkv.stride(1), rel_w.stride(3), rel_w.stride(2)))
    for out, table, win, lines, runs, q_line, q_run, out_line, out_run in terms:
        table = resize_rel_pos(table, 2 * win - 1).contiguous()
        block_run = min(run_block, max(16, triton.next_power_of_2(runs)))
        with on_device(qkv):
            for images in batch_chunks(b, num_heads):
                _rel_pos_terms_kernel[(triton.cdiv(runs, block_run), lines, (images.stop - images.start) * num_heads)](
                    qkv[images], table, out[images], scale, runs,
                    qkv.stride(0), q_line, q_run,
                    out.stride(1), out_line, out_run,
                    NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_PAD=d_pad,
                    WIN=win, WIN_PAD=max(16, triton.next_power_of_2(win)), BLOCK_RUN=block_run,
                    DOT_PRECISION=dot_precision(qkv.dtype),
                    num_warps=warps,
                )
    return rel_h, rel_w


def rel_pos_attention(
    qkv: torch.Tensor, qkv_bias: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, num_heads: int, window_size: int,
    config: dict | None = None,
) -> torch.Tensor:
    """Attention of a SAM ViT block from its qkv projection.

    qkv: [B, H, W, 3C] = qkv linear of the (normed) real tokens, channels-last (copied first if its last dim is strided).
    qkv_bias: [3C], the qkv of a zero (padded) token. rel_pos_h / rel_pos_w: [L, D] tables (resized
    to 2 * win - 1 rows when L differs, as the original does).
    window_size: 0 for a global block, else the window side (the grid is padded to a multiple).
    config: launch config {BLOCK_M, BLOCK_N (powers of two >= 16), num_warps, num_stages, optional
    REL_W_ONCE and REL_DOT (used where a key tile holds whole window rows: BLOCK_N >= window width
    rounded up to a power of two; REL_DOT also needs that at most 16, and the key loop to visit at
    most 16 rows)}; None picks one (tuned per GPU and shape, see `candidate_configs`;
    INTERPRETER_CONFIG in the interpreter).
    Returns the head-merged attention output [B, H, W, C] (before `proj`), in qkv's dtype.
    """
    qkv, head_dim, interpreted = _checked_qkv(qkv, rel_pos_h, rel_pos_w, num_heads, "rel_pos_attention")
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    if qkv_bias.shape != (c3,):
        raise ValueError(f"qkv_bias must have shape [{c3}], got {list(qkv_bias.shape)}")
    if window_size < 0:
        raise ValueError(f"window_size must be >= 0 (0 = global), got {window_size}")
    if config is not None and not all(config.get(k, 0) >= 16 and triton.next_power_of_2(config[k]) == config[k] for k in ("BLOCK_M", "BLOCK_N")):
        raise ValueError(f"config BLOCK_M / BLOCK_N must be powers of two >= 16, got {config}")
    win_h, win_w = (h, w) if window_size == 0 else (window_size, window_size)
    windows_y, windows_x = triton.cdiv(h, win_h), triton.cdiv(w, win_w)

    bias = qkv_bias.to(qkv.dtype).contiguous()
    out = torch.empty((b, h, w, c), device=qkv.device, dtype=qkv.dtype)
    if b == 0:
        return out

    d_main, d_tail = split_head_dim(head_dim)
    key_cols = triton.next_power_of_2(win_w)
    if h % win_h == 0 and w % win_w == 0:
        window_sets = [(windows_y, windows_x, False)]
    else:  # the interior windows hold no padded tokens: a launch of their own skips the padded-key work
        window_sets = [(windows_y - 1, windows_x - 1, False), (windows_y, windows_x, True)]

    def launch(config: dict) -> None:
        tile_rows = max(1, config["BLOCK_N"] // key_cols)
        whole_rows = config["BLOCK_N"] >= key_cols
        rel_dot = config.get("REL_DOT", False) and whole_rows and key_cols <= 16 and triton.cdiv(win_h, tile_rows) * tile_rows <= 16
        kernel_config = {"DOT_PRECISION": dot_precision(qkv.dtype), **config,
                         "REL_W_ONCE": config.get("REL_W_ONCE", False) and whole_rows, "REL_DOT": rel_dot}
        if rel_dot:  # the kernel computes the terms from the tables; no pre-pass
            tables = [resize_rel_pos(t, 2 * win - 1).to(qkv.dtype).contiguous() for t, win in ((rel_pos_h, win_h), (rel_pos_w, win_w))]
            rel_h = rel_w = qkv  # not read
        else:  # run per launch, so that the tuner times it with the candidates that need it
            rel_h, rel_w = _launch_rel_pos_terms(qkv, head_dim, rel_pos_h, rel_pos_w, num_heads, (win_h, win_w), LOG2E)
            tables = [qkv, qkv]  # not read
        for rows, cols, padded_grid in window_sets:
            windows = rows + cols - 1 if padded_grid else rows * cols
            if windows == 0:  # one row or column of windows: no interior
                continue
            for images in batch_chunks(b, num_heads):
                grid = (triton.cdiv(win_h * win_w, config["BLOCK_M"]), windows, (images.stop - images.start) * num_heads)
                _rel_pos_attention_kernel[grid](
                    qkv[images], bias, rel_h[images], rel_w[images], *tables, out[images], head_dim ** -0.5 * LOG2E, h, w,
                    qkv.stride(0), qkv.stride(1), qkv.stride(2),
                    out.stride(0), out.stride(1), out.stride(2),
                    NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_MAIN=d_main, D_TAIL=d_tail,
                    WIN_H=win_h, WIN_W=win_w, WINDOWS_Y=rows, WINDOWS_X=cols,
                    KEY_COLS=key_cols, TILE_ROWS=tile_rows, PADDED_GRID=padded_grid,
                    TABLE_PAD=max(16, triton.next_power_of_2(2 * max(win_h, win_w) - 1)),
                    **kernel_config,
                )

    with on_device(qkv):
        if config is not None or interpreted:
            launch(config if config is not None else INTERPRETER_CONFIG)
        else:
            shape_key = (str(qkv.dtype), triton.next_power_of_2(b), h, w, num_heads, head_dim, win_h, win_w)
            autotune.run("rel_pos_attention", shape_key, candidate_configs(qkv.dtype, global_block=window_size == 0), launch, qkv.device)
    return out
