"""The Triton rel-pos attention kernel against the eager block attention (window partition, padding,
SDPA with the decomposed bias, unpartition) computed in float64.

Under the interpreter (CPU) only fp32 and fp16: `tl.dot` on bf16 is broken there (triton #11584);
bf16 runs in the GPU tests. Shapes are small but awkward: padded windows, head_dim 80, grids that
are not powers of two, several images.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from samhq_fast.kernels import attention
from samhq_fast.kernels.attention import LOG2E, rel_pos_attention, rel_pos_terms, split_head_dim
from samhq_fast.modeling.image_encoder import Attention, decomposed_rel_pos_bias, get_rel_pos, window_partition, window_unpartition


def make_attention(dim: int, heads: int, attn_size: tuple[int, int], seed: int) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(dim, heads, attn_size)
    with torch.no_grad():  # rel-pos tables and the qkv bias (= padded tokens' q/k/v) must matter
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
        attn.qkv.bias.normal_(0, 0.5)
    return attn.eval()


def eager_block_attention(attn: Attention, x: torch.Tensor, window: int) -> torch.Tensor:
    """What Block.forward does around attn (minus the residual): [B, H, W, C] -> [B, H, W, C]."""
    if window == 0:
        return attn(x)
    padded, padded_hw = window_partition(x, window)
    return window_unpartition(attn(padded), window, padded_hw, x.shape[1:3])


def kernel_block_attention(attn: Attention, x: torch.Tensor, window: int, config: dict | None = None) -> torch.Tensor:
    heads = rel_pos_attention(attn.qkv(x), attn.qkv.bias, attn.rel_pos_h, attn.rel_pos_w, attn.num_heads, window, config)
    return attn.proj(heads)


def check(batch, grid, dim, heads, window, dtype, atol, rtol, device="cpu", seed=0, config=None):
    """grid: the token grid's side, or (H, W)."""
    grid_h, grid_w = (grid, grid) if isinstance(grid, int) else grid
    attn = make_attention(dim, heads, (window, window) if window else (grid_h, grid_w), seed).to(device)
    x = torch.randn(batch, grid_h, grid_w, dim, device=device)
    with torch.no_grad():
        expected = eager_block_attention(attn.double(), x.double(), window)
        attn = attn.to(dtype)
        got = kernel_block_attention(attn, x.to(dtype), window, config)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)


# (dtype, atol, rtol): fp32 accumulates like the reference up to summation order; fp16 rounds q/k/v,
# the probabilities and the output to 11 bits.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 5e-3, 5e-3)]

SHAPES = {
    # batch, grid, dim, heads, window
    "window14_pad16_hd80": (1, 16, 160, 2, 14),  # 16x16 grid -> 28x28, 4 windows, 3/4 of them padded
    "window14_pad16_hd64_3img": (3, 16, 128, 2, 14),
    "window5_pad12_hd64": (2, 12, 64, 1, 5),  # 12 -> 15: 9 windows of 25 tokens (tail tile)
    "global9_hd80_3img": (3, 9, 160, 2, 0),  # 81 tokens: not a power of two, tail tiles
    "global12_hd64_3img": (3, 12, 128, 2, 0),
    "window_equals_grid": (1, 14, 64, 1, 14),  # one unpadded window == global attention
    "window7_wide_9x20_2img": (2, (9, 20), 64, 2, 7),  # 2 x 3 windows: rows and columns of windows differ
    "window7_tall_20x9": (1, (20, 9), 64, 2, 7),  # 3 x 2 windows
}


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_eager(shape, dtype, atol, rtol):
    check(*SHAPES[shape], dtype, atol, rtol)


