"""Two-way transformer of the mask decoder: tokens attend to the image and the image to the tokens."""

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose internal width may be downsampled (256 -> 128 for cross attention)."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.num_heads = num_heads
        inner = dim // downsample_rate
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, heads, N, d]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q [B or 1, Nq, C], k and v [B or 1, Nk, C] -> [B, Nq, C]. A batch of 1 serves every prompt:
        one image's tokens are projected once, not once per prompt. key_mask [B, 1, 1, Nk] drops
        padded prompt slots, as SDPA's attn_mask: bool (True = attend) or added to the scores (0 or
        -inf); None attends to all keys."""
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v), key_mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` after the q / k / v projections: q [B or 1, Nq, inner], k and v [B or 1, Nk, inner]
        (already projected) -> [B, Nq, C]."""
        if q.shape[0] > 1 and k.shape[0] == v.shape[0] == 1 and key_mask is None:
            # Every batch's queries attend to the same keys (the prompts of one image, to its pixels):
            # as one batch of B * Nq queries (the same softmax rows), SDPA fills whole query tiles
            # instead of B tiles of Nq rows each, and k and v are not expanded to [B, heads, HW, d]
            # (which Inductor's CPU code copies).
            b, n, _ = q.shape
            return self.attend(q.reshape(1, b * n, -1), k, v).view(b, n, -1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        batch = max(q.shape[0], k.shape[0])
        q, k, v = (t.expand(batch, -1, -1, -1) for t in (q, k, v))  # views: SDPA takes equal batch sizes
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5: PyTorch's default, as in the original
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe, token_mask=None):
        """queries [B, T, C] (tokens), keys [B, HW, C] (image) -> updated (queries, keys).
        token_mask [B, 1, 1, T] (see `Attention.forward`) drops padding slots: no other token or pixel attends to them."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_mask))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048, downsample_rate: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=(i == 0)) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B or 1, C, h, w], image_pe [B or 1, C, h, w], tokens [B, T, C] -> (tokens [B, T, C],
        image [B, hw, C]). token_mask [B, 1, 1, T] (None: every token is real; see `Attention.forward`)
        lets fixed-size prompt batches carry padding. An image of batch 1 is shared by all B prompts until the first block's
        image-to-token attention makes it per prompt (its projections before that run once)."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe, token_mask)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
