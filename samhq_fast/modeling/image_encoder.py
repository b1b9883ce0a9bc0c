"""ViT image encoder of SAM-HQ: windowed + global attention with decomposed relative positions.

Tensors are channels-last inside the trunk: tokens [B, H, W, C] on the patch grid
(64 x 64 for a 1024 input). The encoder returns the neck output [B, 256, H, W] and the
outputs of the global-attention blocks [B, H, W, C] (the HQ decoder uses the first one).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock, neck


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def interm_dim(self) -> int:
        """Channels of the feature the HQ decoder reads (the first global block's output)."""
        return self.embed_dim


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """rel_pos [L, head_dim] linearly resized to [length, head_dim] (returned as is when L == length)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    return F.interpolate(rel_pos.T[None], size=length, mode="linear")[0].T


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position table gathered for every (query, key) pair along one axis.

    rel_pos: [L, head_dim]; returns [q_size, k_size, head_dim]. When L is not
    2 * max(q_size, k_size) - 1 the table is linearly resized first, and when the query
    and key sizes differ the coordinates are rescaled (custom image sizes).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    rel_pos = resize_rel_pos(rel_pos, max_rel_dist)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias from the UNSCALED queries.

    q: [B, q_h * q_w, head_dim] -> bias [B, q_h * q_w, k_h * k_w] with
    bias[b, (y, x), (ky, kx)] = q[b, y, x] . Rh[y, ky] + q[b, y, x] . Rw[x, kx].
    """
    (q_h, q_w), (k_h, k_w) = q_hw, k_hw
    rh = get_rel_pos(q_h, k_h, rel_pos_h)  # [q_h, k_h, head_dim]
    rw = get_rel_pos(q_w, k_w, rel_pos_w)  # [q_w, k_w, head_dim]
    b, _, dim = q.shape
    q_grid = q.reshape(b, q_h, q_w, dim)
    rel_h = torch.einsum("byxc,ykc->byxk", q_grid, rh)
    rel_w = torch.einsum("byxc,xkc->byxk", q_grid, rw)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # [B, q_h, q_w, k_h, k_w]
    return bias.reshape(b, q_h * q_w, k_h * k_w)


class Attention(nn.Module):
    """Multi-head self-attention over a [B, H, W, C] grid with decomposed rel-pos bias."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # [3, B, heads, H * W, head_dim]
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = decomposed_rel_pos_bias(q.flatten(0, 1), self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        # SDPA scales q by head_dim ** -0.5 itself; the bias is added after the scaling.
        # 4-D inputs: CPU SDPA is several times slower on 3-D [B * heads, N, d] ones.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(b, self.num_heads, h * w, h * w))
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> ([B * nWin, window, window, C], padded (Hp, Wp)); zero-pads bottom/right."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`, cropping the padding: -> [B, H, W, C]."""
    (hp, wp), (h, w) = padded_hw, hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


class Block(nn.Module):
    """Pre-norm transformer block; `window_size` 0 means global attention."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, window_size: int, grid_size: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = window_size if window_size > 0 else grid_size
        self.attn = Attention(dim, num_heads, (attn_size, attn_size))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim, nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = x.shape[1], x.shape[2]
            x, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # [B, H, W, C]


class ImageEncoderViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        grid = config.grid_size
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.num_heads,
                config.mlp_dim,
                0 if i in config.global_attn_indexes else config.window_size,
                grid,
            )
            for i in range(config.depth)
        )
        self.neck = neck(config.embed_dim, config.out_chans)

    @property
    def img_size(self) -> int:
        """Input side S in pixels (1024 for the released models)."""
        return self.config.img_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images [B, 3, S, S] normalized and padded -> (embeddings [B, 256, G, G], global-block outputs [B, G, G, C])."""
        x = self.patch_embed(images) + self.pos_embed
        global_outputs = []
        for block in self.blocks:
            x = block(x)
            if block.window_size == 0:
                global_outputs.append(x)
        return self.neck(x.permute(0, 3, 1, 2)), global_outputs