# The kernel visits keys as slots of a [window rows, next_pow2(window cols)] grid, BLOCK_N slots per
# tile, and splits the head dim into power-of-two pieces (80 = 64 + 16, 48 = 32 + 16) or pads it in
# registers (40 -> 64, 24 -> 32). The shapes above run the interpreter's 64-slot tiles; these force
# one row, part of a row and rows past the window per tile, each with the three ways to add the bias:
# rel_w loaded per tile, once for the whole key loop (REL_W_ONCE), or terms computed in the kernel and
# added by two dots with one-hot key matrices (REL_DOT: no pre-pass). The launcher uses REL_W_ONCE
# only where a tile holds whole rows, REL_DOT only where they are also at most 16 slots wide and the
# key loop visits at most 16 rows.
LAYOUTS = {
    # batch, (grid h, w), dim, heads, window, (BLOCK_M, BLOCK_N), the bias modes the launcher uses there
    "one_row_per_tile_hd48": (1, (5, 13), 96, 2, 0, (32, 16), {"rel_w_once", "rel_dot"}),  # 13 cols -> 16 slots: one row a tile
    "quarter_rows_last_tile_empty_hd40": (1, (3, 33), 40, 1, 0, (64, 16), set()),  # 33 -> 64 slots: 48..63 all padding
    "one_row_per_tile_padded_windows_hd24": (1, (11, 11), 48, 2, 10, (32, 16), {"rel_w_once", "rel_dot"}),  # 10 -> 16 slots, windows padded
    "rows_past_the_window_hd80": (1, (10, 10), 160, 2, 5, (32, 64), {"rel_w_once", "rel_dot"}),  # 5 -> 8 slots: 8 rows a tile, 3 past the window
    "two_rows_per_tile_padded_windows": (1, (9, 9), 64, 1, 7, (32, 16), {"rel_w_once", "rel_dot"}),  # 7 -> 8 slots: 2 rows a tile, the last 1 past
    "rows_wider_than_16_slots": (1, (3, 20), 64, 1, 0, (32, 32), {"rel_w_once"}),  # 20 -> 32 slots: one row a tile, too wide for REL_DOT
    "more_than_16_rows_per_tile": (1, (6, 6), 64, 1, 3, (16, 128), {"rel_w_once"}),  # 3 -> 4 slots: 32 rows a tile, too many for REL_DOT
}
BIAS_MODES = {"rel_w_per_tile": {}, "rel_w_once": dict(REL_W_ONCE=True), "rel_dot": dict(REL_DOT=True)}


@pytest.mark.parametrize("bias_mode", list(BIAS_MODES))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_key_tile_and_head_dim_layouts(layout, dtype, atol, rtol, bias_mode, kernel_spies):
    *shape, (block_m, block_n), modes_used = LAYOUTS[layout]
    check(*shape, dtype, atol, rtol, config=dict(BLOCK_M=block_m, BLOCK_N=block_n, **BIAS_MODES[bias_mode]))
    rel_w_once, rel_dot = (bias_mode == mode and mode in modes_used for mode in ("rel_w_once", "rel_dot"))
    launches = kernel_spies["attention"].launches  # padded windows: interior and border windows apart
    assert launches and all((launch["BLOCK_M"], launch["BLOCK_N"], launch["REL_W_ONCE"], launch["REL_DOT"]) == (block_m, block_n, rel_w_once, rel_dot)
                            for launch in launches)  # the config asked for is the one that ran
    assert len(kernel_spies["rel_pos_terms"].launches) == (0 if rel_dot else 2)  # REL_DOT computes the terms itself


# (PADDED_GRID, windows) per launch: windows that pass the grid (2 x 3 of 7 over 9 x 20) run the
# interior ones (1 x 2) without the padded-key work and the last row and column (2 + 3 - 1) with it
@pytest.mark.parametrize("grid, window, launches", [
    (12, 0, [(False, 1)]), (14, 14, [(False, 1)]), ((14, 21), 7, [(False, 6)]),
    ((9, 20), 7, [(False, 2), (True, 4)]), ((5, 20), 7, [(True, 3)]), ((20, 5), 7, [(True, 3)]),
], ids=["global", "one_window", "windows_tile_the_grid", "windows_pass_the_grid", "one_row_of_windows", "one_column_of_windows"])
def test_padded_keys_only_where_windows_pass_the_grid(grid, window, launches, kernel_spies):
    """The kernel's padded-key path (padded slots scored q . k_bias, v_bias added after the key loop
    by their softmax mass) runs only for the windows that reach past the token grid, and is right there."""
    check(2, grid, 64, 2, window, torch.float32, 1e-5, 1e-5)
    assert [(launch["PADDED_GRID"], launch["grid"][1]) for launch in kernel_spies["attention"].launches] == launches


@pytest.mark.parametrize("window", [5, 0], ids=["windowed", "global"])
def test_batches_past_the_grid_limit_launch_in_chunks(window, kernel_spies, monkeypatch):
    """Images x heads share one grid dimension (CUDA's limit: 65,535): past it the launchers split the
    batch. Here the limit is 4 programs, so 3 images of 2 heads run as images [0, 2) and [2, 3)."""
    monkeypatch.setattr(attention, "MAX_GRID_YZ", 4)
    check(3, (7, 9), 128, 2, window, torch.float32, 1e-5, 1e-5, seed=4)
    chunks = [4, 2] if window == 0 else [4, 2, 4, 2]  # windowed: interior, then border windows (2 x 2 of 5 over 7 x 9)
    assert [launch["grid"][2] for launch in kernel_spies["attention"].launches] == chunks
    assert len(kernel_spies["rel_pos_terms"].launches) == 4  # rows and columns, per chunk


