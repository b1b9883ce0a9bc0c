"""HQ mask decoder: SAM's decoder plus the HQ output token and the fused HQ feature path."""

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


def _upsample_x4(in_dim: int, mid_dim: int, out_dim: int) -> nn.Sequential:
    """ConvT 2x2 s2 -> LN2d -> GELU -> ConvT 2x2 s2 (x4 spatially)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_dim, mid_dim, kernel_size=2, stride=2),
        LayerNorm2d(mid_dim),
        nn.GELU(),
        nn.ConvTranspose2d(mid_dim, out_dim, kernel_size=2, stride=2),
    )


class MaskDecoderHQ(nn.Module):
    num_mask_tokens = 4  # SAM's single-mask token + 3 multimask tokens; the HQ token comes after them

    def __init__(self, vit_dim: int, dim: int = 256):
        super().__init__()
        self.transformer = TwoWayTransformer(depth=2, dim=dim, num_heads=8, mlp_dim=2048, downsample_rate=2)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(*_upsample_x4(dim, dim // 4, dim // 8), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, 256, self.num_mask_tokens, 3)
        self.hf_token = nn.Embedding(1, dim)
        self.hf_mlp = MLP(dim, dim, dim // 8, 3)
        self.compress_vit_feat = _upsample_x4(vit_dim, dim, dim // 8)
        self.embedding_encoder = _upsample_x4(dim, dim // 4, dim // 8)
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(dim // 8, dim // 4, kernel_size=3, padding=1),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.Conv2d(dim // 4, dim // 8, kernel_size=3, padding=1),
        )

    def hq_features(self, image_embeddings: torch.Tensor, early_vit_features: torch.Tensor) -> torch.Tensor:
        """Per-image HQ features, cacheable across prompts.

        image_embeddings [B, 256, h, w], early_vit_features [B, h, w, vit_dim] (first global block)
        -> [B, 32, 4h, 4w].
        """
        return self.embedding_encoder(image_embeddings) + self.compress_vit_feat(early_vit_features.permute(0, 3, 1, 2))

    def hq_masks(self, upscaled_sam: torch.Tensor, hq_features: torch.Tensor, hyper_hq: torch.Tensor) -> torch.Tensor:
        """The HQ token's mask logits: (embedding_maskfeature(upscaled_sam) + hq_features) dotted with
        the HQ hypernetwork vector over the 32 channels.

        upscaled_sam [P, 32, 4h, 4w], hq_features [1 or P, 32, 4h, 4w], hyper_hq [P, 32] -> [P, 1, 16hw].
        """
        upscaled_hq = self.embedding_maskfeature(upscaled_sam) + hq_features
        return hyper_hq[:, None] @ upscaled_hq.flatten(2)

    @property
    def hypernetwork_mlps(self) -> list[MLP]:
        """The five output mask tokens' 3-layer MLPs, in token order: the 4 SAM tokens', then hf_mlp (HQ)."""
        return [*self.output_hypernetworks_mlps, self.hf_mlp]

    @property
    def output_token_mlps(self) -> list[MLP]:
        """The six output tokens' 3-layer MLPs, in token order: the IoU head, then `hypernetwork_mlps`."""
        return [self.iou_prediction_head, *self.hypernetwork_mlps]

    def hypernetworks(self, mask_tokens: torch.Tensor) -> torch.Tensor:
        """Each output mask token through its own MLP (`hypernetwork_mlps`):
        mask_tokens [P, 5, 256] -> hypernetwork vectors [P, 5, 32]."""
        return torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.hypernetwork_mlps)], dim=1)

    def prompt_tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """The two-way transformer's tokens: the six output tokens (IoU, 4 SAM masks, HQ) before each
        prompt's sparse embeddings [P, T, 256] -> [P, 6 + T, 256]."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight])
        return torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)

    def decode_tokens(self, image_embeddings, image_pe, sparse, dense) -> tuple[torch.Tensor, torch.Tensor]:
        """The part every output head reads: the two-way transformer over output + prompt tokens and
        the image, then the image's upscaling.

        image_embeddings [1 or P, 256, h, w], image_pe [1, 256, h, w], sparse [P, T, 256],
        dense [1 or P, 256, h, w] (1: the same for every prompt; with one image, the transformer's
        first image projections then run once, not per prompt).
        -> (the six output tokens [P, 6, 256]: IoU, 4 SAM masks, HQ; upscaled image [P, 32, 4h, 4w]).
        """
        src = image_embeddings + dense  # [1 or P, C, h, w]: broadcasts one image over all its prompts
        c, h, w = src.shape[1:]
        hs, src = self.transformer(src, image_pe, self.prompt_tokens(sparse))
        upscaled_sam = self.output_upscaling(src.transpose(1, 2).reshape(sparse.shape[0], c, h, w))
        return hs[:, : self.num_mask_tokens + 2], upscaled_sam  # the output tokens: IoU, masks, HQ

    def predict_masks(self, image_embeddings, image_pe, sparse, dense, hq_features) -> tuple[torch.Tensor, torch.Tensor]:
        """All five masks [P, 5, 4h, 4w] (4 SAM + HQ) and the four IoU scores [P, 4] for P prompts.
        hq_features [1 or P, 32, 4h, 4w]; the rest as `decode_tokens`."""
        output_tokens, upscaled_sam = self.decode_tokens(image_embeddings, image_pe, sparse, dense)
        hyper_in = self.hypernetworks(output_tokens[:, 1:])  # [P, 5, 32]
        masks_sam = hyper_in[:, :4] @ upscaled_sam.flatten(2)
        masks_hq = self.hq_masks(upscaled_sam, hq_features, hyper_in[:, 4])
        masks = torch.cat([masks_sam, masks_hq], dim=1).view(sparse.shape[0], 5, *upscaled_sam.shape[-2:])
        return masks, self.iou_prediction_head(output_tokens[:, 0])

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        hq_features: torch.Tensor,
        multimask_output: bool,
        hq_token_only: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mask logits [P, 1, 4h, 4w], IoU score [P, 1]): always one mask per prompt.

        multimask_output picks the multimask token (1..3) with the best predicted IoU instead of
        token 0; the HQ mask is then added to it (or returned alone with hq_token_only).
        """
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse, dense, hq_features)
        return select_masks(masks, iou, multimask_output, hq_token_only)


def select_masks(masks: torch.Tensor, iou: torch.Tensor, multimask_output: bool, hq_token_only: bool):
    """The original's output rule: all five masks [P, 5, 4h, 4w] and four IoU scores [P, 4]
    -> (logits [P, 1, 4h, 4w], score [P, 1]).

    multimask_output picks the multimask token (1..3) with the best predicted IoU instead of token 0;
    the HQ mask is then added to it (or returned alone with hq_token_only).
    """
    if multimask_output:
        score, best = iou[:, 1:4].max(dim=1, keepdim=True)
        sam_mask = masks[:, 1:4].gather(1, best[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))
    else:
        score, sam_mask = iou[:, :1], masks[:, :1]
    hq_mask = masks[:, 4:5]
    return (hq_mask if hq_token_only else sam_mask + hq_mask), score
