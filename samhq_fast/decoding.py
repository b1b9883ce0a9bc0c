"""Prompt decoding for many prompts at a steady shape: prompt encoder + HQ decoder under
torch.compile, prompt batches padded to a few bucket sizes and point lists to a few lengths.

Padding is exact, not approximate: empty prompt slots are masked out of every attention whose keys
are prompt tokens, so the real prompts' outputs are those of the eager decoder. Sparse slots per
prompt (the order of prompt tokens does not matter to the decoder, which has no token positions):
  K point slots      any label, as in SAM (1 / 0 / -1, others the bare positional encoding)
  1 "no box" slot    SAM's padding point (not_a_point_embed): real when points are given without a box
  2 box-corner slots real when the prompt has a box
Which slots are real is said by a token bias (`real_token_columns`) made outside the compiled
function: a constant for a prompt set that fills its rows.
The same function as the eager decoder, computed with less work and fewer kernels: weights packed
once (`PackedWeights`) let the IoU head and the five hypernetwork MLPs run as three batched matmuls
(`stacked_output_mlps`) and the transformer's projections that read one input run as one matmul
(`packed_two_way_transformer`), the output upscaling's transposed convolutions run as matmuls
(`upscaled_by_matmuls`), the HQ token's dot is folded into the last
convolution (`folded_hq_masks`: a 32x smaller convolution), without mask prompts one image's
tokens enter the two-way transformer once for all its prompts (`embed_padded_prompts`), and what
the transformer does before any prompt token is read (`image_side`) is done once per image, not per
call (`PromptDecoder.prepare_images`), and the
output rule (multimask_output, hq_token_only) picks the SAM token before its mask is computed, inside
the compiled function (the flags are tensors: one graph serves every combination). On CUDA the
compiled function runs as CUDA graphs, one per bucket shape (hand-captured ones, or Inductor's
graph trees with cuda_graphs="trees"); on the CPU it is compiled without graphs.
"""

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fused import fused_available, triton_conv_taps
from .graphs import GraphCache, TensorSet, WeightsWatch, write_version, write_versions
from .modeling import SamHQ
from .modeling.common import MLPBlock
from .modeling.mask_decoder import MaskDecoderHQ
from .modeling.prompt_encoder import prompt_count
from .modeling.sam_hq import no_prompt_outputs
from .modeling.transformer import TwoWayTransformer

PROMPT_BUCKETS = (1, 4, 16, 64, 256)  # prompts per decoder call; more are split into chunks of the last
POINT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # points per prompt; more are padded to a multiple of the last
OUTPUT_TOKENS = 6  # the decoder's IoU, 4 SAM mask and HQ tokens, before the prompt tokens
# Dynamo's limits on compiled variants of one function: per guarded object, and in all (renamed in
# torch 2.7: cache_size_limit and accumulated_cache_size_limit before)
_RENAMED = hasattr(torch._dynamo.config, "recompile_limit")
RECOMPILE_LIMIT_NAMES = ("recompile_limit", "accumulated_recompile_limit") if _RENAMED else ("cache_size_limit", "accumulated_cache_size_limit")


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n; past the largest bucket, the next multiple of it (one more shape to compile)."""
    if n > buckets[-1]:
        return -(-n // buckets[-1]) * buckets[-1]
    return next(b for b in buckets if b >= n)


def token_bias_columns(k_pad: int) -> int:
    """Columns of the token bias for k_pad point slots: the 6 output tokens and k_pad + 3 sparse
    slots, rounded up to a multiple of 16. SDPA's memory-efficient kernel, and Inductor's lowering of
    it, read a bias whose rows are aligned (to 8 elements in torch 2.13) in place; an unaligned one
    is copied by every attention that reads it (padded, and under Inductor spread over every query)."""
    return -(-(OUTPUT_TOKENS + k_pad + 3) // 16) * 16


def real_token_columns(k_pad: int, points: int, box: bool) -> list[slice]:
    """The token bias's columns (see `embed_padded_prompts` for the slots) that hold the real tokens
    of a prompt with `points` points in its first point slots, and a box or not."""
    columns = [slice(0, OUTPUT_TOKENS + points)]  # the output tokens, then the points
    no_box = OUTPUT_TOKENS + k_pad
    if box:
        columns.append(slice(no_box + 1, no_box + 3))
    elif points:  # SAM pads points with one not-a-point when there is no box
        columns.append(slice(no_box, no_box + 1))
    return columns


def embed_padded_prompts(model: SamHQ, coords, labels, boxes, masks, has_mask):
    """Fixed-shape prompt embedding.

    coords [P, K, 2] / labels [P, K] (empty slots hold any values: the token bias masks them, so
    that every label value means what it means to the eager decoder), boxes [P, 4], masks
    [P, 1, 4G, 4G] with has_mask [P] (both None when no prompt has a mask: no mask is downscaled),
    all in the resized input frame -> sparse [P, K + 3, C]: K point slots, the "no box" slot, 2 box
    corners; dense [P, C, G, G] (model dtype); without masks dense is the no-mask embedding once,
    [1, C, G, G], the same for every prompt, so that the decoder can share one image's work across them.
    """
    enc = model.prompt_encoder
    dtype = enc.no_mask_embed.weight.dtype
    k = coords.shape[1]
    encoding = enc.encode_coords(torch.cat([coords, boxes.reshape(-1, 2, 2)], dim=1))  # [P, K + 2, C]: one Fourier matmul
    no_box = enc.not_a_point_embed.weight.float().expand(coords.shape[0], 1, -1)
    sparse = torch.cat([enc.label_points(encoding[:, :k], labels), no_box, enc.label_corners(encoding[:, k:])], dim=1).to(dtype)
    g = enc.image_embedding_size
    no_mask = enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *g)
    if masks is None:
        return sparse, no_mask
    dense = torch.where(has_mask[:, None, None, None], enc.mask_downscaling(masks.to(dtype)), no_mask)
    return sparse, dense


def stack_zero_padded(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.stack of tensors whose first dims (a layer's outputs) differ, each zero-padded to the
    largest: zero weight rows and biases give outputs of 0, which no one reads."""
    rows = max(t.shape[0] for t in tensors)
    return torch.stack([F.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - t.shape[0])) for t in tensors], out=out)


