"""The fixed-shape prompt decoder (samhq_fast.decoding) against the eager prompt encoder + HQ decoder.

Padding must be exact: padded prompt rows are independent, and padded point slots are masked out of
every attention over prompt tokens. The compiled decoder must not recompile while prompt and point
counts stay within their buckets.
"""

import contextlib
import copy
import json
import warnings

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from samhq_fast import SamHQPredictor, decoding
from samhq_fast.benchmark.common import rel_l2
from samhq_fast.decoding import PromptDecoder
from samhq_fast.fused import apply_fused_backend
from test_predictor import make_photo

G = 16  # tiny model: 16x16 embedding grid, 64x64 low-res masks


def encoded_images(model, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [num, 256, G, G], hq_features [num, 32, 4G, 4G]) of random input images."""
    with torch.inference_mode():
        embeddings, _, hq_features = model.encode_image(torch.randn(num, 3, 256, 256, generator=torch.Generator().manual_seed(seed)))
    return embeddings, hq_features


@pytest.fixture(scope="module")
def image_state(tiny_model):
    return encoded_images(tiny_model, 1, seed=0)


def make_prompts(kind: str, num: int, points: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(num, points, 2, generator=gen) * 256
    labels = torch.randint(-1, 2, (num, points), generator=gen)
    corners = torch.rand(num, 2, 2, generator=gen).sort(dim=1).values * 256
    boxes = corners.reshape(num, 4) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    mask_input = 4 * torch.randn(num, 1, 4 * G, 4 * G, generator=gen)
    use_points, use_box, use_mask = ("points" in kind), ("box" in kind), ("mask" in kind)
    return dict(
        point_coords=coords if use_points else None, point_labels=labels if use_points else None,
        boxes=boxes if use_box else None, mask_input=mask_input if use_mask else None,
    )


def eager_decode(model, image_state, prompts, multimask_output, hq_token_only):
    """The reference: the model's own prompt encoder and HQ decoder, as SamHQPredictor.predict_torch."""
    embeddings, hq_features = image_state
    points = None if prompts["point_coords"] is None else (prompts["point_coords"], prompts["point_labels"])
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points, prompts["boxes"], prompts["mask_input"])
        return model.mask_decoder(embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense, hq_features,
                                  multimask_output, hq_token_only)


def assert_like_eager(got, expected, atol: float = 1e-5):
    """Decoder outputs (logits, scores) against the reference's: same shapes, within atol of the
    larger of the reference's largest magnitude and 1."""
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=atol * max(e.abs().max().item(), 1.0), rtol=0)


KINDS = ["points", "box", "points+box", "mask", "points+mask", "box+mask", "points+box+mask"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num, points", [(1, 1), (4, 3), (5, 2)])  # bucket edges: 1, 4 (full), 5 (-> 16)
@pytest.mark.parametrize("multimask_output, hq_token_only", [(True, False), (False, False), (False, True), (True, True)])
def test_padded_decoder_equals_eager(tiny_model, image_state, kind, num, points, multimask_output, hq_token_only):
    prompts = make_prompts(kind, num, points)
    expected = eager_decode(tiny_model, image_state, prompts, multimask_output, hq_token_only)
    got = PromptDecoder(tiny_model, compile=False)(*image_state, **prompts, multimask_output=multimask_output,
                                                   hq_token_only=hq_token_only)
    assert_like_eager(got, expected)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_multimask_pick_is_per_prompt(tiny_model, image_state, compile):
    """The padded decoder picks each prompt's SAM token (the multimask token of highest predicted IoU)
    before computing its mask: in a batch whose prompts' best tokens differ, each prompt must get
    its own token's mask and score, as the eager decoder's select_masks gives."""
    prompts = make_prompts("points", 7, 2, seed=4)  # 7 prompts: 9 padding rows in the bucket of 16
    embeddings, hq_features = image_state
    with torch.inference_mode():
        sparse, dense = tiny_model.prompt_encoder((prompts["point_coords"], prompts["point_labels"]), None, None)
        _, iou = tiny_model.mask_decoder.predict_masks(embeddings, tiny_model.prompt_encoder.get_dense_pe(), sparse, dense, hq_features)
    assert len(set(iou[:, 1:4].argmax(dim=1).tolist())) > 1  # the batch mixes picks
    decoder = PromptDecoder(tiny_model, compile=compile)
    for hq_token_only in (False, True):  # True: the HQ mask alone, with the picked token's score
        expected = eager_decode(tiny_model, image_state, prompts, True, hq_token_only)
        got = decoder(*image_state, **prompts, multimask_output=True, hq_token_only=hq_token_only)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-4 * e.abs().max().item(), rtol=0)


def test_a_reused_decoder_never_reads_stale_prompt_slots(tiny_model, image_state):
    """Two calls padded to one shape (4 rows of 4 point slots), the second with a prompt, a point and
    the box fewer: its padding must be empty slots, not what the first call left there."""
    decoder = PromptDecoder(tiny_model, compile=False)
    decoder(*image_state, **make_prompts("points+box", 4, 4, seed=1), multimask_output=False, hq_token_only=False)
    prompts = make_prompts("points", 3, 3, seed=2)
    expected = eager_decode(tiny_model, image_state, prompts, False, False)
    got = decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    assert_like_eager(got, expected)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_weights_loaded_in_place_are_used(tiny_model, image_state, compile):
    """model.load_state_dict copies into the existing tensors (same addresses): what the decoder
    keeps between calls (the positional encoding, the hypernetwork stacks) must follow, as the
    compiled function's weights do."""
    model = copy.deepcopy(tiny_model)
    decoder = PromptDecoder(model, compile=compile)
    prompts = make_prompts("points+box", 2, 2, seed=4)
    decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    with torch.no_grad():  # as a load_state_dict would
        model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(1.5)
        model.mask_decoder.hf_mlp.layers[0].weight.mul_(-1.0)
        model.mask_decoder.transformer.layers[0].self_attn.v_proj.weight.mul_(-1.0)
        model.mask_decoder.embedding_maskfeature[0].weight.mul_(-2.0)  # packed channels-last
    expected = eager_decode(model, image_state, prompts, False, False)
    got = decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    assert_like_eager(got, expected)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_weights_assigned_to_the_decoder_are_used(tiny_model, image_state, compile):
    """load_state_dict(assign=True) on the mask decoder alone replaces its weight tensors (new objects,
    new addresses) and leaves the model's first weight (the image encoder's) as it was: the decoder's
    packed weights must be packed again from the new tensors. Building unrelated modules in between
    must not make the decoder bind (and compile) again."""
    model = copy.deepcopy(tiny_model)
    decoder = PromptDecoder(model, compile=compile)
    prompts = make_prompts("points+box", 2, 2, seed=4)
    decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    compiled = decoder._decode
    torch.nn.Linear(3, 3), torch.nn.Sequential(torch.nn.LayerNorm(3))
    decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    assert decoder._decode is compiled
    new_weights = {name: -t for name, t in model.mask_decoder.state_dict().items()}  # new tensors
    model.mask_decoder.load_state_dict(new_weights, assign=True)
    expected = eager_decode(model, image_state, prompts, False, False)
    got = decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    assert decoder._decode is not compiled
    assert_like_eager(got, expected)


