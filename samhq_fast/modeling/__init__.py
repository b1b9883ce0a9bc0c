from .image_encoder import ImageEncoderViT, ViTConfig
from .mask_decoder import MaskDecoderHQ
from .prompt_encoder import PromptEncoder
from .sam_hq import ALL_VARIANTS, TINY_VARIANTS, VARIANTS, SamHQ, SamHQConfig
from .tiny_vit import ImageEncoderTinyViT, TinyViTConfig

__all__ = [
    "ImageEncoderViT", "ViTConfig", "ImageEncoderTinyViT", "TinyViTConfig", "MaskDecoderHQ", "PromptEncoder", "SamHQ", "SamHQConfig",
    "VARIANTS", "TINY_VARIANTS", "ALL_VARIANTS",
]