def packing_recipes(decoder: MaskDecoderHQ, conv_kernels: bool = False) -> dict[str, tuple[Callable, list[torch.Tensor]]]:
    """What `PackedWeights` packs: name -> (how: stacked, concatenated or laid out, the source tensors).
      output_mlps.{i}.weight / .bias     the six output tokens' MLPs' layer i, stacked ([6, out, in] /
                                         [6, out], `output_token_mlps` order; the IoU head's last
                                         layer zero-padded to the hypernetworks' 32 outputs):
                                         `stacked_output_mlps`
      layers.{i}.self_attn.weight / .bias  block i's self-attention q | k projections (q | k | v in
                                         the first block, which adds no positional encoding)
      layers.{i}.image.weight / .bias    block i's token-to-image keys | image-to-token queries: both
                                         project image + positional encoding
    (`packed_two_way_transformer`);
      hq_conv.weight                     the HQ branch's first convolution's weight: channels-last
                                         (`folded_hq_masks`: under Inductor a channels-last
                                         convolution copies a weight of another layout per call),
                                         or with conv_kernels in `kernels.conv3x3.pack_weight`'s
                                         layout (`fused.triton_conv_taps`)."""
    mlps = decoder.output_token_mlps
    recipes: dict[str, tuple[Callable, list[torch.Tensor]]] = {}
    for i in range(len(mlps[0].layers)):
        for name in ("weight", "bias"):
            recipes[f"output_mlps.{i}.{name}"] = (stack_zero_padded, [getattr(mlp.layers[i], name) for mlp in mlps])
    for i, layer in enumerate(decoder.transformer.layers):
        attn = layer.self_attn
        self_projections = [attn.q_proj, attn.k_proj] + ([attn.v_proj] if layer.skip_first_layer_pe else [])
        image_projections = [layer.cross_attn_token_to_image.k_proj, layer.cross_attn_image_to_token.q_proj]
        for name in ("weight", "bias"):
            recipes[f"layers.{i}.self_attn.{name}"] = (torch.cat, [getattr(p, name) for p in self_projections])
            recipes[f"layers.{i}.image.{name}"] = (torch.cat, [getattr(p, name) for p in image_projections])
    hq_conv = [decoder.embedding_maskfeature[0].weight]
    if conv_kernels:
        from samhq_fast.kernels.conv3x3 import pack_weight

        recipes["hq_conv.weight"] = (lambda sources, out=None: pack_weight(*sources, out=out), hq_conv)
    else:
        recipes["hq_conv.weight"] = (channels_last_copy, hq_conv)
    return recipes