@pytest.mark.parametrize("num", [1, 3, 0])
def test_stacked_output_mlps_equal_the_six_mlps(tiny_model, num):
    """The compiled decoder's three batched matmuls against the decoder's own IoU head and five
    hypernetwork MLPs in float64, token by token (each token must meet its own MLP: a swapped pair of
    weight sets fails); then with one MLP's weight and others' biases changed in place (the IoU
    head's last, zero-padded layer among them): the stacks are kept between calls, and `refresh`
    must restack them (before it, they still hold the old weights)."""
    decoder = copy.deepcopy(tiny_model.mask_decoder)
    tokens = torch.randn(num, 6, 256, generator=torch.Generator().manual_seed(num))
    reference = copy.deepcopy(decoder).double()
    packed = decoding.PackedWeights(decoder)
    for change in (False, True):
        if change:
            with torch.no_grad():
                for model in (decoder, reference):
                    model.hf_mlp.layers[1].weight.mul_(-2.0)
                    model.output_hypernetworks_mlps[0].layers[2].bias.add_(1.0)
                    model.iou_prediction_head.layers[2].bias.sub_(0.5)
            assert not torch.equal(packed["output_mlps.1.weight"][5], decoder.hf_mlp.layers[1].weight)
            packed.refresh()
        with torch.inference_mode():
            got = decoding.stacked_output_mlps(packed, tokens)
            expected_iou = reference.iou_prediction_head(tokens[:, 0].double())
            expected_hyper = reference.hypernetworks(tokens[:, 1:].double())
        assert got.shape == (num, 6, 32) and got.dtype == torch.float32
        for g, e in ((got[:, 0, :4], expected_iou), (got[:, 1:], expected_hyper)):
            scale = e.abs().max().item() if num else 1.0
            torch.testing.assert_close(g.double(), e, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("num, image_batch, masked", [(3, 1, True), (2, 2, False), (1, 1, True)])
def test_packed_transformer_equals_the_module(tiny_model, num, image_batch, masked):
    """The two-way transformer with the projections that share an input packed into one matmul,
    against the module in float64: one image broadcast over the prompts or one per prompt, padded
    token slots masked or none; then with projections of both packs (self-attention's k, the image
    side's image-to-token q) changed in place and repacked."""
    transformer = copy.deepcopy(tiny_model.mask_decoder.transformer).double()
    decoder = copy.deepcopy(tiny_model.mask_decoder).double()
    decoder.transformer = transformer
    gen = torch.Generator().manual_seed(num)
    image = torch.randn(image_batch, 256, 5, 7, generator=gen, dtype=torch.float64)
    image_pe = torch.randn(1, 256, 5, 7, generator=gen, dtype=torch.float64)
    tokens = torch.randn(num, 9, 256, generator=gen, dtype=torch.float64)
    token_mask = ((torch.rand(num, 9, generator=gen) < 0.7) | (torch.arange(9) < 6))[:, None, None] if masked else None
    packed = decoding.PackedWeights(decoder)
    for change in (False, True):
        if change:
            with torch.no_grad():
                transformer.layers[1].self_attn.k_proj.weight.mul_(-1.5)
                transformer.layers[0].cross_attn_image_to_token.q_proj.bias.add_(0.5)
            packed.refresh()
        with torch.inference_mode():
            expected = transformer(image, image_pe, tokens, token_mask)
            side = decoding.image_side(transformer, packed, image, image_pe)
            got = decoding.packed_two_way_transformer(transformer, packed, side, image_pe, tokens, token_mask)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, atol=1e-10 * e.abs().max().item(), rtol=0)


def test_relu_mlp_refuses_another_activation():
    """relu_mlp puts a ReLU in the first matmul's epilogue: an MLPBlock with another activation (the
    ViT's GELU ones) must be refused, not computed with a ReLU."""
    from samhq_fast.modeling.common import MLPBlock

    x = torch.randn(2, 3, 8, dtype=torch.float64)
    relu_block = MLPBlock(8, 16, torch.nn.ReLU).double()
    torch.testing.assert_close(decoding.relu_mlp(relu_block, x), relu_block(x), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="ReLU"):
        decoding.relu_mlp(MLPBlock(8, 16), x)


def test_packed_inference_weights_are_taken_once(tiny_model):
    """Weights made under inference mode track no versions: the packed weights hold them as they
    were, and refresh neither fails nor repacks."""
    with torch.inference_mode():
        decoder = copy.deepcopy(tiny_model.mask_decoder)
        for p in decoder.parameters():
            p.data = p.data.clone()  # inference tensors
    packed = decoding.PackedWeights(decoder)
    packed.refresh()
    assert torch.equal(packed["output_mlps.0.weight"][3], decoder.output_hypernetworks_mlps[2].layers[0].weight)


