"""TinyViT image encoder of Light HQ-SAM (`vit_tiny`): a convolutional stage, then windowed
attention stages with a learned bias per relative offset, and SAM's neck.

Resolutions at 1024 input: stem /4 -> stage 0 (MBConv, 64 ch, 256 x 256) -> merge /2 ->
stage 1 (128 ch, 128 x 128) -> merge /2 -> stage 2 (160 ch, 64 x 64) -> merge /1 -> stage 3
(320 ch, 64 x 64) -> neck [B, 256, 64, 64]. The convolutional stage works on NCHW tensors, the
attention stages on channels-last [B, H, W, C]. The HQ decoder reads the input of stage 2 (stage 1
merged to 160 channels), [B, 64, 64, 160], as the ViT encoders' first global block output.
Inference only: BatchNorms use their running statistics (the model is always in eval mode).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import neck
from .image_encoder import window_partition, window_unpartition

# Stride of the patch merging after stages 0, 1 and 2. The last merge keeps the resolution, so the
# neck sees the image on the 16x-downsampled grid SAM's decoder expects (the original picks stride 1
# by its output width, 320 / 448 / 576: the last merge of every released TinyViT).
MERGE_STRIDES = (2, 2, 1)
STEM_STRIDE = 4


@dataclass(frozen=True)
class TinyViTConfig:
    img_size: int = 1024
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)  # per stage; stage 0 is convolutional
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)  # stage 0 has no attention: its entry is unused
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)  # likewise
    mlp_ratio: int = 4
    mbconv_expand_ratio: int = 4
    local_conv_size: int = 3  # depthwise conv between attention and MLP
    num_classes: int = 1000  # the unused classification head the checkpoints carry (0: none)
    out_chans: int = 256

    def __post_init__(self):
        fields = (self.embed_dims, self.depths, self.num_heads, self.window_sizes)
        if any(len(f) != 4 for f in fields):
            raise ValueError(f"TinyViTConfig has 4 stages: embed_dims, depths, num_heads, window_sizes need 4 entries each, got {fields}")

    @property
    def grid_size(self) -> int:
        """Side of the image-embedding grid (64 for a 1024 input)."""
        return self.img_size // (STEM_STRIDE * math.prod(MERGE_STRIDES))

    @property
    def interm_dim(self) -> int:
        """Channels of the feature the HQ decoder reads (stage 1 merged to stage 2's width)."""
        return self.embed_dims[2]


class ConvBN(nn.Sequential):
    """Conv (no bias) -> BatchNorm; keys `c.*` and `bn.*` as in the original. NCHW in and out."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)


class PatchEmbed(nn.Module):
    """Two 3x3 stride-2 convs: [B, 3, S, S] -> [B, C, S/4, S/4]."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, embed_dim // 2, 3, 2), nn.GELU(), ConvBN(embed_dim // 2, embed_dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, GELU after the residual add. NCHW."""

    def __init__(self, dim: int, expand_ratio: int):
        super().__init__()
        hidden = dim * expand_ratio
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 conv to the next width, 3x3 depthwise conv with `stride`, 1x1 conv. NCHW."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


def window_offsets(window: int, device: torch.device) -> torch.Tensor:
    """[N, N] long (N = window^2, tokens row-major): |dy| * window + |dx| between two tokens of a
    window, the column of `attention_biases` for that pair (the original numbers the offsets in
    order of first appearance, which is this order)."""
    y, x = torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device), indexing="ij")
    y, x = y.flatten(), x.flatten()
    return (y[:, None] - y[None, :]).abs() * window + (x[:, None] - x[None, :]).abs()


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of one window, with its own LayerNorm and a
    learned bias per head and per |offset| between two tokens."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B', N, C] (N = window^2) -> [B', N, C]."""
        b, n, c = x.shape
        # The qkv features are grouped by head first, [q | k | v] within a head (not SAM-ViT's [3, heads, d]).
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # [B', heads, N, d] each
        bias = self.attention_biases[:, window_offsets(self.window, x.device)]  # [heads, N, N], broadcast over B'
        # SDPA scales q by d ** -0.5 itself; the bias is added after the scaling, as in the original.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2 (the norm is inside, as in the original)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class Block(nn.Module):
    """Windowed attention (residual), a depthwise conv (no residual), an MLP (residual)."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: int, local_conv_size: int):
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = MLP(dim, dim * mlp_ratio)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, W, C] -> [B, H, W, C]."""
        hw = x.shape[1], x.shape[2]
        # Zero-padded BEFORE the attention's LayerNorm: padding tokens enter the softmax as the norm's
        # bias (unmasked), as in the original. A grid of exactly one window is not padded.
        windows, padded_hw = window_partition(x, self.window)  # [B * nWin, w, w, C]
        attended = self.attn(windows.flatten(1, 2)).view_as(windows)
        x = x + window_unpartition(attended, self.window, padded_hw, hw)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class Stage(nn.Module):
    """A container: `blocks`, then an optional `downsample` (keys `layers.i.blocks.j.*`,
    `layers.i.downsample.*`); the encoder runs them, as the layout changes between stages."""

    def __init__(self, blocks: list[nn.Module], downsample: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class ImageEncoderTinyViT(nn.Module):
    def __init__(self, config: TinyViTConfig):
        super().__init__()
        self.config = config
        dims = config.embed_dims
        self.patch_embed = PatchEmbed(dims[0])
        self.layers = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            if i == 0:
                blocks = [MBConv(dims[0], config.mbconv_expand_ratio) for _ in range(depth)]
            else:
                args = (dims[i], config.num_heads[i], config.window_sizes[i], config.mlp_ratio, config.local_conv_size)
                blocks = [Block(*args) for _ in range(depth)]
            downsample = PatchMerging(dims[i], dims[i + 1], MERGE_STRIDES[i]) if i < len(dims) - 1 else None
            self.layers.append(Stage(blocks, downsample))
        # The ImageNet classification head: in every checkpoint, never run (kept so that state dicts
        # match the original's key for key).
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], config.num_classes) if config.num_classes else nn.Identity()
        self.neck = neck(dims[-1], config.out_chans)

    @property
    def img_size(self) -> int:
        """Input side S in pixels (1024 for the released model)."""
        return self.config.img_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images [B, 3, S, S] normalized and padded -> (embeddings [B, 256, G, G], [stage-1
        output merged to stage 2's width, [B, G, G, 160]]), the ViT encoder's interface."""
        x = self.patch_embed(images)  # [B, 64, S/4, S/4]
        for block in self.layers[0].blocks:
            x = block(x)
        x = self.layers[0].downsample(x).permute(0, 2, 3, 1)  # [B, S/8, S/8, 128]
        interm = []
        for i, stage in enumerate(self.layers[1:], start=1):
            for block in stage.blocks:
                x = block(x)
            if stage.downsample is not None:
                x = stage.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            if i == 1:
                interm.append(x)  # [B, G, G, 160]
        return self.neck(x.permute(0, 3, 1, 2)), interm
