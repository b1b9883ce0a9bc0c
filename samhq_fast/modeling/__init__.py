from .image_encoder import ImageEncoderViT, ViTConfig
from .mask_decoder import MaskDecoderHQ
from .prompt_encoder import PromptEncoder
from .sam_hq import VARIANTS, SamHQ, SamHQConfig

__all__ = ["ImageEncoderViT", "ViTConfig", "MaskDecoderHQ", "PromptEncoder", "SamHQ", "SamHQConfig", "VARIANTS"]