@pytest.mark.parametrize("num, height, width, hq_batch", [(3, 9, 14, 1), (2, 16, 16, 2), (1, 5, 7, 1), (0, 8, 8, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_folded_hq_masks_equal_the_hq_branch(tiny_model, num, height, width, hq_batch, layout):
    """The HQ token's dot folded into the last 3x3 convolution (one output channel per prompt, tap
    sums shifted into place) against the decoder's own convolutions, HQ features and dot in float64:
    non-square maps that end mid-row, every border pixel (the padding), HQ features of one image or
    one per prompt; the upscaled map NCHW or channels-last (as the compiled decoder makes it: the
    first convolution's output then is too, and its taps are summed by another matmul); the first
    convolution's weight the module's or a channels-last copy (as `PackedWeights` holds it)."""
    decoder = copy.deepcopy(tiny_model.mask_decoder).double()
    gen = torch.Generator().manual_seed(num + height)
    upscaled = torch.randn(num, 32, height, width, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        upscaled = upscaled.contiguous(memory_format=torch.channels_last)
    hq_features = torch.randn(hq_batch, 32, height, width, generator=gen, dtype=torch.float64)
    hyper = torch.randn(num, 32, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        expected = decoder.hq_masks(upscaled, hq_features, hyper)
        got = decoding.folded_hq_masks(decoder, upscaled, hq_features, hyper)
        packed_weight = decoding.channels_last_copy([decoder.embedding_maskfeature[0].weight])
        got_packed = decoding.folded_hq_masks(decoder, upscaled, hq_features, hyper, first_weight=packed_weight)
    assert packed_weight.is_contiguous(memory_format=torch.channels_last)
    scale = expected.abs().max().item() if num else 1.0
    for g in (got, got_packed):
        assert g.shape == expected.shape == (num, 1, height * width)
        torch.testing.assert_close(g, expected, atol=1e-12 * scale, rtol=0)


@pytest.mark.parametrize("num, height, width", [(3, 5, 7), (2, 16, 16), (1, 1, 3), (0, 4, 4)])
@pytest.mark.parametrize("upscaling", ["output_upscaling", "embedding_encoder", "compress_vit_feat"])
def test_upscaling_by_matmuls_equals_the_transposed_convolutions(tiny_model, num, height, width, upscaling):
    """Each 2x2 stride-2 transposed convolution as one matmul and a reorder of its output blocks,
    against the modules in float64: the decoder's output upscaling (with its trailing GELU) and the
    two HQ-feature upsamplers (other channel counts: 256 or the ViT width in), on non-square grids.
    The weights are made non-symmetric in the taps, so a swapped (i, j) or channel order fails."""
    decoder = copy.deepcopy(tiny_model.mask_decoder).double()
    modules = getattr(decoder, upscaling)
    gen = torch.Generator().manual_seed(num + height)
    with torch.no_grad():
        for conv in (modules[0], modules[3]):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=torch.float64))
    pixels = torch.randn(num, height, width, modules[0].in_channels, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        expected = modules(pixels.permute(0, 3, 1, 2))
        got = decoding.upscaled_by_matmuls(modules, pixels)
    assert got.shape == expected.shape == (num, modules[3].out_channels, 4 * height, 4 * width)
    # channels-last, what the next convolution reads without a copy (an empty tensor has no layout)
    assert num == 0 or got.is_contiguous(memory_format=torch.channels_last)
    scale = expected.abs().max().item() if num else 1.0
    torch.testing.assert_close(got, expected, atol=1e-12 * scale, rtol=0)


@pytest.mark.parametrize("conv", [torch.nn.ConvTranspose2d(4, 2, 3, stride=2), torch.nn.ConvTranspose2d(4, 2, 2, stride=1),
                                  torch.nn.ConvTranspose2d(4, 2, 2, stride=2, padding=1), torch.nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2)])
def test_conv_transpose_as_matmul_refuses_other_convolutions(conv):
    with pytest.raises(ValueError, match="kernel 2, stride 2"):
        decoding.conv_transpose_2x2(torch.zeros(1, 3, 3, 4), conv)


def test_upscaling_by_matmuls_refuses_a_trailing_module_that_is_not_elementwise(tiny_model):
    """It applies the trailing modules before the pixels are reordered, which is only right for an
    elementwise one (the decoder's GELU)."""
    modules = torch.nn.Sequential(*tiny_model.mask_decoder.output_upscaling, torch.nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="must be GELUs"):
        decoding.upscaled_by_matmuls(modules, torch.zeros(1, 3, 3, modules[0].in_channels))


@pytest.mark.parametrize("n, buckets, expected", [(1, decoding.PROMPT_BUCKETS, 1), (4, decoding.PROMPT_BUCKETS, 4),
                                                   (5, decoding.PROMPT_BUCKETS, 16), (256, decoding.PROMPT_BUCKETS, 256),
                                                   (64, decoding.POINT_BUCKETS, 64), (65, decoding.POINT_BUCKETS, 128),
                                                   (129, decoding.POINT_BUCKETS, 192)])
def test_bucket_edges(n, buckets, expected):
    assert decoding.bucket(n, buckets) == expected


def test_image_features_are_broadcast_not_copied_per_prompt(tiny_model, image_state, monkeypatch):
    """The original decoder copies the image embedding once per prompt (repeat_interleave); here one
    image's embedding and HQ features broadcast over its prompts, in the eager and the padded decoder."""
    def refuse(*args, **kwargs):
        raise AssertionError("a per-prompt copy of the image features (repeat_interleave / repeat)")

    for owner in (torch, torch.Tensor):
        monkeypatch.setattr(owner, "repeat_interleave", refuse)
    monkeypatch.setattr(torch.Tensor, "repeat", refuse)
    prompts = make_prompts("points+box", 3, 2)
    expected = eager_decode(tiny_model, image_state, prompts, False, False)
    got = PromptDecoder(tiny_model, compile=False)(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    assert expected[0].shape == got[0].shape == (3, 1, 4 * G, 4 * G)


@pytest.mark.parametrize("masked", [False, True])
def test_query_batches_attend_to_shared_keys_as_one_batch(masked, monkeypatch):
    """Attention of 3 query batches to one batch of keys (one image's prompts to its pixels) runs as
    one SDPA batch of 3 x 5 queries, k and v not expanded per batch, each batch still its own
    softmax rows: against a float64 softmax per batch. With a key mask (one per batch) it stays
    per batch."""
    from samhq_fast.modeling.transformer import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4, downsample_rate=2)  # inner width 16: 4 heads of 4
    q, k, v = torch.randn(3, 5, 16), torch.randn(1, 11, 16), torch.randn(1, 11, 16)
    bias = torch.zeros(3, 1, 1, 11)
    bias[1, ..., 7:] = float("-inf")  # batch 1 drops its last 4 keys
    key_mask = bias if masked else None
    batches = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        batches.append((q.shape[0], q.shape[2], k.shape[0]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        got = attn.attend(q, k, v, key_mask)
    monkeypatch.undo()
    assert batches == ([(3, 5, 3)] if masked else [(1, 15, 1)])

    heads = lambda t: t.double().reshape(t.shape[0], t.shape[1], 4, 4).transpose(1, 2)  # noqa: E731  [B, 4 heads, N, 4]
    scores = heads(q) @ heads(k).transpose(2, 3) / 2 + (bias.double() if masked else 0)  # scale 1/sqrt(4)
    out = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(3, 5, 16)
    expected = out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@contextlib.contextmanager
def recorded_image_projections(decoder: PromptDecoder, rows: list):
    """Appends to rows the batch size of every matmul of the first block's image projections
    (`decoding.image_projections`: the packed token-to-image keys | image-to-token queries, the
    token-to-image values) that the (uncompiled) decoder runs inside the block."""
    block = decoder.model.mask_decoder.transformer.layers[0]
    weights = (decoder._packed["layers.0.image.weight"], block.cross_attn_token_to_image.v_proj.weight)
    linear = torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        if any(weight is w for w in weights):
            rows.append(x.shape[0])
        return linear(x, weight, bias)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "linear", recording_linear)
        yield


def test_the_image_side_is_computed_once_per_image(tiny_model):
    """Without mask prompts every prompt's dense embedding is the same, so the first block's
    projections of the image tokens run once per image, when it is prepared, and in no decoder call
    on it after; with mask prompts they run per prompt, in the call. They run again, on one image,
    after a weight they read or the image embeddings are written in place, and for new embeddings.
    The outputs are always the eager decoder's."""
    model = copy.deepcopy(tiny_model)
    embeddings, hq_features = encoded_images(model, 1, seed=4)
    embeddings = embeddings.clone()  # a tensor that tracks its writes (not an inference tensor)
    decoder = PromptDecoder(model, compile=False)
    block = model.mask_decoder.transformer.layers[0]
    rows = []

    def decode_and_check(kind):
        prompts = make_prompts(kind, 5, 2, seed=6)
        with recorded_image_projections(decoder, rows):
            got = decoder(embeddings, hq_features, **prompts, multimask_output=True, hq_token_only=False)
        assert_like_eager(got, eager_decode(model, (embeddings, hq_features), prompts, True, False))

    with recorded_image_projections(decoder, rows):
        decoder.prepare_images(embeddings, hq_features)
    assert rows == [1, 1]
    for kind in ("points+box", "box", "points+box"):
        decode_and_check(kind)
    assert rows == [1, 1]
    decode_and_check("box+mask")
    assert rows == [1, 1] + [16, 16]  # 5 prompts pad to the bucket of 16
    rows.clear()
    with torch.no_grad():
        block.cross_attn_token_to_image.v_proj.bias.add_(0.25)
        model.prompt_encoder.no_mask_embed.weight.mul_(-2)
    decode_and_check("points+box")
    assert rows == [1, 1]
    with torch.inference_mode():
        embeddings[:, :, :2] *= 3  # version counters tick under inference mode too
    decode_and_check("box")
    assert rows == [1, 1] * 2
    embeddings = embeddings.clone()
    decode_and_check("box")
    decode_and_check("points+box")
    assert rows == [1, 1] * 3


def test_the_predictor_prepares_the_decoder_at_set_image(tiny_model, monkeypatch):
    """On the fused backend set_image / set_images do the decoder's per-image work (the first block's
    image projections), so predict and predict_batch run none of it, and give the eager predictor's
    masks; features replaced by hand are prepared again, once."""
    fused = SamHQPredictor(apply_fused_backend(copy.deepcopy(tiny_model)))
    fused._prompt_decoder = decoder = PromptDecoder(fused.model, compile=False)
    monkeypatch.setattr(fused, "_encode", tiny_model.encode_image)  # (the eager encoder: the interpreter's is slow)
    eager = SamHQPredictor(tiny_model)
    photos = [make_photo(60, 90, seed=3), make_photo(50, 40, seed=4)]
    boxes = np.array([[5.0, 5.0, 30.0, 40.0], [20.0, 10.0, 35.0, 30.0]])
    rows = []
    with recorded_image_projections(decoder, rows):
        fused.set_image(photos[0])
    assert rows == [1, 1]
    eager.set_image(photos[0])
    for multimask_output in (False, True):
        with recorded_image_projections(decoder, rows):
            got = fused.predict(box=boxes, multimask_output=multimask_output, return_logits=True)
        expected = eager.predict(box=boxes, multimask_output=multimask_output, return_logits=True)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, atol=1e-5 * max(np.abs(e).max(), 1), rtol=0)
    assert rows == [1, 1]
    with recorded_image_projections(decoder, rows):
        fused.set_images(photos)
        got = fused.predict_batch([dict(box=boxes[0]), dict(box=boxes)], return_logits=True)  # both images' prompts
        got += fused.predict_batch([{}, dict(box=boxes)], return_logits=True)  # one image of two
    assert rows == [1, 1] + [2, 2]
    eager.set_images(photos)
    expected = eager.predict_batch([dict(box=boxes[0]), dict(box=boxes)], return_logits=True) + eager.predict_batch([{}, dict(box=boxes)], return_logits=True)
    for got_image, expected_image in zip(got, expected):
        for g, e in zip(got_image, expected_image):
            np.testing.assert_allclose(g, e, atol=1e-5 * max(np.abs(e).max(), 1), rtol=0)
    fused.features = fused.features.clone()
    with recorded_image_projections(decoder, rows):
        fused.predict_batch([dict(box=boxes[0]), {}])
        fused.predict_batch([dict(box=boxes[1]), {}])
    assert rows == [1, 1] + [2, 2] + [2, 2]


class FillCounter(TorchDispatchMode):
    """Counts the ops that make a zero- or value-filled tensor (each a kernel launch on the GPU)."""

    FILLS = ("aten.zeros", "aten.full", "aten.fill_", "aten.zero_")

    def __init__(self):
        super().__init__()
        self.fills = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.fills += str(func.overloadpacket) in self.FILLS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind, num, points", [("box", 1, 1), ("points", 4, 4), ("points+box+mask", 1, 2), ("mask", 4, 1),
                                               ("points", 1, 3), ("points+box", 4, 5)])  # 3 -> 4, 5 -> 8 point slots
def test_a_batch_without_padding_needs_no_staging_buffers(tiny_model, image_state, kind, num, points):
    """One prompt set filling its bucket's rows (one box, one prompt of 3 points, 4 prompts of 4
    points...) goes to the decoder as given, its point lists padded by concatenation: from the second
    call on, no buffer is zero-filled or flagged per call (the flags, the absent parts and the empty
    point slots are made once and never written), and the outputs are eager's."""
    decoder = PromptDecoder(tiny_model, compile=False)
    prompts = make_prompts(kind, num, points)
    decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    constants = {key: t.clone() for key, t in decoder._constants.items()}
    assert constants  # the flags at least
    decode = decoder._decode
    counter = FillCounter()

    def counted(*args):  # the padded batch's construction is counted, not the decoder network's own ops
        counter.__exit__(None, None, None)
        try:
            return decode(*args)
        finally:
            counter.__enter__()

    decoder._decode = counted
    with counter:
        got = decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    assert counter.fills == 0
    assert_like_eager(got, eager_decode(tiny_model, image_state, prompts, False, False))
    assert all(torch.equal(decoder._constants[key], t) for key, t in constants.items())


def test_given_and_staged_batches_share_a_compiled_shape(tiny_model, image_state):
    """3 prompts of 3 points (4 rows of 4 slots: staged in fresh buffers), 4 prompts of 4 points
    (taken as given, copied to inference tensors) and 4 prompts of 3 points (given, slots padded by
    concatenation) are one compiled shape: Dynamo guards on strides, dtypes and inference-ness, and
    the given tensors (plain, int64 labels) must not fail those guards."""
    counter = CompileCounterWithBackend("eager")
    decoder = PromptDecoder(tiny_model, backend=counter)
    for num, points in ((3, 3), (4, 4), (4, 3), (3, 3)):
        prompts = make_prompts("points", num, points, seed=points)
        got = decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
        assert_like_eager(got, eager_decode(tiny_model, image_state, prompts, False, False))
    assert counter.frame_count == 1


def test_padded_point_slots_are_invisible(tiny_model, image_state):
    """Point slots padded by hand, masked by the token bias and with any label, give the unpadded
    result, while the same slots unmasked as points with label -1 (SAM's "not a point", which IS
    attended to) change it: the bias is doing the work."""
    embeddings, hq_features = image_state
    prompts = make_prompts("points", 2, 3, seed=3)
    base = PromptDecoder(tiny_model, compile=False)(*image_state, **prompts, multimask_output=False, hq_token_only=True)[0]
    coords = torch.cat([prompts["point_coords"], 100 * torch.rand(2, 2, 2)], dim=1)
    labels = torch.cat([prompts["point_labels"], torch.full((2, 2), -1)], dim=1)
    no_mask = torch.zeros(2, dtype=torch.bool)
    for padded_slots_are_points in (False, True):
        token_bias = torch.full((2, decoding.token_bias_columns(5)), float("-inf"))
        for columns in decoding.real_token_columns(5, 5 if padded_slots_are_points else 3, box=False):
            token_bias[:, columns] = 0
        with torch.inference_mode():
            got, _ = decoding.decode_padded(tiny_model, embeddings, None, tiny_model.prompt_encoder.get_dense_pe(), hq_features,
                                            None, coords, labels, torch.zeros(2, 4), token_bias,
                                            torch.zeros(2, 1, 4 * G, 4 * G), no_mask, torch.tensor(False), torch.tensor(True),
                                            packed=decoding.PackedWeights(tiny_model.mask_decoder))
        assert torch.allclose(got, base, atol=1e-5 * base.abs().max().item()) != padded_slots_are_points


@pytest.mark.parametrize("label", [-2, 2, 7, 0.5, -0.5, 1.5])
def test_labels_outside_sam_set_match_eager(tiny_model, image_state, label):
    """A label other than 1 / 0 / -1 is a point with no label embedding in the original; the padded
    decoder must not read any label value as its own padding, nor round a fractional one (a float
    label tensor) to 0 / 1 / -1."""
    prompts = make_prompts("points", 3, 2, seed=4)
    prompts["point_labels"] = prompts["point_labels"].to(torch.float32 if isinstance(label, float) else torch.int64)
    prompts["point_labels"][:, 1] = label
    expected = eager_decode(tiny_model, image_state, prompts, False, False)
    got = PromptDecoder(tiny_model, compile=False)(*image_state, **prompts, multimask_output=False, hq_token_only=False)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5 * e.abs().max().item(), rtol=0)


