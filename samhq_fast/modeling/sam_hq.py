"""The SAM-HQ model: image encoder + prompt encoder + HQ mask decoder, and its config."""

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT, ViTConfig
from .mask_decoder import MaskDecoderHQ
from .prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
PIXEL_STD = (58.395, 57.12, 57.375)
PROMPT_EMBED_DIM = 256
# Image encoder class per encoder-config type: Light HQ-SAM's TinyViT slots in here.
IMAGE_ENCODERS = {ViTConfig: ImageEncoderViT}


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: tuple[int, ...]) -> ViTConfig:
    return ViTConfig(
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_dim=4 * embed_dim, global_attn_indexes=global_attn_indexes
    )


VARIANTS: dict[str, ViTConfig] = {
    "vit_b": _vit(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _vit(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _vit(1280, 32, 16, (7, 15, 23, 31)),
}


@dataclass(frozen=True)
class SamHQConfig:
    """Everything needed to build the model; inferred from checkpoint shapes by `samhq_fast.load`."""

    encoder: ViTConfig = field(default_factory=ViTConfig)

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 for a 1024 input)."""
        return self.encoder.grid_size

    @property
    def vit_dim(self) -> int:
        """Channels of the ViT features the HQ decoder reads."""
        return self.encoder.embed_dim

    @property
    def variant(self) -> str:
        return next((name for name, enc in VARIANTS.items() if enc == self.encoder), "custom")

    def to_dict(self) -> dict:
        return {"variant": self.variant, "encoder": asdict(self.encoder)}

    @classmethod
    def from_variant(cls, name: str) -> "SamHQConfig":
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
        return cls(encoder=VARIANTS[name])


class SamHQ(nn.Module):
    mask_threshold = 0.0

    def __init__(self, config: SamHQConfig):
        super().__init__()
        self.config = config
        grid, size = config.embedding_size, config.img_size
        self.image_encoder = IMAGE_ENCODERS[type(config.encoder)](config.encoder)
        self.prompt_encoder = PromptEncoder(PROMPT_EMBED_DIM, (grid, grid), (size, size))
        self.mask_decoder = MaskDecoderHQ(vit_dim=config.vit_dim, dim=PROMPT_EMBED_DIM)

    @property
    def variant(self) -> str:
        """"vit_b", "vit_l", "vit_h", or "custom" for any other consistent architecture."""
        return self.config.variant

    @property
    def device(self) -> torch.device:
        return self.mask_decoder.iou_token.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mask_decoder.iou_token.weight.dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resized RGB images [B, 3, h, w] on a 0..255 scale (h, w <= img_size) -> normalized,
        zero-padded bottom/right to [B, 3, img_size, img_size] in the model dtype."""
        # Per channel with python scalars: no host-to-device copy (and no sync) per call.
        images = images.float()
        images = torch.stack([(images[:, c] - PIXEL_MEAN[c]) / PIXEL_STD[c] for c in range(3)], dim=1)
        h, w = images.shape[-2:]
        size = self.config.img_size
        return F.pad(images, (0, size - w, 0, size - h)).to(self.dtype)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Preprocessed images [B, 3, S, S] -> (image embeddings [B, 256, G, G],
        first global block's output [B, G, G, vit_dim], HQ features [B, 32, 4G, 4G])."""
        embeddings, global_outputs = self.image_encoder(images)
        early = global_outputs[0]
        return embeddings, early, self.mask_decoder.hq_features(embeddings, early)

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits [P, C, 4G, 4G] -> logits [P, C, H, W] in the original image frame:
        upsample to the padded input, crop the padding, resize to the original size (bilinear)."""
        size = self.config.img_size
        masks = F.interpolate(masks.float(), (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