def test_qkv_with_a_strided_last_dim():
    """qkv as a view whose channels are not adjacent (last-dim stride 2): the same answer as from a
    contiguous copy (the kernel assumes unit channel stride, the launcher must provide it)."""
    attn = make_attention(64, 2, (5, 5), seed=3)
    with torch.no_grad():
        qkv = attn.qkv(torch.randn(2, 7, 8, 64))
    strided = torch.stack([qkv, torch.full_like(qkv, 1e3)], -1).flatten(-2)[..., ::2]  # [2, 7, 8, 192], stride 2
    assert strided.stride(-1) == 2 and torch.equal(strided, qkv)
    tables = (attn.qkv.bias, attn.rel_pos_h, attn.rel_pos_w, attn.num_heads, 5)
    with torch.no_grad():
        assert torch.equal(rel_pos_attention(strided, *tables), rel_pos_attention(qkv, *tables))
        terms_args = (attn.rel_pos_h, attn.rel_pos_w, attn.num_heads, (5, 5))
        for got, expected in zip(rel_pos_terms(strided, *terms_args), rel_pos_terms(qkv, *terms_args)):  # the pre-pass alone
            assert torch.equal(got, expected)


# The pre-pass kernel alone: one launch over grid rows (rel_h) and one over columns (rel_w).
TERM_SHAPES = {
    # batch, (grid h, w), heads, head_dim, window (h, w), table rows (None: 2 * window - 1)
    "global_runs_of_70_hd80_3img": (3, (5, 70), 2, 80, (5, 70), None),  # rows span two 64-token programs
    "windows_4_over_11x9_hd24": (1, (11, 9), 3, 24, (4, 4), None),  # table rows follow line % window
    "table_resized_7_to_11": (2, (6, 6), 1, 16, (6, 6), 7),  # get_rel_pos interpolates the table first
}


@pytest.mark.parametrize("scale", [1.0, LOG2E], ids=["unscaled", "log2e"])  # the attention kernel asks for log2(e)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(TERM_SHAPES))
def test_rel_pos_terms_match_einsum(shape, dtype, atol, rtol, scale):
    batch, (h, w), heads, head_dim, (win_h, win_w), rows = TERM_SHAPES[shape]
    torch.manual_seed(0)
    qkv = torch.randn(batch, h, w, 3 * heads * head_dim).to(dtype)
    table_h = torch.randn(rows or 2 * win_h - 1, head_dim).to(dtype)
    table_w = torch.randn(rows or 2 * win_w - 1, head_dim).to(dtype)
    got_h, got_w = rel_pos_terms(qkv, table_h, table_w, heads, (win_h, win_w), scale=scale)
    q = qkv[..., : heads * head_dim].double().unflatten(-1, (heads, head_dim))  # [B, H, W, heads, D]
    rh = get_rel_pos(win_h, win_h, table_h.double())[torch.arange(h) % win_h]  # [H, win_h, D]
    rw = get_rel_pos(win_w, win_w, table_w.double())[torch.arange(w) % win_w]  # [W, win_w, D]
    assert got_h.dtype == got_w.dtype == torch.float32
    torch.testing.assert_close(got_h.double(), torch.einsum("byxnc,ykc->bnyxk", q, rh) * scale, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_w.double(), torch.einsum("byxnc,xkc->bnyxk", q, rw) * scale, atol=atol, rtol=rtol)


@pytest.mark.parametrize("head_dim, pieces", [(64, (64, 0)), (80, (64, 16)), (48, (32, 16)), (96, (64, 32)),
                                              (40, (64, 0)), (24, (32, 0)), (8, (16, 0)), (16, (16, 0))])
def test_head_dim_pieces(head_dim, pieces):
    assert split_head_dim(head_dim) == pieces


