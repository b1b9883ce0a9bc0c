"""Prompt encoder: points, boxes and low-res masks -> sparse tokens and a dense embedding.

Coordinates are in the resized input frame (longest side = image size, e.g. 1024), x first.
"""

import math

import torch
from torch import nn

from .common import LayerNorm2d


HALF_DTYPES = (torch.float16, torch.bfloat16)


def prompt_count(point_coords, boxes, mask_input) -> int:
    """N of prompt tensors with a leading prompt axis (the first one given: their counts were checked
    to agree); 1 when none is given, as SAM decodes one prompt-less mask then."""
    return next((t.shape[0] for t in (point_coords, boxes, mask_input) if t is not None), 1)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features: [sin, cos](2 pi (2c - 1) @ G), G [2, embed_dim // 2].

    G and the phases stay fp32 in fp16 / bf16 models: the phases reach ~25 rad, where a bf16 G
    (or bf16 arithmetic) puts sin/cos up to 0.05 (0.13) off; fp32 then one rounding: 0.002.
    """

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _apply(self, fn, recurse=True):
        """model.half() / .to(torch.bfloat16) cast buffers too: a half model holds G in fp32, with
        the values it had (device moves apply). G may already be half: a half checkpoint loaded with
        assign=True; fp16 -> fp32 is exact, where fp16 -> bf16 would round it again."""
        gaussian = self.positional_encoding_gaussian_matrix
        super()._apply(fn, recurse)
        moved = self.positional_encoding_gaussian_matrix
        if moved.dtype in HALF_DTYPES:
            self.positional_encoding_gaussian_matrix = gaussian.to(device=moved.device, dtype=torch.float32)
        return self

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords [..., 2] normalized to [0, 1] -> [..., 2 * num_pos_feats] fp32."""
        gaussian = self.positional_encoding_gaussian_matrix.float()
        phases = 2 * math.pi * ((2 * coords.float() - 1) @ gaussian)
        return torch.cat([torch.sin(phases), torch.cos(phases)], dim=-1)

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

    def encode_coords(self, coords: torch.Tensor) -> torch.Tensor:
        """Positional encoding of points and box corners: coords [..., 2] (input-frame pixels) -> [..., C] fp32."""
        return self.pe_layer.points(coords + 0.5, self.input_image_size)  # +0.5: centre of the pixel

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Point tokens: coords [B, N, 2] (input-frame pixels), labels [B, N] -> [B, N, C] fp32."""
        return self.label_points(self.encode_coords(coords), labels)

    def label_points(self, encoding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Point tokens from the points' `encode_coords` [B, N, C] and labels [B, N]. Label 1 / 0 add
        the foreground / background embedding, -1 is "not a point"; any other label leaves the bare
        positional encoding (as in the original)."""
        labels = labels[..., None].float()  # (compared as numbers: in uint8, 255 == -1 would hold)
        encoding = torch.where(labels == -1, self.not_a_point_embed.weight.float(), encoding)
        encoding = encoding + (labels == 0) * self.point_embeddings[0].weight.float()
        return encoding + (labels == 1) * self.point_embeddings[1].weight.float()

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Box corner tokens: boxes [B, 4] (x1, y1, x2, y2) -> [B, 2, C] fp32."""
        return self.label_corners(self.encode_coords(boxes.reshape(-1, 2, 2)))

    def label_corners(self, encoding: torch.Tensor) -> torch.Tensor:
        """Box corner tokens from the corners' `encode_coords` [B, 2, C]: top-left, bottom-right."""
        corner_tokens = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return encoding + corner_tokens.float()

    def check_prompts(self, point_coords, point_labels, boxes, mask_input, mask_name: str = "mask_input") -> tuple:
        """Checks input-frame prompt tensors with a prompt axis N (point_coords [N, K, 2], point_labels
        [N, K], boxes [N, 4], mask_input [N, 1, 4h, 4w], each optional) for type, shape, dtype and
        device, and raises a ValueError / TypeError naming the problem -> the four, unchanged.
        N may be 0 (a frame without detections: the decoders return empty outputs). Values (NaN,
        ranges) are not read: on the GPU that would wait for it on every call.
        mask_name: what the caller calls mask_input, for the messages."""
        mask_h, mask_w = self.mask_input_size
        device = self.no_mask_embed.weight.device
        expected = {"point_coords": "[N, K, 2]", "point_labels": "[N, K]", "boxes": "[N, 4]", mask_name: f"[N, 1, {mask_h}, {mask_w}]"}
        given = {"point_coords": point_coords, "point_labels": point_labels, "boxes": boxes, mask_name: mask_input}
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        for name, tensor in given.items():
            if tensor is not None and not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor {expected[name]}, got {type(tensor).__name__}")
        ok = {
            "point_coords": point_coords is None or (point_coords.ndim == 3 and point_coords.shape[-1] == 2),
            "point_labels": point_labels is None or point_labels.shape == point_coords.shape[:2],
            "boxes": boxes is None or (boxes.ndim == 2 and boxes.shape[-1] == 4),
            mask_name: mask_input is None or tuple(mask_input.shape[1:]) == (1, mask_h, mask_w),
        }
        for name, good in ok.items():
            if not good:
                raise ValueError(f"{name} must have shape {expected[name]}, got {list(given[name].shape)}")
        meanings = {"point_coords": "(x, y) pixels", "point_labels": "1 (foreground), 0 (background) or -1 (ignore)", "boxes": "(x1, y1, x2, y2) pixels"}
        for name, meaning in meanings.items():  # a complex value would lose its imaginary part in the float cast
            if given[name] is not None and (given[name].dtype == torch.bool or given[name].is_complex()):
                raise TypeError(f"{name} must hold {meaning} as real numbers, got dtype {given[name].dtype}")
        if mask_input is not None and not mask_input.is_floating_point():
            raise TypeError(f"{mask_name} must be float logits (a previous predict's low_res_logits), got dtype {mask_input.dtype}")
        for name, tensor in given.items():
            if tensor is not None and tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device}, the model on {device}: move the prompts to the model's device")
        counts = {name: t.shape[0] for name, t in given.items() if t is not None}
        if len(set(counts.values())) > 1:
            raise ValueError(f"prompt counts disagree: {counts}; every prompt tensor needs the same N")
        if point_coords is not None and point_coords.shape[1] == 0:
            raise ValueError(f"point_coords has no points (shape {list(point_coords.shape)}): pass None for no points, or label -1 for padding")
        return point_coords, point_labels, boxes, mask_input

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """points ([B, N, 2], labels [B, N]), boxes [B, 4] (x1 y1 x2 y2), masks [B, 1, 4h, 4w]
        -> sparse [B, T, C], dense [B, C, h, w] in the weights' dtype."""
        dtype = self.no_mask_embed.weight.dtype
        batch = prompt_count(points and points[0], boxes, masks)
        sparse = [self.no_mask_embed.weight.new_zeros(batch, 0, self.embed_dim, dtype=torch.float32)]
        if points is not None:
            coords, labels = points[0], points[1].float()  # (labels as numbers: in uint8, -1 would be 255)
            if boxes is None:  # a "not a point" token stands in for the missing box
                coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
                labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
            sparse.append(self.embed_points(coords, labels))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks.to(dtype))
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return torch.cat(sparse, dim=1).to(dtype), dense