def test_more_prompts_than_the_largest_bucket(tiny_model, image_state, monkeypatch):
    monkeypatch.setattr(decoding, "PROMPT_BUCKETS", (1, 2, 4))
    prompts = make_prompts("points+box", 9, 2)  # chunks of 4, 4, 1
    expected = eager_decode(tiny_model, image_state, prompts, True, False)
    got = PromptDecoder(tiny_model, compile=False)(*image_state, **prompts, multimask_output=True, hq_token_only=False)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5 * e.abs().max().item(), rtol=0)


def test_more_points_than_the_largest_point_bucket(tiny_model, image_state, monkeypatch):
    """Point lists longer than the largest bucket pad to its next multiple (3 -> 4, 5 -> 6 with buckets (1, 2))."""
    monkeypatch.setattr(decoding, "POINT_BUCKETS", (1, 2))
    decoder = PromptDecoder(tiny_model, compile=False)
    for points in (3, 5):
        prompts = make_prompts("points+box", 2, points, seed=points)
        expected = eager_decode(tiny_model, image_state, prompts, False, False)
        got = decoder(*image_state, **prompts, multimask_output=False, hq_token_only=False)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5 * e.abs().max().item(), rtol=0)
    assert decoding.bucket(5, (1, 2)) == 6 and decoding.bucket(65, (1, 2, 4, 8, 16, 32, 64)) == 128


