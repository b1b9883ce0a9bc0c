"""Prompt encoder: points, boxes and low-res masks -> sparse tokens and a dense embedding.

Coordinates are in the resized input frame (longest side = image size, e.g. 1024), x first.
"""

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features: [sin, cos](2 pi (2c - 1) @ G), G [2, embed_dim // 2]."""

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords [..., 2] normalized to [0, 1] -> [..., 2 * num_pos_feats] (computed in fp32)."""
        gaussian = self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * ((2 * coords.to(gaussian.dtype) - 1) @ gaussian)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of an h x w grid of cell centres -> [C, h, w]."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [h, w, (x, y)]
        return self.encode(coords).permute(2, 0, 1)

    def points(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """coords [B, N, 2] in pixels of an image_size (h, w) frame -> [B, N, C]."""
        coords = coords.float()  # python-scalar division: no host-to-device copy (and no sync) per call
        return self.encode(torch.stack([coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]], dim=-1))


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int], mask_in_chans: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid -> [1, C, h, w]."""
        return self.pe_layer.grid(self.image_embedding_size)[None].to(self.no_mask_embed.weight.dtype)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Point tokens: coords [B, N, 2] (input-frame pixels), labels [B, N] -> [B, N, C] fp32.
        Label 1 / 0 add the foreground / background embedding, -1 is "not a point"; any other
        label leaves the bare positional encoding (the fixed-shape decoder masks those slots)."""
        embedding = self.pe_layer.points(coords + 0.5, self.input_image_size)  # +0.5: centre of the pixel
        labels = labels[..., None]
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight.float(), embedding)
        embedding = embedding + (labels == 0) * self.point_embeddings[0].weight.float()
        return embedding + (labels == 1) * self.point_embeddings[1].weight.float()

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Box corner tokens: boxes [B, 4] (x1, y1, x2, y2) -> [B, 2, C] fp32."""
        corners = self.pe_layer.points(boxes.reshape(-1, 2, 2) + 0.5, self.input_image_size)
        corner_tokens = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return corners + corner_tokens.float()

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """points ([B, N, 2], labels [B, N]), boxes [B, 4] (x1 y1 x2 y2), masks [B, 1, 4h, 4w]
        -> sparse [B, T, C], dense [B, C, h, w] in the weights' dtype."""
        dtype = self.no_mask_embed.weight.dtype
        batch = next((t.shape[0] for t in (points and points[0], boxes, masks) if t is not None), 1)
        sparse = [self.no_mask_embed.weight.new_zeros(batch, 0, self.embed_dim, dtype=torch.float32)]
        if points is not None:
            coords, labels = points
            if boxes is None:  # a "not a point" token stands in for the missing box
                coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
                labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
            sparse.append(self.embed_points(coords, labels))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks.to(dtype))
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return torch.cat(sparse, dim=1).to(dtype), dense