def channels_last_copy(sources: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The one source, a convolution weight [O, I, kh, kw], copied channels-last (into out if given)."""
    (weight,) = sources
    out = torch.empty_like(weight, memory_format=torch.channels_last) if out is None else out
    return out.copy_(weight)


class PackedWeights:
    """Decoder weights stacked or concatenated for the padded decoder (`packing_recipes`): fewer,
    larger matmuls (and, with conv_kernels, a convolution weight laid out for the Triton kernel).
    Packed once and kept (packed per call, each would be a copy kernel in every decoder call);
    `refresh` repacks them in place when a source weight has changed since (weights loaded in
    place), so that a compiled function or a CUDA graph reading these tensors reads the new
    weights. Inference-tensor weights track no versions: they are packed as they are at construction."""

    def __init__(self, decoder: MaskDecoderHQ, conv_kernels: bool = False):
        self._recipes = packing_recipes(decoder, conv_kernels)
        self.output_mlp_layers = len(decoder.output_token_mlps[0].layers)
        self._sources = [t for _, sources in self._recipes.values() for t in sources]
        with torch.inference_mode():
            self.tensors = {name: pack(sources) for name, (pack, sources) in self._recipes.items()}
        for t in self.tensors.values():
            torch._dynamo.mark_static_address(t)  # read in place by graph trees' replays, never copied in
        self._versions = write_versions(self._sources)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def refresh(self) -> None:
        """Repack (in place) if any source weight was written since the last packing."""
        versions = write_versions(self._sources)
        if versions != self._versions:
            with torch.inference_mode():
                for name, (pack, sources) in self._recipes.items():
                    pack(sources, out=self.tensors[name])
            self._versions = versions


def stacked_output_mlps(packed: PackedWeights, output_tokens: torch.Tensor) -> torch.Tensor:
    """The IoU head and `decoder.hypernetworks` as three batched matmuls over the six output tokens'
    MLPs (same shapes but the IoU head's 4 outputs, padded to 32; one weight set per token) instead
    of 18 small ones: fewer kernels per decoder call, which is what a single prompt's latency is
    made of.

    output_tokens [P, 6, 256] -> [P, 6, 32]: the IoU scores in [:, 0, :4] (the rest of row 0 is
    padding), the hypernetwork vectors in [:, 1:].
    """
    x = output_tokens.transpose(0, 1)  # [6, P, 256]: one matmul batch per token
    depth = packed.output_mlp_layers
    for i in range(depth):
        weight, bias = packed[f"output_mlps.{i}.weight"], packed[f"output_mlps.{i}.bias"]
        x = torch.baddbmm(bias[:, None], x, weight.transpose(1, 2))
        if i < depth - 1:
            x = torch.relu(x)
    return x.transpose(0, 1)


def image_projections(transformer: TwoWayTransformer, packed: PackedWeights, i: int, keys, key_pe) -> tuple[torch.Tensor, torch.Tensor]:
    """Block i's projections of the image tokens keys [B, hw, C] (positional encoding key_pe [1, hw, C])
    -> (its token-to-image keys | image-to-token queries [B, hw, 2 C'], one packed matmul; its
    token-to-image values [B, hw, C'])."""
    weight, bias = packed[f"layers.{i}.image.weight"], packed[f"layers.{i}.image.bias"]
    return F.linear(keys + key_pe, weight, bias), transformer.layers[i].cross_attn_token_to_image.v_proj(keys)


def image_side(transformer: TwoWayTransformer, packed: PackedWeights, image, image_pe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-way transformer's work that reads no prompt token: the image tokens and the first
    block's projections of them (`image_projections`). Without mask prompts, its input is one
    image's embeddings plus the no-mask embedding for all its prompts: done once per image
    (`PromptDecoder.prepare_images`), not once per call.

    image [B, C, G, G] (image embeddings + dense prompt embeddings), image_pe [1, C, G, G]
    -> (keys [B, G*G, C], projections [B, G*G, 2 C'], values [B, G*G, C'])."""
    keys = image.flatten(2).transpose(1, 2)
    return keys, *image_projections(transformer, packed, 0, keys, image_pe.flatten(2).transpose(1, 2))


def relu_mlp(mlp: MLPBlock, x: torch.Tensor) -> torch.Tensor:
    """`mlp(x)` for a ReLU MLPBlock (lin1 -> ReLU -> lin2) with the ReLU in lin1's matmul: on CUDA
    cuBLASLt's bias + ReLU epilogue (`torch._addmm_activation`), not a kernel of its own (Inductor
    keeps the op whole). The same values: ReLU commutes with rounding the matmul's output.
    x [..., C] -> [..., C]."""
    if not isinstance(mlp.act, nn.ReLU):
        raise ValueError(f"relu_mlp needs an MLPBlock with a ReLU, got {mlp.act}")
    hidden = torch._addmm_activation(mlp.lin1.bias, x.reshape(-1, x.shape[-1]), mlp.lin1.weight.t())  # [rows, hidden]
    return mlp.lin2(hidden).view(*x.shape[:-1], -1)


def packed_two_way_transformer(transformer: TwoWayTransformer, packed: PackedWeights, side, image_pe, tokens, token_mask=None):
    """`transformer(image, image_pe, tokens, token_mask)` from `image_side(transformer, packed, image,
    image_pe)`, with the projections that read one input run as one matmul each (`packing_recipes`):
    per block, self-attention's q and k (and v in the first block), and the image side's
    token-to-image keys with the image-to-token queries; the MLPs' ReLU in their first matmul
    (`relu_mlp`). Same outputs as the module's forward."""
    keys, projections, values = side  # [B or 1, hw, C], the first block's [B or 1, hw, 2 C'] and [B or 1, hw, C']
    key_pe = image_pe.flatten(2).transpose(1, 2)
    queries = tokens
    for i, layer in enumerate(transformer.layers):
        self_attn, to_image, to_tokens = layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        weight, bias = packed[f"layers.{i}.self_attn.weight"], packed[f"layers.{i}.self_attn.bias"]
        if layer.skip_first_layer_pe:
            q, k, v = F.linear(queries, weight, bias).split(self_attn.q_proj.out_features, dim=-1)
            queries = self_attn.attend(q, k, v, token_mask)
        else:
            q, k = F.linear(queries + tokens, weight, bias).split(self_attn.q_proj.out_features, dim=-1)
            queries = queries + self_attn.attend(q, k, self_attn.v_proj(queries), token_mask)
        queries = layer.norm1(queries)
        if i > 0:  # the first block's came with the image side
            projections, values = image_projections(transformer, packed, i, keys, key_pe)
        image_keys, image_queries = projections.split(to_image.k_proj.out_features, dim=-1)
        queries = layer.norm2(queries + to_image.attend(to_image.q_proj(queries + tokens), image_keys, values))
        queries = layer.norm3(queries + relu_mlp(layer.mlp, queries))
        attended = to_tokens.attend(image_queries, to_tokens.k_proj(queries + tokens), to_tokens.v_proj(queries), token_mask)
        keys = layer.norm4(keys + attended)
    queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(queries + tokens, keys + key_pe, keys))
    return queries, keys


def conv_transpose_2x2(pixels: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """`conv` (kernel 2, stride 2) as one matmul. Its 2x2 output blocks do not overlap: output pixel
    (2y + i, 2x + j) is input pixel (y, x) times the weight's tap (i, j), so the weight viewed as
    [C_in, C_out * 2 * 2] maps each input pixel to its whole output block. The matmul reads the
    weight where it is (under Inductor, a cuDNN transposed convolution takes a channels-last copy of
    its weight per call), and rows may come in any order: blocks stay where their pixel was, and
    whoever assembles the image reorders them once.

    pixels [..., C_in] -> [..., 2 (i), 2 (j), C_out], bias added.
    """
    if conv.kernel_size != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0) or conv.output_padding != (0, 0) or conv.groups != 1:
        raise ValueError(f"conv_transpose_2x2 needs a transposed convolution of kernel 2, stride 2, no padding, one group: got {conv}")
    c_in, c_out = pixels.shape[-1], conv.out_channels
    blocks = pixels.reshape(-1, c_in) @ conv.weight.reshape(c_in, c_out * 4)  # [pixels, C_out * (i, j)]
    return blocks.view(*pixels.shape[:-1], c_out, 2, 2).movedim(-3, -1) + conv.bias


def upscaled_by_matmuls(upscaling: nn.Sequential, pixels: torch.Tensor) -> torch.Tensor:
    """`upscaling` (ConvT 2x2 s2 -> LayerNorm2d -> GELU -> ConvT 2x2 s2 [-> GELU], the decoder's
    `output_upscaling`) with each transposed convolution as a matmul (`conv_transpose_2x2`). The
    first one's output blocks feed the second as they are; the image is assembled at the end, after
    the trailing GELU (elementwise: where the pixels are does not matter to it), so that the one
    copy that assembles it is the output, channels-last: a GELU after it would be a pass of its own,
    which Inductor writes in the default (NCHW) layout.

    pixels [P, h, w, C] (channels-last) -> [P, C_out, 4h, 4w] (channels-last in memory).
    """
    first, norm, gelu, second, *rest = upscaling
    if not all(isinstance(module, nn.GELU) for module in rest):
        raise ValueError(f"upscaled_by_matmuls: the modules after the second transposed convolution must be GELUs, got {rest}")
    p, h, w, _ = pixels.shape
    x = conv_transpose_2x2(pixels, first)  # [P, h, w, 2, 2, C/4]: pixel (2y + i, 2x + j)
    x = gelu(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))  # LayerNorm2d: over channels
    x = conv_transpose_2x2(x, second)  # [P, h, w, 2, 2, 2, 2, C_out]: pixel (4y + 2i + i', 4x + 2j + j')
    for module in rest:
        x = module(x)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(p, 4 * h, 4 * w, second.out_channels).permute(0, 3, 1, 2)


def folded_hq_masks(decoder: MaskDecoderHQ, upscaled_sam: torch.Tensor, hq_features: torch.Tensor, hyper_hq: torch.Tensor,
                    conv_taps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    first_weight: torch.Tensor | None = None) -> torch.Tensor:
    """`decoder.hq_masks` with the HQ token's dot folded into the last 3x3 convolution. The dot over
    that convolution's 32 output channels is linear, so per prompt
        hyper . (conv(f, W) + b + hq) = conv(f, hyper . W) + hyper . b + hyper . hq,
    a 3x3 filter with one output channel instead of 32 (at 256 x 256: 2.4 GFLOP -> 75 MFLOP per
    prompt, and the 32-channel map is never written). That filter runs as 9 per-prompt projections
    of the 64 channels (each tap's channel sums at every pixel) and a sum of the 9 shifted tap maps.

    upscaled_sam [P, 32, H, W], hq_features [1 or P, 32, H, W], hyper_hq [P, 32] -> [P, 1, H*W].
    conv_taps: computes the first convolution + LayerNorm2d + GELU and projects its 64 channels by
    the tap filters [P, 9, 64] -> [P, 9, H, W] some other way (`fused.triton_conv_taps`: one kernel,
    the 64-channel map never written); None for the decoder's own modules, the first convolution
    with first_weight if given (its weight in another layout: `packing_recipes`' hq_conv.weight).
    """
    first_conv, norm, gelu, last_conv = decoder.embedding_maskfeature
    p, _, h, w = upscaled_sam.shape
    size = 3  # the last conv is 3x3 with padding 1: output pixel (y, x) reads (y + i - 1, x + j - 1)
    filters = torch.einsum("po,oct->ptc", hyper_hq, last_conv.weight.flatten(2))  # [P, 9 taps, 64]
    if conv_taps is not None:
        taps = conv_taps(upscaled_sam, filters)  # [P, 9, H, W]
    else:
        weight = first_conv.weight if first_weight is None else first_weight
        features = gelu(norm(F.conv2d(upscaled_sam, weight, first_conv.bias, first_conv.stride, first_conv.padding)))  # [P, 64, H, W]
        c = features.shape[1]
        if features.is_contiguous(memory_format=torch.channels_last):  # [P, H*W, 64] pixels is a view
            taps = (features.permute(0, 2, 3, 1).reshape(p, h * w, c) @ filters.transpose(1, 2)).transpose(1, 2)
        else:
            taps = filters @ features.flatten(2)  # [P, 9, H*W]
    taps = F.pad(taps.reshape(p, size, size, h, w), (1, 1, 1, 1))  # zeros outside the map, as the conv's padding
    masks = sum(taps[:, i, j, i : i + h, j : j + w] for i in range(size) for j in range(size))  # [P, H, W]
    masks = masks + (hyper_hq @ last_conv.bias)[:, None, None]
    return masks.reshape(p, 1, h * w) + hyper_hq[:, None] @ hq_features.flatten(2)


def joined_image_side(transformer: TwoWayTransformer, packed: PackedWeights, image, image_pe) -> torch.Tensor:
    """`image_side` as one tensor [B, G*G, C + 3 C'] (one argument of the compiled decoder, one gather per prompt)."""
    return torch.cat(image_side(transformer, packed, image, image_pe), dim=-1)


def split_image_side(transformer: TwoWayTransformer, joined: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`joined_image_side`'s output -> `image_side`'s three parts (views)."""
    inner = transformer.layers[0].cross_attn_token_to_image.v_proj.out_features
    return joined.split([joined.shape[-1] - 3 * inner, 2 * inner, inner], dim=-1)


def decode_padded(model: SamHQ, image_embeddings, joined_side, image_pe, hq_features, image_index, coords, labels, boxes, token_bias, masks,
                  has_mask, multimask_output, hq_token_only, *, packed: PackedWeights, conv_taps=None):
    """-> the mask logits [P, 1, 4G, 4G] and IoU scores [P, 1] that the output rule (`select_masks`)
    picks, the eager decoder's, computed with less work (see the module docstring).

    The images: without mask prompts (masks None), joined_side [B, G*G, C + 3 C']
    (`joined_image_side` of each image plus the no-mask embedding: the same for all its prompts,
    computed once per image) and image_embeddings None; with mask prompts, whose dense embeddings
    differ per prompt, image_embeddings [B, 256, G, G] and joined_side None. hq_features [B, 32, 4G, 4G]
    of the same B images; image_index [P] (long) says which image each prompt reads, or None when
    B = 1 (broadcast, no per-prompt copy).
    token_bias [P, token_bias_columns(K)] (model dtype): 0 in the columns of real tokens
    (`real_token_columns`), -inf elsewhere. multimask_output, hq_token_only: 0-dim bool tensors, so
    that one compiled graph serves every combination of the two. packed: the decoder's packed
    weights, kept fresh by the caller (`PackedWeights.refresh`). conv_taps: see `folded_hq_masks`."""
    decoder = model.mask_decoder
    if image_index is not None:
        hq_features = hq_features[image_index]
    sparse, dense = embed_padded_prompts(model, coords, labels, boxes, masks, has_mask)
    if masks is None:
        side = split_image_side(decoder.transformer, joined_side if image_index is None else joined_side[image_index])
    else:
        image = image_embeddings if image_index is None else image_embeddings[image_index]
        side = image_side(decoder.transformer, packed, image + dense, image_pe)
    # [P, 1, 1, 6 + K + 3], a view whose rows keep their aligned pitch (SDPA reads it in place)
    token_mask = token_bias.view(token_bias.shape[0], 1, 1, -1)[..., : OUTPUT_TOKENS + sparse.shape[1]]
    hs, keys = packed_two_way_transformer(decoder.transformer, packed, side, image_pe, decoder.prompt_tokens(sparse), token_mask)
    output_tokens = hs[:, :OUTPUT_TOKENS]
    upscaled_sam = upscaled_by_matmuls(decoder.output_upscaling, keys.reshape(sparse.shape[0], *image_pe.shape[-2:], keys.shape[-1]))
    outputs = stacked_output_mlps(packed, output_tokens)  # [P, 6, 32]
    iou, hyper = outputs[:, 0, : decoder.num_mask_tokens], outputs[:, 1:]  # [P, 4], [P, 5, 32]
    # The output rule before the masks: the IoU scores do not depend on them, so only the chosen SAM
    # token's mask is computed (one matmul row per prompt instead of four).
    _, best = iou[:, 1:4].max(dim=1, keepdim=True)  # [P, 1]: the first of the best multimask tokens, as select_masks
    token = torch.where(multimask_output, best + 1, 0)  # [P, 1]: the SAM token whose mask is output
    hyper_sam = hyper.gather(1, token[:, :, None].expand(-1, -1, hyper.shape[2]))  # [P, 1, 32]
    sam_masks = hyper_sam @ upscaled_sam.flatten(2)  # [P, 1, 16 G^2]
    hq = folded_hq_masks(decoder, upscaled_sam, hq_features, hyper[:, 4], conv_taps, packed["hq_conv.weight"])  # [P, 1, 16 G^2]
    logits = torch.where(hq_token_only, hq, sam_masks + hq)
    return logits.view(-1, 1, *upscaled_sam.shape[-2:]), iou.gather(1, token)


class PreparedImages:
    """B images as the decoder reads them (`PromptDecoder.prepare_images`): their embeddings
    [B, 256, G, G] and HQ features [B, 32, 4G, 4G] as given, their `joined_image_side` with the
    no-mask embedding [B, G*G, C + 3 C'], and what that was made from (weights' and images' write
    versions)."""

    def __init__(self, embeddings: torch.Tensor, hq_features: torch.Tensor, joined_side: torch.Tensor, made_from: tuple):
        self.embeddings, self.hq_features, self.joined_side, self.made_from = embeddings, hq_features, joined_side, made_from
        self._single: dict[int, tuple] = {}

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings, joined side, HQ features) of all B images."""
        return self.embeddings, self.joined_side, self.hq_features

    def image(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`tensors` of image i alone (batch 1): views made once, so that the CUDA graphs, which skip
        copying a tensor they were given last time, get the same ones every call."""
        if len(self.embeddings) == 1:
            return self.tensors
        if i not in self._single:
            self._single[i] = tuple(t[i : i + 1] for t in self.tensors)
        return self._single[i]


def as_decoder_input(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor as an argument of the compiled decoder: contiguous, in dtype, and an inference tensor like
    the padded batch's own buffers (call under inference mode). Dynamo guards on strides, dtype and
    whether a tensor is an inference tensor: a caller's plain tensor in place of a buffer would
    compile the shape again. Copied when it is not all of that already."""
    if tensor.is_inference() and tensor.dtype == dtype and tensor.is_contiguous():
        return tensor
    return tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def padded_rows(num: int) -> int:
    """Rows the padded prompt batch has for num prompts: full chunks of the largest bucket, then the
    bucket of the rest (so every chunk is a bucket size)."""
    full, rest = divmod(num, PROMPT_BUCKETS[-1])
    return full * PROMPT_BUCKETS[-1] + (bucket(rest, PROMPT_BUCKETS) if rest else 0)


# Inductor's AVX-512 code transposes bf16 / fp16 tiles wrongly in some kernels (torch 2.13: a
# transposed input read by a kernel with two outputs comes back as garbage, see
# tests/test_decoding.py), which turns the two-way transformer's image keys (a transposed view of the
# embedding) into NaN. With 256-bit vectors Inductor takes another, correct, transpose path.
CPU_HALF_PRECISION_OPTIONS = {"cpp.simdlen": 256}


class PromptDecoder:
    """Decodes any number of prompts, of one image or of several, with few compiled shapes.

    compile=False runs the same padded function eagerly (the reference for the compiled one).
    cuda_graphs: None (the default) = "manual" when compiled on a CUDA model, False otherwise;
      "manual" (or True): the compiled function captured in a torch.cuda.CUDAGraph per shape by
      `graphs.GraphCache` (static input buffers, less Python per replay: on an H200 one box timed
      alone took 0.76 ms against 0.91 ms with graph trees, and its first call half the time);
      "trees": torch.compile(mode="reduce-overhead"), Inductor's CUDA-graph trees;
      False: no graphs. Graphs need compile=True and a CUDA model.
    The HQ branch's last convolution is folded with the HQ token's dot (`folded_hq_masks`).
    conv_kernels=True runs its first 3x3 convolution + LayerNorm2d + GELU, projected by the folded
      tap filters, as one Triton kernel of `kernels/conv3x3.py` (`fused.triton_conv_taps`: the
      64-channel map is never written) instead of cuDNN + Inductor's code; off by default until a
      GPU run has timed it (bench/NOTES.md, predictions 20, 23 and 28). Needs the Triton kernels (a
      CUDA model, or the interpreter).
    Shapes compiled: one per (prompt bucket, point bucket, images set, whether any prompt has a mask);
    each compiles on its first call.
    Per-image work is kept for the last images given (`prepare_images`): calls on the same
    embeddings and HQ feature tensors skip it, and their graph replays copy in only the prompts.
    """

    GRAPH_MODES = (None, False, True, "trees", "manual")

    # Dynamo's per-function recompile limit (8 by default) is below the number of bucket shapes
    # (5 prompt x 7 point buckets, times the image counts seen), and its limit over all variants of
    # the function (256; every PromptDecoder of the process compiles the same function) is within
    # reach: past either, a fullgraph compile fails hard. New shapes are compiled under this higher
    # limit for both; known shapes skip the (slow) config patch, unless a guard other than the shape
    # fails (requires_grad, a tensor layout, inference mode...): that recompile hits the default
    # limit, and is retried under the higher one. A shape past this limit too runs uncompiled, with
    # a warning (correct, but slow and without graphs).
    RECOMPILE_LIMIT = 4096

    def __init__(self, model: SamHQ, compile: bool = True, backend: str = "inductor", cuda_graphs: bool | str | None = None,
                 conv_kernels: bool = False):
        if cuda_graphs not in self.GRAPH_MODES:
            raise ValueError(f"cuda_graphs must be one of {self.GRAPH_MODES}, got {cuda_graphs!r}")
        self.model = model
        self._options = compile, backend, cuda_graphs
        self.conv_kernels = bool(conv_kernels)
        self._weights = WeightsWatch(model)
        self._bind()

    def _bind(self) -> None:
        """Everything that depends on the model's device, dtype and weight tensors: the graph mode,
        the compiled function, its graphs, the positional encoding. Done again when the model's
        tensors have been replaced, moved or cast since (`graphs.WeightsWatch`: its graphs would
        replay the old weights' addresses, its packed weights hold the old values)."""
        model, (compile, backend, cuda_graphs) = self.model, self._options
        on_cuda = model.device.type == "cuda"
        if cuda_graphs and not (compile and on_cuda):
            why = "compile=False" if not compile else f"the model is on {model.device}, not a CUDA device"
            raise ValueError(f"cuda_graphs={cuda_graphs!r} needs a compiled decoder on a CUDA model, but {why}")
        graphs = ("manual" if on_cuda and compile else False) if cuda_graphs is None else "manual" if cuda_graphs is True else cuda_graphs
        self.cuda_graphs = graphs
        conv_taps = None
        if self.conv_kernels:
            ok, why = fused_available(model.device, model.dtype)
            if not ok:
                raise ValueError(f"conv_kernels=True needs the Triton kernels, which cannot run here: {why}")
        self._packed = packed = PackedWeights(model.mask_decoder, self.conv_kernels)
        if self.conv_kernels:
            conv_taps = functools.partial(triton_conv_taps, model.mask_decoder, packed["hq_conv.weight"])
        fn = lambda *args: decode_padded(model, *args, packed=packed, conv_taps=conv_taps)  # noqa: E731  (compile a closure, not the module)
        self._uncompiled = fn  # for shapes past the recompile limit
        if compile:
            mode = "reduce-overhead" if graphs == "trees" else None
            cpu_half = not on_cuda and model.dtype in (torch.float16, torch.bfloat16) and backend == "inductor"
            options = CPU_HALF_PRECISION_OPTIONS if cpu_half else None
            fn = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode, backend=backend, options=options)
        self.compiled = compile
        # Tensors the decoder made or keeps (the images' and their image side, the positional encoding,
        # constants) are never written: a replay copies in only what changed, the caller's prompts.
        self._kept = TensorSet()
        self._encode_dense_pe()
        self._decode = fn
        self._graphs = GraphCache(fn, kept=self._kept) if graphs == "manual" else None
        self._images = None  # the last PreparedImages: image sides made with these weights
        # What an image side is computed from besides the image: the first block's image projections
        # and the no-mask embedding (the positional encoding is a new tensor when it changes)
        first = model.mask_decoder.transformer.layers[0]
        side_modules = (first.cross_attn_token_to_image.k_proj, first.cross_attn_image_to_token.q_proj, first.cross_attn_token_to_image.v_proj)
        self._side_sources = [t for m in side_modules for t in (m.weight, m.bias)] + [model.prompt_encoder.no_mask_embed.weight]
        self._shapes_seen, self._uncompiled_shapes = set(), set()
        self._constants = {}  # (role, shape, fill) -> a tensor of the model's device, never written

    def _basis_version(self) -> tuple | None:
        """The Fourier basis's `write_versions`. Loading weights in place (model.load_state_dict) keeps
        every tensor's address, so only this tells that image_pe is stale (the compiled function and
        its graphs read the new weights where they were)."""
        return write_versions([self.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix])

    def _encode_dense_pe(self) -> None:
        """image_pe [1, 256, G, G], the same for every call, and the basis version it comes from."""
        self._pe_version = self._basis_version()
        self.image_pe = self.model.prompt_encoder.get_dense_pe()
        self._kept.add(self.image_pe)
        self._images = None  # their image sides read the old one

    @torch.inference_mode()
    def prepare_images(self, image_embeddings: torch.Tensor, hq_features: torch.Tensor) -> "PreparedImages":
        """The decoder's per-image work on these images, done now (SamHQPredictor.set_image calls it)
        rather than in the first decoder call: `image_side` of each image with the no-mask
        embedding. Calls given these same tensors again reuse it, until the decoder's weights or the
        tensors themselves are written (tensors that track versions: an inference-mode tensor written
        in place under inference mode is not noticed; give a new tensor then). Their CUDA-graph
        replays copy in the prompts alone (`graphs.GraphCache`'s kept tensors).
        image_embeddings [B, 256, G, G], hq_features [B, 32, 4G, 4G] (the model's dtype and device)."""
        return self._prepared_images(image_embeddings, hq_features)

    def _prepared_images(self, image_embeddings: torch.Tensor, hq_features: torch.Tensor) -> "PreparedImages":
        """`prepare_images` (under inference mode), after bringing everything that depends on the
        weights up to date."""
        if self._weights.changed():
            self._bind()
        if self._basis_version() != self._pe_version:
            self._encode_dense_pe()
        self._packed.refresh()
        made_from = (write_versions(self._side_sources), write_version(image_embeddings), write_version(hq_features))
        images = self._images
        if images is None or images.embeddings is not image_embeddings or images.hq_features is not hq_features or images.made_from != made_from:
            no_mask = self.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # the dense embedding without a mask prompt
            side = joined_image_side(self.model.mask_decoder.transformer, self._packed, image_embeddings + no_mask, self.image_pe)
            self._images = images = PreparedImages(image_embeddings, hq_features, side, made_from)
            self._kept.update(images.tensors)
        return images

    def forget_images(self) -> None:
        """Drops what the decoder keeps of the last images it was given (their prepared image side,
        the graphs' hold on their tensors): memory, when they are done with."""
        self._images = None
        if self._graphs is not None:
            self._graphs.forget_kept()

    def _constant(self, role: str, shape: tuple, dtype: torch.dtype, fill) -> torch.Tensor:
        """A tensor of `shape` all `fill`, made once per role and shape: the padded batch's parts that
        no prompt sets (no points, no boxes) or that every row sets (the has_* flags of a batch
        without padding rows), and the output rule's flags, with no fill launched per call. The
        decoder only reads its inputs. One tensor per role: two arguments never alias (Dynamo would
        guard on, and recompile for, which arguments are the same tensor)."""
        key = (role, shape, fill)
        if key not in self._constants:
            self._constants[key] = torch.full(shape, fill, dtype=dtype, device=self.model.device)
            self._kept.add(self._constants[key])
        return self._constants[key]

    def _token_bias(self, rows: int, k_pad: int, points: int, box: bool) -> torch.Tensor:
        """token_bias [rows, token_bias_columns(k_pad)] (see decode_padded) of `rows` prompts with
        `points` points in k_pad slots and a box or not: made once per shape and kind, as `_constant`."""
        key = ("token_bias", (rows, k_pad), (points, box))
        if key not in self._constants:
            bias = torch.full((token_bias_columns(k_pad),), float("-inf"), dtype=self.model.dtype, device=self.model.device)
            for columns in real_token_columns(k_pad, points, box):
                bias[columns] = 0
            self._constants[key] = bias.expand(rows, -1).contiguous()  # contiguous, as a staged buffer (Dynamo guards on strides)
            self._kept.add(self._constants[key])
        return self._constants[key]

    def _fill_slots(self, values: torch.Tensor, k_pad: int, role: str) -> torch.Tensor:
        """values [rows, K, ...] (point coords or labels) in k_pad >= K slots per row, float32, zeros in
        the empty slots (masked by the token bias: never read): one concatenation with a constant, no
        zero-filled buffer per call (integer labels become float32 in it)."""
        rows, points = values.shape[:2]
        if points < k_pad:
            empty = self._constant(f"empty {role} slots", (rows, k_pad - points, *values.shape[2:]), torch.float32, 0)
            values = torch.cat([values, empty], dim=1)
        return as_decoder_input(values, torch.float32)

    def _padded_batch(self, decoded_sets: list, rows: int, k_pad: int, any_mask: bool, one_image: bool) -> tuple:
        """(index, coords, labels, box, token_bias, masks, has_mask): the prompt sets laid out
        as `rows` padded rows (see decode_padded; masks / has_mask None without mask prompts). index
        [rows] says which image each row reads (empty rows: image 0), None for one_image. One set
        that fills every row (one box, one prompt of any number of points, 4 boxes...) is used as given
        (`as_decoder_input`), its point lists padded to k_pad slots by one concatenation each: no
        staging buffers; otherwise the sets are copied into zero-filled ones."""
        (_, point_coords, point_labels, boxes, mask_input), n = decoded_sets[0]
        if len(decoded_sets) == 1 and n == rows:
            no_points, no_box = point_coords is None, boxes is None
            return (
                None,  # one set: one image
                self._constant("coords", (rows, k_pad, 2), torch.float32, 0) if no_points else self._fill_slots(point_coords, k_pad, "coords"),
                self._constant("labels", (rows, k_pad), torch.float32, 0) if no_points else self._fill_slots(point_labels, k_pad, "labels"),
                self._constant("box", (rows, 4), torch.float32, 0) if no_box else as_decoder_input(boxes, torch.float32),
                self._token_bias(rows, k_pad, 0 if no_points else point_coords.shape[1], not no_box),
                None if not any_mask else as_decoder_input(mask_input, self.model.dtype),
                None if not any_mask else self._constant("has_mask", (rows,), torch.bool, True),
            )
        # The padded batch: empty rows are all padding (no point, no box, no mask) and read image 0.
        device, dtype = self.model.device, self.model.dtype
        low_res = 4 * self.model.config.embedding_size
        index = None if one_image else torch.zeros(rows, dtype=torch.int64, device=device)
        coords = torch.zeros(rows, k_pad, 2, device=device)
        labels = torch.zeros(rows, k_pad, device=device)  # float: an int buffer would round a label of 0.5 to 0
        box = torch.zeros(rows, 4, device=device)
        token_bias = self._token_bias(1, k_pad, 0, False).expand(rows, -1).clone(memory_format=torch.contiguous_format)  # empty rows: the output tokens alone
        masks = torch.zeros(rows, 1, low_res, low_res, device=device, dtype=dtype) if any_mask else None
        has_mask = torch.zeros(rows, dtype=torch.bool, device=device) if any_mask else None
        start = 0
        for (image, point_coords, point_labels, boxes, mask_input), n in decoded_sets:
            set_rows = slice(start, start + n)
            if index is not None:
                index[set_rows] = image  # a Python int: filled on the device, no host-to-device copy
            if point_coords is not None:
                coords[set_rows, : point_coords.shape[1]] = point_coords
                labels[set_rows, : point_coords.shape[1]] = point_labels
            if boxes is not None:
                box[set_rows] = boxes
            token_bias[set_rows] = self._token_bias(1, k_pad, 0 if point_coords is None else point_coords.shape[1], boxes is not None)
            if mask_input is not None:
                masks[set_rows] = mask_input
                has_mask[set_rows] = True
            start += n
        return index, coords, labels, box, token_bias, masks, has_mask

    def _run(self, *args):
        """decode_padded(model, *args) through the compiled function / its graphs."""
        _, _, _, hq_features, image_index, coords, _, _, _, masks, _, _, _ = args
        shape = (coords.shape[0], coords.shape[1], hq_features.shape[0], image_index is None, masks is not None)
        call = self._decode if self._graphs is None else (lambda *a: self._graphs(shape, *a))  # noqa: E731
        if not self.compiled:
            return call(*args)
        if shape in self._shapes_seen:
            try:
                return call(*args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                pass
        if shape in self._uncompiled_shapes:
            return self._uncompiled(*args)
        try:
            with torch._dynamo.config.patch(dict.fromkeys(RECOMPILE_LIMIT_NAMES, self.RECOMPILE_LIMIT)):
                out = call(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            warnings.warn(
                f"PromptDecoder: torch.compile's limit of compiled variants (PromptDecoder.RECOMPILE_LIMIT = "
                f"{self.RECOMPILE_LIMIT}) is reached; the shape (prompts, points, images, one image, masks) = {shape} "
                "runs uncompiled (correct, but slower)", stacklevel=2,
            )
            self._uncompiled_shapes.add(shape)
            return self._uncompiled(*args)
        self._shapes_seen.add(shape)
        return out

    def __call__(
        self,
        image_embeddings: torch.Tensor,
        hq_features: torch.Tensor,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        hq_token_only: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same inputs as `SamHQPredictor.predict_torch` (input frame, prompt axis N) plus the image's
        embeddings [1, 256, G, G] and HQ features [1, 32, 4G, 4G] -> (logits [N, 1, 4G, 4G], scores [N, 1])."""
        prompts = (0, point_coords, point_labels, boxes, mask_input)
        return self.decode_images(image_embeddings, hq_features, [prompts], multimask_output, hq_token_only)[0]

    @torch.inference_mode()
    def decode_images(
        self, image_embeddings: torch.Tensor, hq_features: torch.Tensor, prompt_sets: list, multimask_output: bool, hq_token_only: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prompts of several images in one padded batch (one compiled call per 256 prompts).

        image_embeddings [B, 256, G, G], hq_features [B, 32, 4G, 4G]; prompt_sets: a list of
        (image index < B, point_coords [N, K, 2] | None, point_labels [N, K] | None, boxes [N, 4] | None,
        mask_input [N, 1, 4G, 4G] | None) in the input frame; N (0 too) and K may differ between sets.
        -> per set, (logits [N, 1, 4G, 4G], scores [N, 1]), as `__call__` on that set's image alone.
        The per-image work is done on the first call given these tensors (or by `prepare_images`).
        """
        images = {prompt[0] for prompt in prompt_sets}
        if not all(isinstance(i, int) and 0 <= i < image_embeddings.shape[0] for i in images):
            raise ValueError(f"prompt_sets name images {sorted(images, key=str)}, but {image_embeddings.shape[0]} are given")
        counts = [prompt_count(coords, boxes, masks) for _, coords, _, boxes, masks in prompt_sets]
        if not any(counts):  # nothing to decode (e.g. frames without detections): no graph replay
            return [no_prompt_outputs(hq_features) for _ in prompt_sets]
        prepared = self._prepared_images(image_embeddings, hq_features)  # (kept from an earlier call on these images)
        decoded_sets = [(prompt, n) for prompt, n in zip(prompt_sets, counts) if n]  # sets with N = 0 take no rows
        images = {prompt[0] for prompt, _ in decoded_sets}
        one_image = len(images) == 1
        # one image of several: its own tensors, broadcast over its prompts (no per-prompt index)
        image_embeddings, joined_side, hq_features = prepared.image(images.pop()) if one_image else prepared.tensors
        if joined_side not in self._kept:  # one image's views, made once
            self._kept.update((image_embeddings, joined_side, hq_features))
        most_points = max(0 if prompt[1] is None else prompt[1].shape[1] for prompt, _ in decoded_sets)
        k_pad = bucket(max(most_points, 1), POINT_BUCKETS)
        rows = padded_rows(sum(counts))
        any_mask = any(prompt[4] is not None for prompt, _ in decoded_sets)  # else no mask buffers: a shape of its own
        index, coords, labels, box, token_bias, masks, has_mask = self._padded_batch(decoded_sets, rows, k_pad, any_mask, one_image)
        total = sum(counts)
        output_rule = (self._constant("multimask_output", (), torch.bool, bool(multimask_output)),
                       self._constant("hq_token_only", (), torch.bool, bool(hq_token_only)))
        padded = (index, coords, labels, box, token_bias, masks, has_mask)
        image_args = (image_embeddings, None) if any_mask else (None, joined_side)  # see decode_padded
        chunk_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for chunk_start in range(0, rows, PROMPT_BUCKETS[-1]):
            chunk = slice(chunk_start, min(chunk_start + PROMPT_BUCKETS[-1], rows))  # a bucket size, by padded_rows
            # One chunk (up to 256 rows) is the whole batch: no views, which cost host time on every call.
            chunk_index, *chunk_prompts = padded if rows <= PROMPT_BUCKETS[-1] else (None if t is None else t[chunk] for t in padded)
            chunk_logits, chunk_scores = self._run(*image_args, self.image_pe, hq_features, chunk_index, *chunk_prompts, *output_rule)
            real = total - chunk_start  # padding rows only in the last chunk
            if real < chunk_logits.shape[0]:
                chunk_logits, chunk_scores = chunk_logits[:real], chunk_scores[:real]
            # Copy out of the CUDA graph's static outputs now: the next chunk's replay overwrites them.
            chunk_outputs.append((chunk_logits.clone(), chunk_scores.clone()))
            # Drop every reference to the graph's outputs before the next chunk: CUDA-graph trees
            # treat a call made while a previous call's outputs are alive as a new graph to record.
            del chunk_logits, chunk_scores
        logits, scores = map(torch.cat, zip(*chunk_outputs)) if len(chunk_outputs) > 1 else chunk_outputs[0]
        if len(counts) == 1:
            return [(logits, scores)]
        return list(zip(logits.split(counts), scores.split(counts)))