def test_chunks_survive_static_output_buffers(tiny_model, image_state, monkeypatch):
    """A CUDA graph returns the same output buffers on every replay. A stand-in that does the same
    (copies every result into one pair of buffers) must not change a two-chunk decode: each chunk's
    outputs are copied out before the next replay (the real rows are a view of them)."""
    monkeypatch.setattr(decoding, "PROMPT_BUCKETS", (1, 2, 4))
    decoder = PromptDecoder(tiny_model, compile=False)
    run, static = decoder._decode, []

    def replay(*args):
        outputs = run(*args)
        if not static:
            static.extend(t.clone() for t in outputs)
        for buffer, t in zip(static, outputs):
            buffer.copy_(t)
        return tuple(static)

    decoder._decode = replay
    prompts = make_prompts("points+box", 7, 2, seed=5)  # chunks of 4 and 3 (+1 padding row)
    for flags in ((False, True), (True, False), (False, False)):
        expected = eager_decode(tiny_model, image_state, prompts, *flags)
        got = decoder(*image_state, **prompts, multimask_output=flags[0], hq_token_only=flags[1])
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5 * e.abs().max().item(), rtol=0)


def test_no_recompiles_within_buckets(tiny_model, image_state):
    """Dynamo traces once per (prompt bucket, point bucket, with or without masks); prompt types,
    counts inside a bucket and the output flags reuse the graph. aot_eager keeps this test fast: the
    guards are Dynamo's."""
    counter = CompileCounterWithBackend("aot_eager")
    decoder = PromptDecoder(tiny_model, backend=counter)
    calls = [("points", 4, 3), ("points", 3, 4), ("box", 2, 1), ("points+box", 1, 2), ("mask", 4, 1),
             ("points+mask", 2, 3), ("mask", 3, 1), ("points+mask", 4, 4)]
    # one prompt bucket (4); without masks, point buckets 4 (3 and 4 points), 1 (box only) and 2; with
    # masks (no mask buffers are filled, nor masks downscaled, without), point buckets 1 and 4
    for kind, num, points in calls:
        for flags in ((True, False), (False, True)):
            decoder(*image_state, **make_prompts(kind, num, points), multimask_output=flags[0], hq_token_only=flags[1])
    assert counter.frame_count == 5
    decoder(*image_state, **make_prompts("points", 5, 3), multimask_output=True, hq_token_only=False)
    assert counter.frame_count == 6  # 5 prompts: the next prompt bucket (16), a new graph


def test_more_bucket_shapes_than_dynamos_recompile_limit(tiny_model, image_state):
    """Dynamo allows 8 compiled shapes per function by default, and fullgraph=True turns the 9th into a
    hard error; the decoder has 35 bucket shapes (x the image counts). 12 shapes must all compile."""
    counter = CompileCounterWithBackend("eager")
    decoder = PromptDecoder(tiny_model, backend=counter)
    shapes = [(num, points) for num in (1, 2, 5) for points in (1, 2, 3, 5)]  # prompt buckets 1, 4, 16 x point 1, 2, 4, 8
    for num, points in shapes:
        decoder(*image_state, **make_prompts("points", num, points), multimask_output=True, hq_token_only=False)
    assert counter.frame_count == len(shapes) > torch._dynamo.config.recompile_limit
    for num, points in shapes:  # all cached: no new compile
        decoder(*image_state, **make_prompts("points", num, points, seed=1), multimask_output=True, hq_token_only=False)
    assert counter.frame_count == len(shapes)


def test_a_known_shape_recompiled_past_the_limit(tiny_model, image_state):
    """Past 8 compiled shapes, a known bucket shape whose other guards fail (here the embedding's
    memory layout) recompiles instead of hitting Dynamo's default limit, and still equals eager."""
    counter = CompileCounterWithBackend("eager")
    decoder = PromptDecoder(tiny_model, backend=counter)
    shapes = [(num, points) for num in (1, 2, 5) for points in (1, 2, 3)]
    for num, points in shapes:
        decoder(*image_state, **make_prompts("points", num, points), multimask_output=True, hq_token_only=False)
    assert counter.frame_count == len(shapes) > torch._dynamo.config.recompile_limit
    embeddings, hq_features = image_state
    channels_last = (embeddings.contiguous(memory_format=torch.channels_last), hq_features.contiguous(memory_format=torch.channels_last))
    assert channels_last[0].stride() != embeddings.stride()
    prompts = make_prompts("points", 1, 1, seed=2)
    got = decoder(*channels_last, **prompts, multimask_output=True, hq_token_only=False)
    assert counter.frame_count == len(shapes) + 1
    for g, e in zip(got, eager_decode(tiny_model, image_state, prompts, True, False)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_shapes_past_dynamos_limit_over_all_variants_compile(tiny_model, image_state):
    """Dynamo also caps the compiled variants of one function in all (256 by default; every
    PromptDecoder of a process compiles the same function, and bucket shapes times image counts
    reach it): lowered here to 4, the decoder's 6 shapes must still compile."""
    counter = CompileCounterWithBackend("eager")
    decoder = PromptDecoder(tiny_model, backend=counter)
    shapes = [(num, points) for num in (1, 2) for points in (1, 2, 3)]
    with torch._dynamo.config.patch({decoding.RECOMPILE_LIMIT_NAMES[1]: 4}):  # (not monkeypatch: its undo deletes config entries)
        for num, points in shapes:
            decoder(*image_state, **make_prompts("points", num, points), multimask_output=True, hq_token_only=False)
    assert counter.frame_count == len(shapes)


def test_shapes_past_the_decoders_limit_run_uncompiled(tiny_model, image_state, monkeypatch):
    """Past PromptDecoder.RECOMPILE_LIMIT (lowered here to 1), a new shape warns once and runs the
    padded function uncompiled: the outputs are still the eager decoder's."""
    monkeypatch.setattr(PromptDecoder, "RECOMPILE_LIMIT", 1)
    decoder = PromptDecoder(tiny_model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the process's earlier compiles of the function may count already)
        decoder(*image_state, **make_prompts("points", 1, 1), multimask_output=True, hq_token_only=False)
    prompts = make_prompts("points+box", 5, 3, seed=3)
    with pytest.warns(UserWarning, match="runs uncompiled"):
        got = decoder(*image_state, **prompts, multimask_output=True, hq_token_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shape is known to run uncompiled: no second compile attempt, no warning
        again = decoder(*image_state, **prompts, multimask_output=True, hq_token_only=False)
    for g, a, e in zip(got, again, eager_decode(tiny_model, image_state, prompts, True, False)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, g)


def test_decoder_follows_a_model_cast_after_first_use(tiny_model, image_state):
    """The decoder holds what it derived from the model (positional encoding, compiled function,
    graphs): casting the model after first use must not leave a float32 encoding in a float16 call."""
    model = copy.deepcopy(tiny_model)
    decoder = PromptDecoder(model, backend="eager")
    prompts = make_prompts("points+box", 2, 2)
    decoder(*image_state, **prompts, multimask_output=True, hq_token_only=False)
    model.half()
    half_state = tuple(t.half() for t in image_state)
    got = decoder(*half_state, **prompts, multimask_output=True, hq_token_only=False)
    expected = eager_decode(model, half_state, prompts, True, False)
    assert got[0].dtype == torch.float16 and decoder.image_pe.dtype == torch.float16
    for g, e in zip(got, expected):
        assert rel_l2(g, e) < 1e-2


@pytest.fixture(scope="module")
def two_images_state(tiny_model):
    return encoded_images(tiny_model, 2, seed=5)


def test_decode_images_equals_one_image_at_a_time(tiny_model, two_images_state, monkeypatch):
    """Prompt sets of two images with different prompt types, counts and point counts, in one padded
    batch (buckets shrunk to (1, 2, 4): 3 + 4 + 1 prompts -> 2 calls of 4 rows), equal each set
    decoded against its own image alone."""
    monkeypatch.setattr(decoding, "PROMPT_BUCKETS", (1, 2, 4))
    embeddings, hq_features = two_images_state
    sets = [(1, make_prompts("points+box", 3, 2, seed=1)), (0, make_prompts("mask", 4, 1, seed=2)),
            (1, make_prompts("points", 1, 5, seed=3))]
    decoder = PromptDecoder(tiny_model, compile=False)
    calls = []
    run = decoder._decode
    decoder._decode = lambda *args: calls.append(args[5].shape[0]) or run(*args)
    prompt_sets = [(image, *prompts.values()) for image, prompts in sets]
    for flags in ((True, False), (False, True)):
        calls.clear()
        got = decoder.decode_images(embeddings, hq_features, prompt_sets, *flags)
        assert calls == [4, 4]
        for (image, prompts), (logits, scores) in zip(sets, got):
            state = (embeddings[image : image + 1], hq_features[image : image + 1])
            expected = eager_decode(tiny_model, state, prompts, *flags)
            assert logits.shape == expected[0].shape and scores.shape == expected[1].shape
            torch.testing.assert_close(logits, expected[0], atol=1e-5 * expected[0].abs().max().item(), rtol=0)
            torch.testing.assert_close(scores, expected[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num", [1, 0])
def test_decode_images_refuses_an_unknown_image(tiny_model, two_images_state, num):
    prompts = make_prompts("box", num, 1)
    with pytest.raises(ValueError, match=r"name images \[0, 2\], but 2 are given"):
        PromptDecoder(tiny_model, compile=False).decode_images(*two_images_state, [(0, *prompts.values()), (2, *prompts.values())], True, False)


def test_decode_images_of_one_image_broadcasts(tiny_model, two_images_state):
    """Sets that all read one image of several: no per-prompt index (the broadcast path), also
    beside a set with no prompts (N = 0, many points) on the other image, which takes no rows."""
    embeddings, hq_features = two_images_state
    decoder = PromptDecoder(tiny_model, compile=False)
    seen = []
    run = decoder._decode
    decoder._decode = lambda *args: seen.append((args[1].shape[0], args[4], args[5].shape[1])) or run(*args)
    prompts = make_prompts("box", 2, 1, seed=4)
    no_prompts = make_prompts("points+box", 0, 20)
    (logits, _), (no_logits, no_scores) = decoder.decode_images(embeddings, hq_features, [(1, *prompts.values()), (0, *no_prompts.values())], True, False)
    assert seen == [(1, None, 1)]  # one image's features, one point slot: the empty set's 20 points add none
    assert no_logits.shape == (0, 1, 4 * G, 4 * G) and no_scores.shape == (0, 1)
    expected = eager_decode(tiny_model, (embeddings[1:], hq_features[1:]), prompts, True, False)[0]
    torch.testing.assert_close(logits, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("num, points", [(4, 2), (1, 1), (5, 3)])  # a full bucket, the smallest, one past a bucket
def test_compiled_decoder_matches_eager(tiny_model, image_state, num, points):
    """Inductor-compiled (on the CPU: no CUDA graphs) against the eager reference: every prompt type
    and every multimask / hq_token_only combination through the one graph of the bucket shape."""
    decoder = PromptDecoder(tiny_model)
    for kind in KINDS:
        prompts = make_prompts(kind, num, points, seed=7)
        for multimask_output, hq_token_only in ((True, False), (False, False), (False, True), (True, True)):
            expected = eager_decode(tiny_model, image_state, prompts, multimask_output, hq_token_only)
            got = decoder(*image_state, **prompts, multimask_output=multimask_output, hq_token_only=hq_token_only)
            for g, e in zip(got, expected):
                assert g.shape == e.shape
                torch.testing.assert_close(g, e, atol=1e-4 * e.abs().max().item(), rtol=0)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_conv_kernels_decoder_matches_eager(tiny_model, image_state, compile):
    """conv_kernels=True: the HQ branch through the Triton convolutions (interpreter), uncompiled and
    inside the compiled function (custom ops, fullgraph), against the eager reference for one box and
    a full bucket of point + mask prompts, every multimask / hq_token_only combination; then with the
    convolutions' weights loaded in place (the Triton convolution's weight, packed once, is repacked)."""
    model = copy.deepcopy(tiny_model)
    decoder = PromptDecoder(model, compile=compile, conv_kernels=True)
    for kind, num in (("box", 1), ("points+mask", 4)):
        prompts = make_prompts(kind, num, 2, seed=5)
        for multimask_output, hq_token_only in ((True, False), (False, True)):
            expected = eager_decode(model, image_state, prompts, multimask_output, hq_token_only)
            got = decoder(*image_state, **prompts, multimask_output=multimask_output, hq_token_only=hq_token_only)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, atol=1e-4 * e.abs().max().item(), rtol=0)
    with torch.no_grad():
        for conv in model.mask_decoder.embedding_maskfeature[::3]:
            conv.weight.mul_(-1.5)  # as a load_state_dict would
    expected = eager_decode(model, image_state, prompts, False, True)
    got = decoder(*image_state, **prompts, multimask_output=False, hq_token_only=True)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4 * expected[0].abs().max().item(), rtol=0)


def test_conv_kernels_refused_where_they_cannot_run(tiny_model, monkeypatch):
    """bf16 in the interpreter (tl.dot garbage) and the kill switch: refused when the decoder is
    built, with the reason, not at the first prompt."""
    with pytest.raises(ValueError, match="conv_kernels=True needs the Triton kernels.*bfloat16"):
        PromptDecoder(copy.deepcopy(tiny_model).bfloat16(), conv_kernels=True)
    monkeypatch.setenv("SAMHQ_FAST_DISABLE_FUSED", "1")
    with pytest.raises(ValueError, match="SAMHQ_FAST_DISABLE_FUSED is set"):
        PromptDecoder(tiny_model, conv_kernels=True)


def test_cuda_graphs_needs_a_compiled_cuda_decoder(tiny_model):
    """cuda_graphs=True is refused, with the reason, where CUDA graphs cannot be used; False and the
    default (None: no graphs on the CPU) build."""
    for mode in (True, "trees", "manual"):
        with pytest.raises(ValueError, match="not a CUDA device"):
            PromptDecoder(tiny_model, cuda_graphs=mode)
        with pytest.raises(ValueError, match="compile=False"):
            PromptDecoder(tiny_model, compile=False, cuda_graphs=mode)
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        PromptDecoder(tiny_model, cuda_graphs="reduce-overhead")
    assert PromptDecoder(tiny_model, cuda_graphs=False).cuda_graphs is False
    assert PromptDecoder(tiny_model).cuda_graphs is False  # the default on the CPU


@pytest.mark.gpu
def test_default_graph_mode_on_cuda_gpu(tiny_model):
    """The default (None) graphs a compiled CUDA decoder with hand-captured graphs (as True does),
    and reports no graphs for an uncompiled one (which has none)."""
    model = copy.deepcopy(tiny_model).cuda()
    assert PromptDecoder(model).cuda_graphs == PromptDecoder(model, cuda_graphs=True).cuda_graphs == "manual"
    assert PromptDecoder(model, compile=False).cuda_graphs is False


@pytest.mark.gpu
def test_graphed_decoder_follows_weights_assigned_to_the_decoder_gpu(tiny_model, image_state, tf32_off):
    """Hand-captured graphs replay the addresses they recorded: after load_state_dict(assign=True)
    on the mask decoder (new tensors; the model's first weight unchanged) the decoder must bind and
    capture again, not replay the old weights (kept alive here, so no address can be reused)."""
    model = copy.deepcopy(tiny_model).cuda()
    state = tuple(t.cuda() for t in image_state)
    decoder = PromptDecoder(model)
    prompts = {k: None if v is None else v.cuda() for k, v in make_prompts("points+box", 2, 2, seed=4).items()}
    decoder(*state, **prompts, multimask_output=False, hq_token_only=False)
    old_weights = model.mask_decoder.state_dict()
    model.mask_decoder.load_state_dict({name: -t for name, t in old_weights.items()}, assign=True)
    expected = eager_decode(model, state, prompts, False, False)
    got = decoder(*state, **prompts, multimask_output=False, hq_token_only=False)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4 * e.abs().max().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", ["trees", "manual"])
@pytest.mark.parametrize("conv_kernels", [False, True], ids=["inductor_convs", "triton_convs"])
def test_graphed_decoder_matches_eager_gpu(tiny_model, image_state, cuda_graphs, conv_kernels, tf32_off):
    """On CUDA the compiled decoder replays CUDA graphs: outputs must be right and never stale
    (two different prompt sets through the same graph, twice each), with the HQ branch's convolutions
    by Inductor or by the Triton kernels (custom ops inside the graph)."""
    model = copy.deepcopy(tiny_model).cuda()
    state = tuple(t.cuda() for t in image_state)
    decoder = PromptDecoder(model, cuda_graphs=cuda_graphs, conv_kernels=conv_kernels)
    assert decoder.cuda_graphs == cuda_graphs
    counters.clear()
    # one padded shape (4 rows of 4 point slots); the second set has a prompt, a point and the box fewer
    first, second = make_prompts("points+box", 4, 4, seed=1), make_prompts("points", 3, 3, seed=2)
    for prompts in (first, second, first, second):
        prompts = {k: None if v is None else v.cuda() for k, v in prompts.items()}
        expected = eager_decode(model, state, prompts, True, False)
        got = decoder(*state, **prompts, multimask_output=True, hq_token_only=False)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-4 * e.abs().max().item(), rtol=0)
    assert_graphs_not_skipped()


@pytest.mark.gpu
def test_graphed_decoder_reads_each_call_s_image_gpu(tiny_model, two_images_state, tf32_off):
    """The hand-captured graphs skip copying image tensors they were given last time: one graph
    shape fed image 0, image 1 (alone, and as one image of a two-image batch), image 0 again, and
    image 0's embeddings after an in-place write, must decode each call's image, not the one the
    graph's buffers held."""
    model = copy.deepcopy(tiny_model).cuda()
    embeddings, hq_features = (t.cuda() for t in two_images_state)
    first = (embeddings[:1].clone(), hq_features[:1].clone())  # tensors that track their writes
    second = (embeddings[1:].clone(), hq_features[1:].clone())
    decoder = PromptDecoder(model, cuda_graphs="manual")
    prompts = {k: None if v is None else v.cuda() for k, v in make_prompts("box", 2, 1, seed=3).items()}
    for image in (first, second, "second of two", first, "first written"):
        if image == "first written":
            with torch.no_grad():
                first[0].mul_(-1.5)
            image = first
        if image == "second of two":
            got = decoder.decode_images(embeddings, hq_features, [(1, *prompts.values())], True, False)[0]
            image = second
        else:
            got = decoder(*image, **prompts, multimask_output=True, hq_token_only=False)
        assert_like_eager(got, eager_decode(model, image, prompts, True, False), atol=1e-4)
    assert len(decoder._graphs.graphs) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", ["trees", "manual"])
def test_conv_kernels_tuned_on_the_first_graphed_call_gpu(tiny_model, image_state, cuda_graphs, tmp_path, monkeypatch, tf32_off):
    """What the benchmark runs (conftest turns tuning off for the rest of the suite): the conv3x3
    tuner times its candidates inside the first call, before the graph is recorded (graph trees'
    warm-up run, GraphCache's warm-up calls), then the graph replays the chosen configs: outputs
    right on every call, the choice cached for the one convolution kernel the decoder runs (its last
    convolution is folded into a matmul)."""
    from samhq_fast.kernels import autotune

    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(autotune, "_chosen", {})  # as in a new process
    model = copy.deepcopy(tiny_model).cuda()
    state = tuple(t.cuda() for t in image_state)
    decoder = PromptDecoder(model, cuda_graphs=cuda_graphs, conv_kernels=True)
    counters.clear()
    for seed in (1, 2, 1):
        prompts = {k: None if v is None else v.cuda() for k, v in make_prompts("box", 4, 1, seed=seed).items()}
        expected = eager_decode(model, state, prompts, False, False)
        got = decoder(*state, **prompts, multimask_output=False, hq_token_only=False)
        torch.testing.assert_close(got[0], expected[0], atol=1e-4 * expected[0].abs().max().item(), rtol=0)
    assert_graphs_not_skipped()
    entries = json.loads((tmp_path / autotune.CACHE_FILE).read_text())
    assert [key.split(" | ")[3].split("/")[1] for key in entries if " | conv3x3 | " in key] == ["ln_gelu_project"]


def assert_graphs_not_skipped():
    """Inductor falls back to plain compiled code, silently, when it cannot use CUDA graphs."""
    assert counters["inductor"]["cudagraph_skips"] == 0, "Inductor skipped CUDA graphs: the decoder ran ungraphed"


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", ["trees", "manual"])
def test_graphed_decode_images_matches_eager_gpu(tiny_model, two_images_state, monkeypatch, cuda_graphs, tf32_off):
    """Prompts of two images through the graphed decoder (per-prompt image index inside the graph),
    alternating prompt sets so a stale replay would show, and 7 prompts in chunks of 4 (buckets
    shrunk to (1, 2, 4)): the second chunk replays the first one's graph."""
    monkeypatch.setattr(decoding, "PROMPT_BUCKETS", (1, 2, 4))
    captures, capture_begin = [], torch.cuda.CUDAGraph.capture_begin
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", lambda graph, *a, **k: captures.append(graph) or capture_begin(graph, *a, **k))
    model = copy.deepcopy(tiny_model).cuda()
    embeddings, hq_features = (t.cuda() for t in two_images_state)
    decoder = PromptDecoder(model, cuda_graphs=cuda_graphs)
    counters.clear()
    for seed in (1, 2, 1, 2):
        sets = [(1, make_prompts("points", 5, 2, seed=seed)), (0, make_prompts("box", 2, 1, seed=seed + 10))]
        sets = [(image, {k: None if v is None else v.cuda() for k, v in prompts.items()}) for image, prompts in sets]
        got = decoder.decode_images(embeddings, hq_features, [(image, *p.values()) for image, p in sets], False, True)
        for (image, prompts), (logits, scores) in zip(sets, got):
            # hq_token_only without multimask: the selected outputs are views of the graph's static outputs
            expected = eager_decode(model, (embeddings[image : image + 1], hq_features[image : image + 1]), prompts, False, True)
            torch.testing.assert_close(logits, expected[0], atol=1e-4 * expected[0].abs().max().item(), rtol=0)
            torch.testing.assert_close(scores, expected[1], atol=1e-4, rtol=0)
    assert_graphs_not_skipped()
    assert counters["stats"]["unique_graphs"] == 1  # one bucket shape: traced once, never recompiled
    # Both chunks replay the one graph (graph trees record a second one if the first chunk's outputs are still referenced).
    assert len(captures) == 1, f"{len(captures)} CUDA graphs recorded for one bucket shape"


HALF_DTYPES = [torch.bfloat16, torch.float16]
AVX512 = "AVX512" in torch.backends.cpu.get_cpu_capability()


@pytest.mark.skipif(not AVX512, reason="the Inductor bug is in its AVX-512 code")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_inductor_avx512_half_precision_transpose_bug(dtype):
    """Why PromptDecoder compiles 16-bit models on the CPU with CPU_HALF_PRECISION_OPTIONS: Inductor's
    AVX-512 code returns garbage for a transposed bf16 / fp16 input read by a kernel with two outputs
    (torch 2.13), the pattern of the two-way transformer's image keys; 256-bit vectors get it right.
    If the first assertion fails, torch fixed it and the workaround can go."""
    a = torch.randn(1, 256, 256, dtype=dtype).transpose(1, 2)
    b = torch.randn(1, 256, 256, dtype=dtype)
    two_outputs = lambda a, b: (a + b, (a + b) * 2)  # noqa: E731
    expected = (a.float() + b.float()).to(dtype)
    broken = torch.compile(two_outputs)(a, b)[0]
    assert not torch.allclose(broken, expected)
    torch._dynamo.reset()
    fixed = torch.compile(two_outputs, options=decoding.CPU_HALF_PRECISION_OPTIONS)(a, b)[0]
    torch.testing.assert_close(fixed, expected)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_compiled_half_precision_decoder_on_cpu(tiny_model, image_state, dtype):
    """bf16 / fp16 compiled on the CPU against the same padded function run eagerly in that dtype: one
    prompt of every type (a single box made the whole output NaN before the workaround)."""
    model = copy.deepcopy(tiny_model).to(dtype)
    state = tuple(t.to(dtype) for t in image_state)
    compiled, reference = PromptDecoder(model), PromptDecoder(model, compile=False)
    for kind in KINDS:
        prompts = make_prompts(kind, 1, 2, seed=11)
        got = compiled(*state, **prompts, multimask_output=True, hq_token_only=False)
        expected = reference(*state, **prompts, multimask_output=True, hq_token_only=False)
        for g, e in zip(got, expected):
            assert g.isfinite().all()
            assert rel_l2(g, e) < 2e-2


def test_warm_up_compiles_what_later_calls_need(tiny_model, monkeypatch):
    """SamHQPredictor.warm_up: one encoder pass per batch size and, on the fused backend, one decoder
    call per (prompt count, points) bucket, spread over the batch's images: later calls inside those
    buckets (one image, or prompts over two images) trace nothing new, and the image set stays set."""

    predictor = SamHQPredictor(apply_fused_backend(copy.deepcopy(tiny_model)))
    counter = CompileCounterWithBackend("aot_eager")  # Dynamo's guards decide what is traced; aot_eager keeps it fast
    predictor._prompt_decoder = PromptDecoder(predictor.model, backend=counter)
    encoded = []  # batch sizes encoded (by the eager encoder of the same weights: the interpreter's takes most of a minute)
    monkeypatch.setattr(predictor, "_encode", lambda batch: encoded.append(batch.shape[0]) or tiny_model.encode_image(batch))
    photo = make_photo(60, 90, seed=3)
    predictor.set_image(photo)
    features = predictor.features.clone()
    predictor.warm_up(batch_sizes=(1, 2), prompts=3, points=(2,))
    assert encoded == [1, 1, 2] and counter.frame_count == 2  # 3 prompts of 2 points: on one image, and over two
    assert predictor.is_image_set and torch.equal(predictor.features, features)
    points = torch.tensor([[[10.0, 20.0], [30.0, 15.0]], [[40.0, 40.0], [5.0, 50.0]], [[70.0, 10.0], [60.0, 30.0]]]).numpy()
    predictor.predict(point_coords=points, point_labels=torch.ones(3, 2, dtype=torch.int64).numpy())
    boxes = torch.tensor([[5.0, 5.0, 30.0, 40.0], [20.0, 10.0, 80.0, 50.0], [0.0, 0.0, 89.0, 59.0]]).numpy()
    predictor.predict(point_coords=points[:2], point_labels=torch.ones(2, 2, dtype=torch.int64).numpy(), box=boxes[:2], multimask_output=True)
    predictor.set_images([photo, make_photo(50, 40, seed=4)])
    predictor.predict_batch([dict(point_coords=points[:2], point_labels=torch.ones(2, 2, dtype=torch.int64).numpy()),
                             dict(box=boxes[0])])
    assert counter.frame_count == 2  # every later call fell in a warmed bucket (2-4 prompts of 1-2 points)
    predictor.predict_batch([dict(point_coords=points[:1, :1], point_labels=torch.ones(1, 1, dtype=torch.int64).numpy()), dict(box=boxes[0])])
    assert counter.frame_count == 3  # one point per prompt: the point bucket 1, not warmed


def test_warm_up_covers_prompts_on_one_image_of_a_batch(tiny_model, monkeypatch):
    """A clip of 3 frames where only one frame has prompts decodes with the one-image shape, not the
    3-image one: warm_up(batch_sizes=(3,)) must have compiled both."""
    predictor = SamHQPredictor(apply_fused_backend(copy.deepcopy(tiny_model)))
    counter = CompileCounterWithBackend("aot_eager")
    predictor._prompt_decoder = PromptDecoder(predictor.model, backend=counter)
    monkeypatch.setattr(predictor, "_encode", tiny_model.encode_image)  # (the eager encoder: the interpreter's is slow)
    predictor.warm_up(batch_sizes=(3,), prompts=2, points=1)
    warmed = counter.frame_count
    predictor.set_images([make_photo(60, 90, seed=s) for s in range(3)])
    boxes = np.array([[5.0, 5.0, 30.0, 40.0], [20.0, 10.0, 80.0, 50.0]])
    predictor.predict_batch([{}, dict(box=boxes), {}])  # both prompts on frame 1
    predictor.predict_batch([dict(box=boxes[0]), {}, dict(box=boxes[1])])  # one prompt on each of frames 0 and 2
    assert counter.frame_count == warmed == 2


def test_warm_up_on_eager_runs_the_encoder_only(tiny_model, monkeypatch):
    predictor = SamHQPredictor(tiny_model)
    encoded = []
    encode = predictor._encode
    monkeypatch.setattr(predictor, "_encode", lambda batch: encoded.append(tuple(batch.shape)) or encode(batch))
    predictor.warm_up(batch_sizes=(2,), prompts=(1, 16))
    size = tiny_model.config.img_size
    assert encoded == [(2, 3, size, size)] and predictor._prompt_decoder is None and not predictor.is_image_set


def test_warm_up_on_eager_encodes_every_batch_size(tiny_model, monkeypatch):
    """One encoder pass per batch size given, in order, on the eager backend too (no decoder there)."""
    predictor = SamHQPredictor(tiny_model)
    encoded = []
    encode = predictor._encode
    monkeypatch.setattr(predictor, "_encode", lambda batch: encoded.append(batch.shape[0]) or encode(batch))
    predictor.warm_up(batch_sizes=(1, 3, 2), prompts=(1, 4), points=(1, 2))
    assert encoded == [1, 3, 2] and predictor._prompt_decoder is None


@pytest.mark.parametrize("kwargs", [dict(prompts=0), dict(points=()), dict(batch_sizes="2"), dict(prompts=(True,)), dict(points=(1.5,))])
def test_warm_up_refuses_bad_counts(tiny_model, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be positive integers"):
        SamHQPredictor(tiny_model).warm_up(**kwargs)


@pytest.mark.gpu
def test_warm_up_gpu(tiny_model):
    """On CUDA (the default decoder graphs, encoder graphs): after warm_up, a real image and prompts in the warmed
    buckets trace no new graph, and the outputs are the eager predictor's."""

    predictor = SamHQPredictor(apply_fused_backend(copy.deepcopy(tiny_model).cuda()), encoder_graphs=True)
    predictor.warm_up(batch_sizes=(1,), prompts=(3,), points=(2,))
    counters.clear()
    photo = make_photo(60, 90, seed=3)
    prompt = dict(point_coords=torch.tensor([[[10.0, 20.0], [30.0, 15.0]], [[40.0, 40.0], [5.0, 50.0]], [[70.0, 10.0], [60.0, 30.0]]]).numpy(),
                  point_labels=torch.ones(3, 2, dtype=torch.int64).numpy())
    predictor.set_image(photo)
    _, scores, low_res = predictor.predict(**prompt)
    assert counters["stats"]["unique_graphs"] == 0
    eager = SamHQPredictor(tiny_model)
    eager.set_image(photo)
    _, eager_scores, eager_low_res = eager.predict(**prompt)
    assert rel_l2(torch.as_tensor(low_res), torch.as_tensor(eager_low_res)) < 1e-3  # TF32 dots on the GPU
    assert abs(scores - eager_scores).max() < 1e-3
