"""FLOP count of the ViT image encoder (multiply-adds x 2), for achieved-TFLOP/s figures in benchmarks.

Notation (per image): G = img_size / patch_size (64 at 1024 input), T = G^2 real tokens (4,096),
C = embed_dim, M = mlp_dim, d = head_dim, w = window_size (14), n_win = ceil(G / w)^2 windows
(25), Tp = n_win * w^2 padded tokens (4,900 = the 70 x 70 grid). Multiply-adds (FLOPs = 2 x these):

  patch embed   T * C * 3 * patch^2                    (16x16 stride-16 conv = a GEMM over patches)
  per block     qkv   T_lin * 3 C^2
                proj  T_lin * C^2
                mlp   T * 2 * C * M                    (lin1 and lin2; always on the 64x64 grid)
                attn  global:   2 * T^2 * C            (q @ k^T and p @ v, summed over heads: N^2 * d * heads)
                      windowed: n_win * 2 * (w^2)^2 * C  (over the zero-padded windows, as every backend does)
                rel   global:   T * 2G * C             (q . Rh and q . Rw: each query meets k_h + k_w table rows per head)
                      windowed: Tp * 2w * C
  neck          T * C * out_chans + T * out_chans^2 * 9  (1x1 conv, then 3x3 conv: all 9 taps, as cuDNN runs them)

T_lin is T (padded_windows=False: the fused backend runs qkv/proj on the real tokens only) or, in
windowed blocks, Tp (padded_windows=True: the original partitions first and runs qkv/proj on the
70x70 padded grid, 4900/4096 = 19.6% more rows there). Global blocks always use T. Not counted:
elementwise work (biases, LayerNorms, softmax, GELU, the rel-pos broadcast add, residuals): memory-
bound, and ~0.4% (vit_b) / ~0.15% (vit_h) on top even at ~5 ops per softmax element.

At 1024 input with the real-token count (padded_windows=False), per image:
  vit_b 0.942 TFLOP  (issue 3: 0.94)   linear (qkv+proj+mlp) share 73.9%
  vit_l 2.851 TFLOP  (issue 3: 2.85)   linear share 86.8%
  vit_h 5.666 TFLOP  (issue 3: 5.67)   linear share 91.0%  (91.2% counting patch embed and neck convs)
The totals agree with the project's issue 3 (the fused encoder) to its 3 significant digits; its
"92% in linear layers" is the vit_h figure (rounded up): vit_b spends relatively more in attention (C is smaller while the
T^2 global-attention term is the same). Patch embed + neck + rel-pos are 1.7% (vit_b) to 0.5% (vit_h).
padded_windows=True adds 30.3 / 134.9 / 295.1 GFLOP (vit_b / l / h), +3.2% / +4.7% / +5.2%.
"""

import math

from .modeling import ViTConfig

LINEAR_KEYS = ("qkv", "proj", "mlp")


def encoder_flops_breakdown(config: ViTConfig, batch: int = 1, padded_windows: bool = False) -> dict[str, int]:
    """FLOPs (2 x multiply-adds) of one image-encoder forward, by part; see the module docstring."""
    if not isinstance(config, ViTConfig):
        raise ValueError(f"FLOPs are counted for the ViT image encoder (a ViTConfig) only, got a {type(config).__name__} (vit_tiny: not counted)")
    grid = config.grid_size
    tokens = grid * grid
    dim, window = config.embed_dim, config.window_size
    per_side = math.ceil(grid / window) if window > 0 else 0
    n_win = per_side * per_side
    padded_tokens = n_win * window * window
    n_global = sum(1 for i in range(config.depth) if window == 0 or i in config.global_attn_indexes)
    n_windowed = config.depth - n_global

    qkv_proj_rows = config.depth * tokens + (n_windowed * (padded_tokens - tokens) if padded_windows else 0)
    macs = {
        "patch_embed": tokens * dim * 3 * config.patch_size**2,
        "qkv": qkv_proj_rows * 3 * dim * dim,
        "proj": qkv_proj_rows * dim * dim,
        "mlp": config.depth * tokens * 2 * dim * config.mlp_dim,
        "attention": n_global * 2 * tokens**2 * dim + n_windowed * n_win * 2 * (window * window) ** 2 * dim,
        "rel_pos": n_global * tokens * 2 * grid * dim + n_windowed * padded_tokens * 2 * window * dim,
        "neck": tokens * dim * config.out_chans + tokens * config.out_chans**2 * 9,
    }
    return {name: 2 * batch * count for name, count in macs.items()}


def encoder_flops(config: ViTConfig, batch: int = 1, padded_windows: bool = False) -> int:
    """FLOPs (2 x multiply-adds) of one ViT image-encoder forward on `batch` images.

    Sum of `encoder_flops_breakdown`: patch embed + per block (qkv, proj, MLP, q@k^T and p@v,
    rel-pos q.Rh and q.Rw) + neck convs; the formula is in the module docstring. padded_windows
    selects whether qkv/proj of windowed blocks run on the 70x70 padded grid (True, as the original)
    or on the 64x64 real tokens (False, as the fused backend; the fair "same work" count).
    """
    return sum(encoder_flops_breakdown(config, batch, padded_windows).values())


def linear_flops(config: ViTConfig, batch: int = 1, padded_windows: bool = False) -> int:
    """The qkv + proj + MLP part of `encoder_flops` (what the GEMMs do)."""
    parts = encoder_flops_breakdown(config, batch, padded_windows)
    return sum(parts[k] for k in LINEAR_KEYS)