def masked_padding_attention(attn: Attention, x: torch.Tensor, window: int) -> torch.Tensor:
    """The tempting variant the original does NOT compute: padded keys masked out of the softmax."""
    padded, padded_hw = window_partition(x, window)
    real = window_partition(torch.ones_like(x[..., :1]), window)[0]  # [nWin, win, win, 1]: 1 = real token
    n, h, w, _ = padded.shape
    q, k, v = attn.qkv(padded).reshape(n, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = decomposed_rel_pos_bias(q.flatten(0, 1), attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
    bias = bias.view(n, attn.num_heads, h * w, h * w).masked_fill(real.reshape(n, 1, 1, h * w) == 0, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = attn.proj(out.view(n, attn.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(n, h, w, -1))
    return window_unpartition(out, window, padded_hw, x.shape[1:3])


def test_padded_keys_stay_in_the_softmax():
    """Padded tokens (q = k = v = qkv bias) stay in each window's softmax, as in the original. Masking
    them would move the outputs of padded windows by far more than the tolerance, so the parity test
    above does tell the two apart; full (unpadded) windows are the same either way."""
    attn = make_attention(128, 2, (14, 14), seed=1).double()
    x = torch.randn(1, 16, 16, 128, dtype=torch.float64)
    with torch.no_grad():
        kept = eager_block_attention(attn, x, 14)
        masked = masked_padding_attention(attn, x, 14)
        got = kernel_block_attention(attn.float(), x.float(), 14).double()
    torch.testing.assert_close(got, kept, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[:, :14, :14], kept[:, :14, :14], atol=1e-9, rtol=1e-9)
    assert (masked[:, 14:] - kept[:, 14:]).abs().max() > 1e-2 * kept.abs().max()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(qkv=torch.zeros(2, 4, 4, 95)), ValueError, "3 * num_heads * head_dim"),
        (dict(qkv=torch.zeros(4, 4, 96)), ValueError, "qkv must be [B, H, W, 3C]"),
        (dict(qkv_bias=torch.zeros(95)), ValueError, "qkv_bias must have shape [96]"),
        (dict(rel_pos_h=torch.zeros(7, 8)), ValueError, "rel_pos_h / rel_pos_w must be [L, 16]"),
        (dict(qkv=torch.zeros(1, 4, 4, 96, dtype=torch.float64)), TypeError, "float32, float16 or bfloat16"),
        (dict(qkv=torch.zeros(1, 4, 4, 96, dtype=torch.bfloat16)), TypeError, "bfloat16 cannot run in the Triton interpreter"),
        (dict(window_size=-1), ValueError, "window_size must be >= 0"),
        (dict(qkv=torch.zeros(1, 0, 4, 96), window_size=0), ValueError, "empty token grid"),
        (dict(num_heads=0), ValueError, "qkv last dim 96 must be 3 * num_heads * head_dim"),
        (dict(config=dict(BLOCK_M=64, BLOCK_N=24)), ValueError, "powers of two >= 16"),
        (dict(config=dict(BLOCK_M=8, BLOCK_N=16)), ValueError, "powers of two >= 16"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    args = dict(qkv=torch.zeros(1, 4, 4, 96), qkv_bias=torch.zeros(96), rel_pos_h=torch.zeros(7, 16),
                rel_pos_w=torch.zeros(7, 16), num_heads=2, window_size=4)
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(message)):
        rel_pos_attention(**args)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rel_pos_w=torch.zeros(7, 20)), ValueError, "rel_pos_h / rel_pos_w must be [L, 16]"),  # read at a pitch of 16
        (dict(qkv=torch.zeros(1, 4, 4, 96, dtype=torch.bfloat16)), TypeError, "bfloat16 cannot run in the Triton interpreter"),
        (dict(qkv=torch.zeros(4, 4, 96)), ValueError, "qkv must be [B, H, W, 3C]"),
        (dict(window=(0, 4)), ValueError, "window must be (win_h, win_w) >= 1"),
    ],
)
def test_rel_pos_terms_bad_arguments(kwargs, error, message):
    """The pre-pass launcher is public too: it refuses what its kernel would read wrongly."""
    args = dict(qkv=torch.zeros(1, 4, 4, 96), rel_pos_h=torch.zeros(7, 16), rel_pos_w=torch.zeros(7, 16), num_heads=2, window=(4, 4))
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(f"rel_pos_terms: {message}")):
        rel_pos_terms(**args)


# Real sizes on the GPU: vit_b (head_dim 64) and vit_h (head_dim 80), windowed and global blocks.
GPU_DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 5e-3, 5e-3), (torch.bfloat16, 3e-2, 3e-2)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dim, heads", [(768, 12), (1280, 16)], ids=["vit_b", "vit_h"])
@pytest.mark.parametrize("window", [14, 0], ids=["windowed", "global"])
@pytest.mark.parametrize("batch", [1, 2])
def test_kernel_matches_eager_real_sizes_gpu(batch, dim, heads, window, dtype, atol, rtol, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the fp32 qkv / proj linears
    check(batch, 64, dim, heads, window, dtype, atol, rtol, device="cuda")
