"""The SAM-HQ model: image encoder + prompt encoder + HQ mask decoder, and its config."""

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..transforms import check_flags, check_image_size, check_resized_pixels
from .image_encoder import ImageEncoderViT, ViTConfig
from .mask_decoder import MaskDecoderHQ
from .prompt_encoder import PromptEncoder, prompt_count
from .tiny_vit import ImageEncoderTinyViT, TinyViTConfig

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
PIXEL_STD = (58.395, 57.12, 57.375)
PROMPT_EMBED_DIM = 256
# Image encoder class per encoder-config type.
IMAGE_ENCODERS = {ViTConfig: ImageEncoderViT, TinyViTConfig: ImageEncoderTinyViT}
# postprocess_binary_masks upsamples this many mask pixels at a time (fp32: 512 MB): with the
# 1024 x 1024 stage, a 1920x1080 frame's masks go 42 prompts at a time, a 3840x2160 frame's 14.
MASK_CHUNK_PIXELS = 2**27


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: tuple[int, ...]) -> ViTConfig:
    return ViTConfig(
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_dim=4 * embed_dim, global_attn_indexes=global_attn_indexes
    )


VARIANTS: dict[str, ViTConfig] = {
    "vit_b": _vit(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _vit(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _vit(1280, 32, 16, (7, 15, 23, 31)),
}
# Light HQ-SAM. Apart from VARIANTS, which the ViT-only code (kernels, FLOP counts, benchmarks) iterates.
TINY_VARIANTS: dict[str, TinyViTConfig] = {"vit_tiny": TinyViTConfig()}
ALL_VARIANTS: dict[str, ViTConfig | TinyViTConfig] = {**VARIANTS, **TINY_VARIANTS}


@dataclass(frozen=True)
class SamHQConfig:
    """Everything needed to build the model; inferred from checkpoint shapes by `samhq_fast.load`."""

    encoder: ViTConfig | TinyViTConfig = field(default_factory=ViTConfig)

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 for a 1024 input)."""
        return self.encoder.grid_size

    @property
    def vit_dim(self) -> int:
        """Channels of the encoder features the HQ decoder reads (160 for vit_tiny)."""
        return self.encoder.interm_dim

    @property
    def variant(self) -> str:
        return next((name for name, enc in ALL_VARIANTS.items() if enc == self.encoder), "custom")

    def to_dict(self) -> dict:
        return {"variant": self.variant, "encoder": asdict(self.encoder)}

    @classmethod
    def from_variant(cls, name: str) -> "SamHQConfig":
        if name not in ALL_VARIANTS:
            raise ValueError(f"unknown variant {name!r}; expected one of {sorted(ALL_VARIANTS)}")
        return cls(encoder=ALL_VARIANTS[name])


def no_prompt_outputs(hq_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What decoding N = 0 prompts gives, without launching anything on an empty batch:
    (logits [0, 1, 4G, 4G], scores [0, 1]) in the decoder's dtype. hq_features [B, 32, 4G, 4G]."""
    return hq_features.new_zeros(0, 1, *hq_features.shape[-2:]), hq_features.new_zeros(0, 1)


def decode_eager(prompt_encoder, mask_decoder, image_embeddings, image_pe, hq_features, point_coords, point_labels, boxes,
                 mask_input, multimask_output: bool, hq_token_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference decode (the eager backend's): unpadded prompts through the model's own prompt
    encoder and HQ decoder. image_pe: prompt_encoder.get_dense_pe() [1, 256, G, G], computed once by
    the caller (it depends on no prompt and no image). Prompts as `SamHQPredictor.predict_torch`
    takes them (input frame, prompt axis N) -> (logits [N, 1, 4G, 4G], scores [N, 1])."""
    if prompt_count(point_coords, boxes, mask_input) == 0:
        return no_prompt_outputs(hq_features)
    points = None if point_coords is None else (point_coords, point_labels)
    sparse, dense = prompt_encoder(points, boxes, mask_input)
    return mask_decoder(image_embeddings, image_pe, sparse, dense, hq_features, multimask_output, hq_token_only)


class SamHQ(nn.Module):
    mask_threshold = 0.0
    image_format = "RGB"

    def __init__(self, config: SamHQConfig):
        super().__init__()
        self.config = config
        grid, size = config.embedding_size, config.img_size
        self.image_encoder = IMAGE_ENCODERS[type(config.encoder)](config.encoder)
        self.prompt_encoder = PromptEncoder(PROMPT_EMBED_DIM, (grid, grid), (size, size))
        self.mask_decoder = MaskDecoderHQ(vit_dim=config.vit_dim, dim=PROMPT_EMBED_DIM)

    @property
    def variant(self) -> str:
        """"vit_b", "vit_l", "vit_h", "vit_tiny", or "custom" for any other consistent architecture."""
        return self.config.variant

    @property
    def device(self) -> torch.device:
        return self.mask_decoder.iou_token.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mask_decoder.iou_token.weight.dtype

    @property
    def pixel_mean(self) -> torch.Tensor:
        """[3, 1, 1] float32 on the model's device, RGB on a 0..255 scale (the original's buffer)."""
        return torch.tensor(PIXEL_MEAN, device=self.device).view(3, 1, 1)

    @property
    def pixel_std(self) -> torch.Tensor:
        """[3, 1, 1] float32 on the model's device (the original's buffer)."""
        return torch.tensor(PIXEL_STD, device=self.device).view(3, 1, 1)

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
        early encoder features [B, G, G, vit_dim] (ViT: the first global block's output; TinyViT:
        stage 1 merged to 160 channels), HQ features [B, 32, 4G, 4G])."""
        embeddings, interm = self.image_encoder(images)
        early = interm[0]
        return embeddings, early, self.mask_decoder.hq_features(embeddings, early)

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits [P, C, 4G, 4G] (any float dtype) -> fp32 logits [P, C, H, W] in the original
        image frame: upsample to the padded input, crop the padding, resize to the original size (bilinear)."""
        size = self.config.img_size
        masks = F.interpolate(masks.float(), (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def prompts_per_mask_chunk(self, masks_per_prompt: int, original_size: tuple[int, int]) -> int:
        """How many prompts' masks to upsample at once: ~MASK_CHUNK_PIXELS fp32 pixels (512 MB) over
        both upsampled stages (img_size^2, then H x W), at least one prompt."""
        pixels_per_prompt = masks_per_prompt * (self.config.img_size**2 + original_size[0] * original_size[1])
        return max(1, MASK_CHUNK_PIXELS // pixels_per_prompt)

    def postprocess_binary_masks(self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits [P, C, 4G, 4G] -> bool masks [P, C, H, W] (logit > mask_threshold): the same
        as `postprocess_masks(...) > mask_threshold`, a few prompts at a time, so the fp32 upsampled
        logits of at most ~MASK_CHUNK_PIXELS pixels exist at once (all at once, 64 prompts on a
        3840x2160 frame would take 2.4 GB beside their 0.5 GB of bool masks)."""
        height, width = (int(s) for s in original_size)
        out = torch.empty((*masks.shape[:2], height, width), dtype=torch.bool, device=masks.device)
        chunk = self.prompts_per_mask_chunk(masks.shape[1], (height, width))
        for start in range(0, len(masks), chunk):
            # without del, the next chunk's logits would be made while `logits` still holds this one's
            logits = self.postprocess_masks(masks[start : start + chunk], input_size, (height, width))
            torch.gt(logits, self.mask_threshold, out=out[start : start + chunk])
            del logits
        return out

    @torch.no_grad()
    def forward(self, batched_input: list[dict], multimask_output: bool, hq_token_only: bool = False) -> list[dict]:
        """The original `Sam.forward`, for code written against segment_anything(_hq).

        batched_input: one dict per image: "image" [3, h, w] RGB on a 0..255 scale, already resized
        (`transforms.ResizeLongestSide`: longest side = img_size; any h, w <= img_size is accepted), "original_size" (H, W), and
        optional prompts in that resized input frame: "point_coords" [N, K, 2] with "point_labels"
        [N, K], "boxes" [N, 4], "mask_inputs" [N, 1, 4G, 4G]. The images go through the encoder as
        one batch. -> one dict per image: "masks" [N, 1, H, W] bool, "iou_predictions" [N, 1],
        "low_res_logits" [N, 1, 4G, 4G] (one mask per prompt, as the original SAM-HQ: multimask_output
        picks the best of SAM's three before the HQ mask is added).
        """
        if not isinstance(batched_input, (list, tuple)) or not batched_input:
            raise TypeError(f"batched_input must be a non-empty list of dicts, one per image, got {type(batched_input).__name__}")
        check_flags(multimask_output=multimask_output, hq_token_only=hq_token_only)
        size = self.config.img_size
        images, original_sizes, prompts = [], [], []
        for i, record in enumerate(batched_input):  # every record is checked before the encoder runs
            image = record.get("image") if isinstance(record, dict) else None
            if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or max(image.shape[1:]) > size:
                got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"batched_input[{i}]['image'] must be a [3, h, w] tensor resized to at most {size} pixels a side, got {got}")
            if "original_size" not in record:
                raise ValueError(f"batched_input[{i}] has no 'original_size' (H, W)")
            try:
                check_resized_pixels(image, "image")
                original_sizes.append(check_image_size(record["original_size"], "original_size"))
                prompts.append(self.prompt_encoder.check_prompts(
                    *(record.get(key) for key in ("point_coords", "point_labels", "boxes", "mask_inputs")), mask_name="mask_inputs"))
            except (TypeError, ValueError) as e:
                raise type(e)(f"batched_input[{i}]: {e}") from e
            images.append(self.preprocess(image[None].to(self.device)))
        embeddings, _, hq_features = self.encode_image(torch.cat(images))
        image_pe = self.prompt_encoder.get_dense_pe()
        outputs = []
        for i, record in enumerate(batched_input):
            low_res, iou = decode_eager(
                self.prompt_encoder, self.mask_decoder, embeddings[i : i + 1], image_pe, hq_features[i : i + 1], *prompts[i], multimask_output, hq_token_only
            )
            masks = self.postprocess_binary_masks(low_res, record["image"].shape[-2:], original_sizes[i])
            outputs.append({"masks": masks, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs
