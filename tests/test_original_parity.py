"""The eager engine against the original SAM-HQ release itself (`segment_anything_hq` 0.3), same weights.

The original model is built from its own classes with the tiny test architecture (head_dim 80 as
vit_h, windowed blocks with padding) and with vit_b's, given our random weights through its own
`load_state_dict(strict=True)` (so the key layouts agree too), and saved as an original checkpoint
that `samhq_fast.load` reads. REFERENCE.md's bar: mask logits within ~1e-3 of the logit scale,
IoU scores within 1e-4, on fp32 CPU.
"""

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import samhq_fast
from samhq_fast.automatic import CROP_EDGE_TOLERANCE, SamHQAutomaticMaskGenerator, rle_to_mask
from samhq_fast.modeling import SamHQConfig
from samhq_fast.modeling.image_encoder import decomposed_rel_pos_bias, get_rel_pos
from samhq_fast.transforms import ResizeLongestSide
from conftest import TINY_CONFIG, make_model

# Measured (fp32, CPU): logits within 1.1e-6 of max(1, max |logit|), scores within 6e-8. The bounds
# keep ~15x of that for other CPUs' summation orders, and stay below what a one-line slip in the
# decoder gives (a LayerNorm eps of 1e-6, HF's, or a tanh GELU: ~9e-5 of the logit scale).
LOGIT_TOL = 2e-5  # relative to max(1, the largest |logit|)
SCORE_TOL = 2e-6
TIE_LOGIT = 1e-3  # a mask pixel may differ only where its logit is this close to the threshold (0)
MAX_TIE_PIXELS = 4  # per automatic mask, which carries no logits to check the tie against


def build_original(original, config: SamHQConfig) -> nn.Module:
    """The original Sam with `config`'s architecture, built as the original's `_build_sam` builds vit_b/l/h."""
    enc, grid = config.encoder, config.embedding_size
    modeling = original.modeling
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=enc.depth, embed_dim=enc.embed_dim, img_size=enc.img_size, mlp_ratio=enc.mlp_dim / enc.embed_dim,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=enc.num_heads, patch_size=enc.patch_size, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=enc.global_attn_indexes, window_size=enc.window_size, out_chans=enc.out_chans,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(enc.img_size, enc.img_size), mask_in_chans=16,
        ),
        mask_decoder=modeling.MaskDecoderHQ(
            num_multimask_outputs=3, transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256, vit_dim=enc.embed_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def original_and_ours(original, config: SamHQConfig, folder, seed: int = 0):
    """(original Sam, our eager model loaded from the original's own saved state dict)."""
    reference = build_original(original, config)
    reference.load_state_dict(make_model(config, seed).state_dict(), strict=True)
    path = folder / "original.pth"
    torch.save(reference.state_dict(), path)
    return reference, samhq_fast.load(path, backend="eager")


@pytest.fixture(scope="module")
def tiny_pair(original, tmp_path_factory):
    return original_and_ours(original, TINY_CONFIG, tmp_path_factory.mktemp("original_tiny"))


def assert_logits_close(actual, expected) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, np.abs(expected).max())
    err = np.abs(actual - expected).max() / scale
    assert err < LOGIT_TOL, f"max |logit difference| is {err:.2e} of the logit scale {scale:.1f}"


def assert_masks_match(masks, expected_logits) -> None:
    """Equal to the original's logits > 0, except where a logit ties with the threshold."""
    masks, expected_logits = np.asarray(masks), np.asarray(expected_logits)
    assert masks.dtype == np.bool_ and masks.shape == expected_logits.shape
    differ = masks != (expected_logits > 0)
    assert np.all(np.abs(expected_logits[differ]) < TIE_LOGIT), f"{differ.sum()} mask pixels differ away from the threshold"


def assert_predict_matches(theirs, predictor, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The original SamPredictor's `predict(**kwargs)` against ours (both with the image set): logits
    (return_logits=True), low-res logits, scores, and the thresholded masks.
    -> the original's (scores, low-res logits)."""
    expected_logits, expected_scores, expected_low = theirs.predict(**kwargs, return_logits=True)
    logits, scores, low = predictor.predict(**kwargs, return_logits=True)
    assert_logits_close(logits, expected_logits)
    assert_logits_close(low, expected_low)
    np.testing.assert_allclose(scores, expected_scores, atol=SCORE_TOL, rtol=0)
    masks, _, _ = predictor.predict(**kwargs)
    assert_masks_match(masks, expected_logits)
    return expected_scores, expected_low


# The released models never resize a rel-pos table and always have q_size == k_size, so the parity
# tests above cannot reach these branches; the kernels' rel-pos pre-pass resizes with the same code.
@pytest.mark.parametrize("q_size, k_size, rows", [(7, 7, 13), (7, 7, 5), (14, 14, 31), (4, 8, 9), (8, 4, 15), (6, 9, 17)])
def test_get_rel_pos_matches_original(original, q_size, k_size, rows):
    table = torch.randn(rows, 16, generator=torch.Generator().manual_seed(rows))
    expected = original.modeling.image_encoder.get_rel_pos(q_size, k_size, table)
    torch.testing.assert_close(get_rel_pos(q_size, k_size, table), expected, rtol=0, atol=1e-6)


def test_decomposed_bias_with_resized_tables_matches_original(original):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5 * 6, 8, generator=gen)  # [batch * heads, tokens of a 5 x 6 grid, head_dim]
    rel_pos_h, rel_pos_w = torch.randn(7, 8, generator=gen), torch.randn(9, 8, generator=gen)  # 9 and 11 rows needed
    zero_scores = torch.zeros(3, 30, 30)
    expected = original.modeling.image_encoder.add_decomposed_rel_pos(zero_scores, q, rel_pos_h, rel_pos_w, (5, 6), (5, 6))
    torch.testing.assert_close(decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, (5, 6), (5, 6)), expected, rtol=1e-6, atol=1e-6)


def test_encoder_matches_original(tiny_pair, photo):
    reference, ours = tiny_pair
    x = reference.preprocess(torch.from_numpy(photo).permute(2, 0, 1)[None].float())
    with torch.no_grad():
        expected, expected_interm = reference.image_encoder(x)
        actual, actual_interm = ours.image_encoder(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert len(actual_interm) >= 1  # the HQ decoder reads the first global block's output
    torch.testing.assert_close(actual_interm[0], expected_interm[0], rtol=1e-5, atol=1e-5)


PROMPTS = {
    "one point": dict(point_coords=np.array([[111.0, 70.0]]), point_labels=np.array([1])),
    "points, one background": dict(point_coords=np.array([[40.0, 30.0], [180.0, 120.0], [100.5, 75.25]]), point_labels=np.array([1, 0, 1])),
    "box": dict(box=np.array([30.0, 20.0, 190.0, 140.0])),
    # a tracked object leaving the 223 x 150 frame: corners 77 and 60 px past the border
    "box reaching past the border": dict(box=np.array([150.0, -60.0, 300.0, 100.0])),
    "box and points": dict(box=np.array([10.0, 5.0, 150.0, 100.0]), point_coords=np.array([[60.0, 50.0], [140.0, 90.0]]), point_labels=np.array([1, 0])),
}


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("multimask_output, hq_token_only", [(True, False), (False, False), (False, True), (True, True)])
def test_predict_matches_original(original, tiny_pair, photo, prompt, multimask_output, hq_token_only):
    """SamPredictor.set_image + predict (numpy image, photo pixels) of the original vs ours."""
    reference, ours = tiny_pair
    theirs = original.SamPredictor(reference)
    theirs.set_image(photo)
    predictor = samhq_fast.SamHQPredictor(ours)
    predictor.set_image(photo)
    kwargs = dict(PROMPTS[prompt], multimask_output=multimask_output, hq_token_only=hq_token_only)
    expected_scores, expected_low = assert_predict_matches(theirs, predictor, **kwargs)

    # The low-res logits go back in as mask_input (the original's refinement loop).
    assert_predict_matches(theirs, predictor, **kwargs, mask_input=expected_low[np.argmax(expected_scores)][None])


def test_predict_torch_several_boxes_matches_original(original, tiny_pair, photo):
    """The original's batched path: apply_boxes_torch -> predict_torch with 3 boxes at once."""
    reference, ours = tiny_pair
    theirs = original.SamPredictor(reference)
    theirs.set_image(photo)
    predictor = samhq_fast.SamHQPredictor(ours)
    predictor.set_image(photo)
    boxes = torch.tensor([[30.0, 20.0, 190.0, 140.0], [0.0, 0.0, 60.0, 60.0], [100.0, 40.0, 222.0, 149.0]])
    expected = theirs.predict_torch(None, None, theirs.transform.apply_boxes_torch(boxes, photo.shape[:2]), multimask_output=False, return_logits=True)
    actual = predictor.predict_torch(None, None, predictor.transform.apply_boxes_torch(boxes, photo.shape[:2]), multimask_output=False, return_logits=True)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert_logits_close(a.numpy(), e.numpy())


@pytest.mark.parametrize("points", [1, 3, 0])
@pytest.mark.parametrize("with_box", [False, True])
def test_prompt_encoder_matches_original(tiny_pair, points, with_box):
    """Sparse and dense prompt embeddings, the not-a-point padding included (without a box the
    original appends one, even to an empty point list; the predictor APIs refuse K = 0)."""
    reference, ours = tiny_pair
    gen = torch.Generator().manual_seed(points)
    coords, labels = torch.rand(2, points, 2, generator=gen) * 200, torch.tensor([[1, 0, -1][:points]] * 2)
    boxes = torch.tensor([[10.0, 20.0, 150.0, 120.0], [0.0, 0.0, 60.0, 60.0]]) if with_box else None
    with torch.no_grad():
        expected, actual = reference.prompt_encoder((coords, labels), boxes, None), ours.prompt_encoder((coords, labels), boxes, None)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("labels, dtype", [([[1, -2, 2], [0, 7, -1]], torch.int64), ([[1.0, 0.5, -0.5], [-1.0, 1.5, 0.0]], torch.float32),
                                           ([[1, 255, 0], [0, 200, 1]], torch.uint8)], ids=["int", "float", "uint8"])
def test_labels_outside_sams_set_match_original(tiny_pair, labels, dtype):
    """A label other than 1 / 0 / -1 (an int, a fraction in a float tensor, 255 in a uint8 one) is a
    point with no label embedding in the original: not a "not a point", not rounded to a neighbour.
    (uint8 255 must not compare equal to -1: the original compares after its float padding label
    promoted the labels to float.)"""
    reference, ours = tiny_pair
    labels = torch.tensor(labels, dtype=dtype)
    coords = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(5)) * 200
    with torch.no_grad():
        expected, actual = reference.prompt_encoder((coords, labels), None, None), ours.prompt_encoder((coords, labels), None, None)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_transform_matches_original(original, photo):
    """ResizeLongestSide against the original's: numpy images (PIL), float tensor batches (its one
    antialiased pass), coordinates and boxes."""
    ours, theirs = ResizeLongestSide(256), original.utils.transforms.ResizeLongestSide(256)
    np.testing.assert_array_equal(ours.apply_image(photo), theirs.apply_image(photo))
    chw = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    torch.testing.assert_close(ours.apply_image_torch(chw), theirs.apply_image_torch(chw), rtol=0, atol=0)
    boxes, size = np.array([[5.0, 7.0, 200.0, 140.0]]), photo.shape[:2]
    np.testing.assert_allclose(ours.apply_boxes(boxes, size), theirs.apply_boxes(boxes, size), rtol=1e-6)
    torch.testing.assert_close(ours.apply_coords_torch(torch.tensor([[3.0, 149.0]]), size),
                               theirs.apply_coords_torch(torch.tensor([[3.0, 149.0]]), size))


def test_forward_matches_original(tiny_pair, photo):
    """Sam.forward(batched_input): two images of different sizes, points on one and boxes on the other."""
    reference, ours = tiny_pair
    other = np.ascontiguousarray(photo[:97, :131][::-1])
    batched_input = []
    for image, prompt in ((photo, dict(point_coords=torch.tensor([[[50.0, 60.0], [120.0, 30.0]]]), point_labels=torch.tensor([[1, 0]]))),
                          (other, dict(boxes=torch.tensor([[5.0, 5.0, 90.0, 80.0], [40.0, 10.0, 130.0, 96.0]])))):
        resized = ResizeLongestSide(TINY_CONFIG.img_size)
        record = {"image": torch.from_numpy(resized.apply_image(image)).permute(2, 0, 1).contiguous(), "original_size": image.shape[:2]}
        if "point_coords" in prompt:
            record.update(point_coords=resized.apply_coords_torch(prompt["point_coords"], image.shape[:2]), point_labels=prompt["point_labels"])
        else:
            record["boxes"] = resized.apply_boxes_torch(prompt["boxes"], image.shape[:2])
        batched_input.append(record)
    with torch.no_grad():
        expected = reference(batched_input, multimask_output=True)
        actual = ours(batched_input, multimask_output=True)
    for a, e, record in zip(actual, expected, batched_input):
        # the original's full-size logits, from its own post-processing, to tell threshold ties apart
        expected_logits = reference.postprocess_masks(e["low_res_logits"], record["image"].shape[-2:], record["original_size"])
        assert_masks_match(a["masks"].numpy(), expected_logits.numpy())
        np.testing.assert_allclose(a["iou_predictions"].numpy(), e["iou_predictions"].numpy(), atol=SCORE_TOL, rtol=0)
        assert_logits_close(a["low_res_logits"].numpy(), e["low_res_logits"].numpy())


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")  # pycocotools 2.0 under numpy 2
@pytest.mark.parametrize("crop_n_layers, box_nms_thresh, min_mask_region_area, output_mode, crop_edge_tolerance, at_least", [
    (0, 1.0, 0, "binary_mask", 20.0, 20), (1, 0.7, 0, "uncompressed_rle", 20.0, 1), (0, 1.0, 30, "coco_rle", 20.0, 20),
    (1, 0.7, 0, "binary_mask", 0.0, 1), (0, 0.7, 30, "binary_mask", 20.0, 1),
])
def test_automatic_masks_match_original(original, tiny_pair, photo, monkeypatch, crop_n_layers, box_nms_thresh, min_mask_region_area,
                                        output_mode, crop_edge_tolerance, at_least):
    """SamAutomaticMaskGenerator vs ours: the same records, in the same order. The tiny random
    model's masks are large and scattered (|logit| ~ 0.2, every box spans the image): a stability
    offset of 0.05 and thresholds at about the median IoU and stability leave dozens of masks. With
    a crop layer, the quadrant crops' masks all touch their crop's edge and are dropped, as they must be;
    with the edge tolerance at 0 on both sides (the original's is an argument default) some crops'
    masks survive, so the NMS across crops (smaller crops preferred) decides. Box NMS 0.7 with small
    regions removed runs the NMS that prefers the masks the clean-up left unchanged."""
    if min_mask_region_area:
        pytest.importorskip("cv2", reason="the original removes small regions with OpenCV")
    if output_mode == "coco_rle":
        pytest.importorskip("pycocotools", reason="coco_rle needs pycocotools")
    if crop_edge_tolerance != CROP_EDGE_TOLERANCE:
        monkeypatch.setattr("samhq_fast.automatic.CROP_EDGE_TOLERANCE", crop_edge_tolerance)
        theirs = original.automatic_mask_generator
        monkeypatch.setattr(theirs, "is_box_near_crop_edge", partial(theirs.is_box_near_crop_edge, atol=crop_edge_tolerance))
    reference, ours = tiny_pair
    settings = dict(points_per_side=8, points_per_batch=24, pred_iou_thresh=0.2, stability_score_thresh=0.71, stability_score_offset=0.05,
                    box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers, min_mask_region_area=min_mask_region_area, output_mode=output_mode)
    expected = original.SamAutomaticMaskGenerator(reference, **settings).generate(photo)
    actual = SamHQAutomaticMaskGenerator(ours, **settings).generate(photo)
    assert at_least <= len(expected) < 64, "the filters should keep some masks and drop some: adjust the thresholds"
    if crop_edge_tolerance != CROP_EDGE_TOLERANCE:
        assert any(e["crop_box"] != [0, 0, photo.shape[1], photo.shape[0]] for e in expected), "no crop's mask survived"
    assert len(actual) == len(expected)
    decode = {"binary_mask": np.asarray, "uncompressed_rle": rle_to_mask}
    if output_mode == "coco_rle":
        from pycocotools import mask as coco_mask
        decode["coco_rle"] = coco_mask.decode
    for a, e in zip(actual, expected):
        assert a["crop_box"] == e["crop_box"]
        np.testing.assert_allclose(a["point_coords"], e["point_coords"], rtol=0, atol=1e-9)
        # The records carry no logits: allow the few pixels whose logit ties with 0 (float rounding
        # differs between the two implementations, and between runs of either).
        mask, expected_mask = decode[output_mode](a["segmentation"]), decode[output_mode](e["segmentation"])
        assert mask.shape == expected_mask.shape
        differ = int((mask != expected_mask).sum())
        assert differ <= MAX_TIE_PIXELS, f"{differ} pixels differ"
        assert abs(a["area"] - e["area"]) <= differ and a["area"] == int(mask.sum())
        assert a["bbox"] == e["bbox"] or differ
        assert a["predicted_iou"] == pytest.approx(e["predicted_iou"], abs=SCORE_TOL)
        assert a["stability_score"] == pytest.approx(e["stability_score"], abs=1e-3)


@pytest.mark.slow
def test_vit_b_matches_original(original, tmp_path):
    """The real vit_b architecture at 1024 input: one image, a point and a box prompt."""
    reference, ours = original_and_ours(original, SamHQConfig.from_variant("vit_b"), tmp_path, seed=1)
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    theirs = original.SamPredictor(reference)
    theirs.set_image(image)
    predictor = samhq_fast.SamHQPredictor(ours)
    predictor.set_image(image)
    torch.testing.assert_close(predictor.get_image_embedding(), theirs.get_image_embedding(), rtol=1e-4, atol=1e-4)
    for prompt in (dict(point_coords=np.array([[320.0, 200.0]]), point_labels=np.array([1])), dict(box=np.array([100.0, 80.0, 500.0, 400.0]))):
        assert_predict_matches(theirs, predictor, **prompt)
