"""Automatic mask generation (SamHQAutomaticMaskGenerator).

The helpers are checked against hand-derived values or plain-Python re-derivations; the generator
against the single-image predictor (itself checked against the original pipeline in
test_predictor.py): every record must be the predictor's mask for its grid point, with the
filters, NMS and crop rules of the original applied. test_original_parity.py compares whole
runs with the original release's own generator. The tiny random-weight model's logits are
small (|logit| ~ 0.2), so the tests use a stability offset of 0.05 instead of the default 1.0.
"""

import copy
import itertools
import json
import re
import sys
import types

import numpy as np
import pytest
import torch

import samhq_fast
from samhq_fast import SamHQPredictor
from samhq_fast.automatic import (
    SamHQAutomaticMaskGenerator,
    box_nms,
    crop_boxes,
    mask_boxes,
    masks_to_rle,
    point_grid,
    remove_small_regions,
    rle_area,
    rle_to_mask,
    rles_to_masks,
    stability_score,
)
from samhq_fast.decoding import PromptDecoder
from samhq_fast.modeling import sam_hq
from samhq_fast.transforms import preprocess_shape
from original_sam_hq import import_original
from conftest import TINY_CONFIG, make_model
from test_predictor import make_photo

OFFSET = 0.05
LOOSE = dict(pred_iou_thresh=0, stability_score_thresh=0, stability_score_offset=OFFSET, box_nms_thresh=1.0)  # keep every mask


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return make_photo(200, 300, seed=3)


def box_iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def xywh_to_xyxy(box):
    return [box[0], box[1], box[0] + box[2], box[1] + box[3]]


# ---------------------------------------------------------------------------------------------
# Helpers, against hand-derived values and plain re-derivations
# ---------------------------------------------------------------------------------------------


def test_point_grid():
    np.testing.assert_allclose(point_grid(2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    grid = point_grid(32)
    assert grid.shape == (1024, 2) and np.isclose(grid.min(), 1 / 64) and np.isclose(grid.max(), 1 - 1 / 64)


def test_crop_boxes_by_hand():
    """100 x 200 image, one layer, overlap ratio 0.25: overlap int(0.25 * 100 * 1) = 25 px, crops
    ceil((25 + 200) / 2) = 113 wide and ceil((25 + 100) / 2) = 63 high, starting at 0 and 113 - 25 = 88
    (x), 0 and 63 - 25 = 38 (y); x outer, y inner, as the original."""
    boxes, layers = crop_boxes(100, 200, 1, 0.25)
    assert boxes == [[0, 0, 200, 100], [0, 0, 113, 63], [0, 38, 113, 100], [88, 0, 200, 63], [88, 38, 200, 100]]
    assert layers == [0, 1, 1, 1, 1]
    boxes, layers = crop_boxes(100, 200, 2, 512 / 1500)
    assert len(boxes) == 1 + 4 + 16 and layers.count(2) == 16
    assert all(0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100 for x0, y0, x1, y1 in boxes)


def _runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts, re-derived: runs of the column-major pixels, zeros first."""
    counts = [len(list(group)) for _, group in itertools.groupby(mask.T.ravel().tolist())]
    return ([0] if mask.T.ravel()[0] else []) + counts


@pytest.mark.parametrize("height, width", [(7, 9), (1, 1), (1, 6), (5, 1)])
def test_rle_round_trip_and_counts(height, width):
    gen = np.random.default_rng(0)
    masks = gen.random((6, height, width)) > 0.6
    masks[1] = False
    masks[2] = True
    masks[3, 0, 0] = True  # the first pixel set: a leading 0-run
    masks[4, 0, 0] = False
    masks[5, -1, -1] = not masks[5, -1, -1]  # the last pixel either way
    rles = masks_to_rle(torch.from_numpy(masks))
    assert masks_to_rle(torch.zeros(0, height, width, dtype=torch.bool)) == []
    as_uint8 = masks_to_rle(torch.from_numpy(masks).to(torch.uint8))  # 0 / 1 integer masks encode alike
    assert [r["counts"].tolist() for r in as_uint8] == [r["counts"].tolist() for r in rles]
    for mask, rle in zip(masks, rles, strict=True):
        assert rle["size"] == [height, width] and rle["counts"].tolist() == _runs(mask)
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
        assert rle_area(rle) == mask.sum()


def test_rles_decode_together():
    """Masks of every kind (empty, full, first pixel set, > 255 runs: the uint8 flip count wraps)
    decode together to the masks they came from; RLEs that do not fit their size are refused."""
    gen = np.random.default_rng(1)
    masks = gen.random((4, 23, 29)) > 0.5  # ~330 runs each
    masks[1], masks[2] = False, True
    masks[3, 0, 0] = True
    rles = masks_to_rle(torch.from_numpy(masks))
    decoded = rles_to_masks(rles)
    assert decoded.dtype == torch.bool and decoded.is_contiguous()
    np.testing.assert_array_equal(decoded.numpy(), masks)
    # RLEs from elsewhere may hold 0-long runs anywhere (and a numpy size): against a plain run expansion
    for counts in ([3, 0, 2], [5, 0], [2, 3, 0], [0, 5], [0, 2, 0, 3], [1, 1, 1, 1, 1]):
        expected = np.concatenate([np.full(n, i % 2 == 1) for i, n in enumerate(counts)]).reshape(5, 1).T
        np.testing.assert_array_equal(rle_to_mask({"size": np.array([1, 5]), "counts": counts}), expected)
    other_size = masks_to_rle(torch.zeros(1, 29, 23, dtype=torch.bool))
    for bad in (rles[:1] + other_size, [dict(rles[0], counts=np.append(rles[0]["counts"], 1))]):
        with pytest.raises(ValueError, match="must all have size"):
            rles_to_masks(bad)


def test_mask_boxes():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:7] = True
    masks[1, 5, 0] = True
    masks[1, 0, 3] = True
    boxes = mask_boxes(masks)
    assert boxes.tolist() == [[2, 1, 6, 3], [0, 0, 3, 5], [0, 0, 0, 0]]  # inclusive corners; empty -> zeros


def test_stability_score():
    logits = torch.randn(4, 10, 12, generator=torch.Generator().manual_seed(1))
    got = stability_score(logits, 0.0, 0.3)
    for g, l in zip(got, logits.numpy()):
        assert np.isclose(g.item(), ((l > 0.3) & (l > -0.3)).sum() / ((l > 0.3) | (l > -0.3)).sum())


@pytest.mark.parametrize("block_elements", [1 << 17, 1, 7 * 40], ids=["one_block", "a_row_per_block", "uneven_blocks"])
def test_box_nms_against_a_plain_greedy_loop(monkeypatch, block_elements):
    """box_nms takes the boxes a block of rows at a time: the kept boxes do not depend on the blocks."""
    monkeypatch.setattr("samhq_fast.automatic.NMS_BLOCK_ELEMENTS", block_elements)
    gen = np.random.default_rng(2)
    corners = gen.uniform(0, 50, (40, 2))
    boxes = np.concatenate([corners, corners + gen.uniform(5, 30, (40, 2))], axis=1)
    scores = gen.random(40)
    for threshold in (0.2, 0.5, 0.8):
        expected = []
        for i in np.argsort(-scores):
            if all(box_iou(boxes[i], boxes[j]) <= threshold for j in expected):
                expected.append(i)
        assert box_nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).tolist() == expected
    assert box_nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_remove_small_regions():
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:9, 1:9] = True
    mask[4:6, 4:6] = False  # a 4-pixel hole
    mask[10, 10] = mask[11, 11] = True  # a 2-pixel island, diagonally connected (8-connectivity)
    filled, changed = remove_small_regions(mask, 5, "holes")
    assert changed and filled[4:6, 4:6].all() and filled.sum() == mask.sum() + 4
    cleaned, changed = remove_small_regions(mask, 3, "islands")
    assert changed and not cleaned[10:, 10:].any() and cleaned.sum() == mask.sum() - 2
    unchanged, changed = remove_small_regions(mask, 2, "islands")  # the island has 2 pixels: not < 2
    assert not changed and unchanged is mask
    only_small = np.zeros((5, 5), dtype=bool)
    only_small[0, 0] = only_small[3:5, 3:5] = True
    kept, _ = remove_small_regions(only_small, 10, "islands")  # all small: the largest stays
    assert kept.sum() == 4 and kept[3:5, 3:5].all()


@pytest.mark.parametrize("overlapping", [True, False], ids=["overlapping", "apart"])
def test_small_region_clean_up_prefers_unchanged_masks(overlapping):
    """After small regions are removed, NMS (at the generator's threshold) scores unchanged masks 1
    and changed ones 0, as the original does. A higher-scored mask that was a clean square plus a
    1-pixel island is, once cleaned, the clean square again: dropped for the unchanged copy. One
    elsewhere is kept, cleaned, its box recomputed, and ranked after the unchanged mask."""
    pytest.importorskip("scipy")
    clean = np.zeros((20, 20), dtype=bool)
    clean[2:14, 2:14] = True
    speckled = np.zeros((20, 20), dtype=bool)
    if overlapping:
        speckled[2:14, 2:14] = True
    else:
        speckled[2:14, 10:20] = True  # box IoU with the clean square: 48 / 216
    speckled[19, 0] = True  # the island
    masks = torch.from_numpy(np.stack([speckled, clean]))
    data = {"rles": masks_to_rle(masks), "boxes": mask_boxes(masks), "iou": torch.tensor([0.9, 0.8]), "points": torch.zeros(2, 2)}
    generator = SamHQAutomaticMaskGenerator.__new__(SamHQAutomaticMaskGenerator)  # only min_mask_region_area is read
    generator.min_mask_region_area = 2
    cleaned = generator._remove_small_regions(data, 0.7)
    speckled[19, 0] = False
    expected = [(0.8, clean)] if overlapping else [(0.8, clean), (0.9, speckled)]
    assert cleaned["iou"].tolist() == pytest.approx([score for score, _ in expected])
    for rle, (_, mask) in zip(cleaned["rles"], expected):
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
    assert cleaned["boxes"].tolist() == [[2, 2, 13, 13]] + ([] if overlapping else [[10, 2, 19, 13]])


# ---------------------------------------------------------------------------------------------
# The generator, against the single-image predictor
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(tiny_model, photo) -> SamHQPredictor:
    predictor = SamHQPredictor(tiny_model)
    predictor.set_image(photo)
    return predictor


@pytest.mark.parametrize("multimask_output, hq_token_only", [(True, False), (False, False), (True, True)],
                         ids=["multimask", "single", "hq_only"])
def test_every_grid_point_gives_the_predictors_mask(tiny_model, photo, oracle, multimask_output, hq_token_only):
    flags = dict(multimask_output=multimask_output, hq_token_only=hq_token_only)
    records = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=4, points_per_batch=5, **LOOSE).generate(photo, **flags)
    grid = point_grid(4) * [300, 200]
    assert len(records) == 16 and sorted(map(tuple, (r["point_coords"][0] for r in records))) == sorted(map(tuple, grid))
    scores = [r["predicted_iou"] for r in records]
    assert scores == sorted(scores, reverse=True)  # NMS order: best first
    for record in records:
        logits, score, _ = oracle.predict(point_coords=np.array(record["point_coords"]), point_labels=np.array([1]), return_logits=True, **flags)
        mask = record["segmentation"]
        assert mask.dtype == np.bool_ and mask.shape == (200, 300)
        away = np.abs(logits[0]) > 1e-4
        np.testing.assert_array_equal(mask[away], (logits[0] > 0)[away])
        assert np.isclose(record["predicted_iou"], score[0], atol=1e-5)
        stability = ((logits[0] > OFFSET).sum()) / ((logits[0] > -OFFSET).sum())
        assert np.isclose(record["stability_score"], stability, atol=1e-3)
        ys, xs = np.nonzero(mask)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert record["area"] == mask.sum() and record["crop_box"] == [0, 0, 300, 200]


def test_filters_keep_exactly_the_masks_above_the_thresholds(tiny_model, photo):
    every = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=4, **LOOSE).generate(photo)
    iou_cut = float(np.median([r["predicted_iou"] for r in every]))
    stability_cut = float(np.median([r["stability_score"] for r in every]))
    filtered = SamHQAutomaticMaskGenerator(
        tiny_model, points_per_side=4, **dict(LOOSE, pred_iou_thresh=iou_cut, stability_score_thresh=stability_cut)
    ).generate(photo)
    expected = [r for r in every if r["predicted_iou"] > iou_cut and r["stability_score"] >= stability_cut]
    assert 0 < len(filtered) < len(every)
    assert [r["point_coords"] for r in filtered] == [r["point_coords"] for r in expected]


def test_only_masks_over_the_iou_threshold_are_upsampled_a_few_at_a_time(tiny_model, photo, monkeypatch):
    """All 25 points are decoded in one batch; those under pred_iou_thresh are dropped before the
    upsampling, the rest are upsampled and filtered 3 prompts at a time: the same records as unchunked."""
    every = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=5, points_per_batch=25, **LOOSE).generate(photo)
    settings = dict(LOOSE, points_per_side=5, points_per_batch=25, pred_iou_thresh=float(np.median([r["predicted_iou"] for r in every])),
                    stability_score_thresh=float(np.quantile([r["stability_score"] for r in every], 0.3)))
    expected = SamHQAutomaticMaskGenerator(tiny_model, **settings).generate(photo)
    monkeypatch.setattr(sam_hq, "MASK_CHUNK_PIXELS", 3 * (256 * 256 + 200 * 300))  # 3 prompts' upsampled logits
    generator = SamHQAutomaticMaskGenerator(tiny_model, **settings)
    upsampled, upsample = [], generator.predictor._masks
    generator.predictor._masks = lambda low_res, *args, **kwargs: upsampled.append(len(low_res)) or upsample(low_res, *args, **kwargs)
    actual = generator.generate(photo)
    assert upsampled[:-1] == [3] * (len(upsampled) - 1) and 0 < upsampled[-1] <= 3
    assert sum(upsampled) == sum(r["predicted_iou"] > settings["pred_iou_thresh"] for r in every) < 25
    assert 0 < len(actual) < sum(upsampled)  # the stability filter dropped some of the upsampled ones
    assert [r["point_coords"] for r in actual] == [r["point_coords"] for r in expected]
    for a, e in zip(actual, expected):
        assert a == {**e, "segmentation": a["segmentation"]} and np.array_equal(a["segmentation"], e["segmentation"])


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_no_mask_over_the_iou_threshold_gives_no_records(tiny_model, photo, crop_n_layers):
    every = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=4, **LOOSE).generate(photo)
    above_all = max(r["predicted_iou"] for r in every) + 0.01
    generator = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=4, crop_n_layers=crop_n_layers, **dict(LOOSE, pred_iou_thresh=above_all))
    assert generator.generate(photo) == []


@pytest.mark.gpu
def test_rles_decode_on_the_gpu():
    """The records' masks are decoded on the model's device: CUDA's accumulated uint8 scatter and
    uint8 cumulative sum give the masks exactly (0-long runs, > 255 runs, empty and full masks)."""
    gen = np.random.default_rng(3)
    masks = gen.random((6, 37, 41)) > 0.5
    masks[1], masks[2] = False, True
    rles = masks_to_rle(torch.from_numpy(masks))
    np.testing.assert_array_equal(rles_to_masks(rles, "cuda").cpu().numpy(), masks)
    odd = [{"size": [1, 5], "counts": counts} for counts in ([3, 0, 2], [2, 3, 0], [0, 2, 0, 3])]
    torch.testing.assert_close(rles_to_masks(odd, "cuda").cpu(), rles_to_masks(odd, "cpu"), rtol=0, atol=0)


@pytest.mark.gpu
def test_a_large_points_per_batch_on_a_large_frame_gpu():
    """256 points in one batch on a 3840x2160 frame, no mask filtered before upsampling: their fp32 full-size logits at
    once would take 8.5 GB; a chunk (16 prompts) takes 0.53 GB, so the peak stays near a few chunks."""
    generator = SamHQAutomaticMaskGenerator(make_model(TINY_CONFIG).cuda(), points_per_side=16, points_per_batch=256, **LOOSE)
    frame = torch.from_numpy(make_photo(2160, 3840, seed=5)).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    records = generator.generate(frame)
    peak = torch.cuda.max_memory_allocated() - before
    assert records
    assert peak < 2.5e9, f"peak {peak / 1e9:.2f} GB"


def test_box_nms_between_records(tiny_model, photo):
    """With box_nms_thresh 0.7: no two records' boxes overlap by more, and every dropped mask
    overlaps a kept, better-scored one by more."""
    every = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=5, **LOOSE).generate(photo)
    kept = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=5, **dict(LOOSE, box_nms_thresh=0.7)).generate(photo)
    assert 0 < len(kept) < len(every)
    kept_boxes = [(xywh_to_xyxy(r["bbox"]), r["predicted_iou"]) for r in kept]
    for (a, _), (b, _) in itertools.combinations(kept_boxes, 2):
        assert box_iou(a, b) <= 0.7
    kept_points = {tuple(r["point_coords"][0]) for r in kept}
    for record in every:
        if tuple(record["point_coords"][0]) not in kept_points:
            box = xywh_to_xyxy(record["bbox"])
            assert any(box_iou(box, k) > 0.7 and score >= record["predicted_iou"] for k, score in kept_boxes)


def test_masks_cut_by_a_crop_edge():
    """Crop [88, 0, 200, 63] of a 200 x 100 image; boxes in crop pixels. A side within 20 px of a crop
    edge that is not also an image edge marks a mask the crop cut."""
    boxes = torch.tensor([[10, 10, 50, 40], [40, 5, 60, 30], [40, 5, 100, 30], [40, 5, 60, 50], [20, 5, 60, 30], [21, 5, 60, 30]])
    cut = SamHQAutomaticMaskGenerator._cut_by_crop(boxes, [88, 0, 200, 63], (100, 200))
    # left side 98 near the crop's 88; top 5 near the crop's AND the image's 0; right 188 near both
    # 200s; bottom 50 near the crop's 63, not the image's 100; left 108 exactly 20 px from 88 (near,
    # as torch.isclose's atol), 109 not
    assert cut.tolist() == [True, False, False, True, True, False]


def test_crop_layers(tiny_model, photo, monkeypatch):
    """One crop layer on a torch image: a record of a crop is the predictor's mask on that crop
    (as its own image) at the point, placed back into the full image. (The tiny model's masks are
    large blobs that the crops cut, which the 20-pixel edge rule, tested above, would drop: the
    rule is switched off here.)"""
    monkeypatch.setattr("samhq_fast.automatic.CROP_EDGE_TOLERANCE", 0.0)
    generator = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=4, crop_n_layers=1, **dict(LOOSE, crop_nms_thresh=1.0))
    records = generator.generate(torch.from_numpy(photo))
    boxes, _ = crop_boxes(200, 300, 1, 512 / 1500)
    as_xywh = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes]
    assert {tuple(r["crop_box"]) for r in records} <= set(map(tuple, as_xywh))
    from_crops = [r for r in records if r["crop_box"] != [0, 0, 300, 200]]
    assert from_crops
    for record in from_crops[:4]:
        x0, y0, w, h = record["crop_box"]
        crop = SamHQPredictor(tiny_model)
        crop.set_image(torch.from_numpy(photo[y0 : y0 + h, x0 : x0 + w]))
        point = np.array(record["point_coords"]) - [x0, y0]
        logits = crop.predict(point_coords=point, point_labels=np.array([1]), return_logits=True)[0][0]
        expected = np.zeros((200, 300), dtype=bool)
        expected[y0 : y0 + h, x0 : x0 + w] = logits > 0
        away = np.zeros((200, 300), dtype=bool)
        away[y0 : y0 + h, x0 : x0 + w] = np.abs(logits) > 1e-4
        np.testing.assert_array_equal(record["segmentation"][away], expected[away])
        assert not record["segmentation"][~np.pad(np.ones((h, w), bool), ((y0, 200 - y0 - h), (x0, 300 - x0 - w)))].any()


def test_output_modes_agree(tiny_model, photo):
    binary = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=3, **LOOSE).generate(photo)
    rle = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=3, output_mode="uncompressed_rle", **LOOSE).generate(photo)
    for b, r in zip(binary, rle):
        assert r["segmentation"]["size"] == [200, 300]
        np.testing.assert_array_equal(rle_to_mask(r["segmentation"]), b["segmentation"])


@pytest.mark.parametrize("min_mask_region_area", [0, 30])
@pytest.mark.parametrize("masks_per_chunk", [1, 2])
def test_binary_masks_decode_in_chunks(tiny_model, photo, monkeypatch, masks_per_chunk, min_mask_region_area):
    """generate decodes its binary masks (for the records, and for the small-region clean-up) a
    bounded number of pixels at a time: the records do not depend on it, and each segmentation is its
    own C-ordered bool [H, W] array."""
    if min_mask_region_area:
        pytest.importorskip("scipy")
    options = dict(LOOSE, points_per_side=3, min_mask_region_area=min_mask_region_area)
    expected = SamHQAutomaticMaskGenerator(tiny_model, **options).generate(photo)
    monkeypatch.setattr("samhq_fast.automatic.DECODE_PIXELS", masks_per_chunk * 200 * 300)
    actual = SamHQAutomaticMaskGenerator(tiny_model, **options).generate(photo)
    assert len(actual) == len(expected) > masks_per_chunk
    for a, e in zip(actual, expected):
        assert a["segmentation"].flags.c_contiguous and a["segmentation"].dtype == np.bool_
        np.testing.assert_array_equal(a["segmentation"], e["segmentation"])
        assert a["area"] == int(a["segmentation"].sum())


def test_min_mask_region_area_cleans_every_mask(tiny_model, photo):
    pytest.importorskip("scipy")
    from scipy import ndimage

    area = 400
    records = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=3, min_mask_region_area=area, **LOOSE).generate(photo)
    assert records
    eight = np.ones((3, 3), dtype=bool)
    for record in records:
        mask = record["segmentation"]
        islands, count = ndimage.label(mask, structure=eight)
        holes, hole_count = ndimage.label(~mask, structure=eight)
        assert count == 1 or np.bincount(islands.ravel())[1:].min() >= area
        assert hole_count == 0 or np.bincount(holes.ravel())[1:].min() >= area
        ys, xs = np.nonzero(mask)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(points_per_side=None), ValueError, "exactly one of points_per_side and point_grids"),
        (dict(point_grids=[point_grid(2)]), ValueError, "exactly one of points_per_side and point_grids"),
        (dict(points_per_side=None, point_grids=[point_grid(2)], crop_n_layers=1), ValueError, "one grid per crop layer (2), got 1"),
        (dict(output_mode="png"), ValueError, "output_mode must be one of"),
        (dict(points_per_batch=0), ValueError, "points_per_batch must be an integer >= 1, got 0"),
        (dict(points_per_batch=2.5), ValueError, "points_per_batch must be an integer >= 1, got 2.5"),
        (dict(crop_n_layers=-1), ValueError, "crop_n_layers must be an integer >= 0, got -1"),
        (dict(points_per_side=1, crop_n_layers=1, crop_n_points_downscale_factor=2), ValueError, "leaves crop layer 1 no points"),
        (dict(points_per_side=None, point_grids=[[[0.1, 0.2, 0.3], [0.5, 0.6, 0.7]]]), ValueError, "point_grids[0] must be a [P, 2] array"),
        (dict(points_per_side=None, point_grids=[np.zeros((0, 2))]), ValueError, "with P >= 1, got shape [0, 2]"),
        (dict(points_per_side=None, point_grids=[[[50.0, 40.0]]]), ValueError, "in [0, 1], not pixels"),
        (dict(crop_n_layers=1, crop_overlap_ratio=2.0), ValueError, "crop_overlap_ratio must be in [0, 1]"),
        (dict(crop_overlap_ratio=-0.1), ValueError, "crop_overlap_ratio must be in [0, 1]"),
        (dict(pred_iou_thresh=float("nan")), ValueError, "pred_iou_thresh must be a finite number, got nan"),
        (dict(box_nms_thresh="0.7"), ValueError, "box_nms_thresh must be a finite number, got '0.7'"),
        (dict(stability_score_offset=-0.5), ValueError, "stability_score_offset must be >= 0"),
        (dict(box_nms_thresh=-0.5), ValueError, "box_nms_thresh must be an IoU in [0, 1] (1 keeps every mask), got -0.5"),
        (dict(crop_nms_thresh=1.5), ValueError, "crop_nms_thresh must be an IoU in [0, 1]"),
        (dict(points_per_side=None, point_grids=[[[0.5, 0.5], [0.1]]]), ValueError, "point_grids[0] is ragged"),
        (dict(points_per_side=None, point_grids=[[[0.5, "0.5"]]]), TypeError, "point_grids[0] must be a numeric array, got strings"),
        (dict(points_per_side=None, point_grids=[[[0.5, float("nan")]]]), ValueError, "point_grids[0] has NaN or infinite values"),
    ],
    ids=["no_points", "both", "grids_per_layer", "output_mode", "batch_0", "batch_float", "negative_layers", "empty_layer_grid",
         "transposed_grid", "empty_grid", "pixel_grid", "overlap_above_1", "overlap_negative", "nan_threshold", "string_threshold",
         "negative_stability_offset", "negative_box_nms", "crop_nms_above_1", "ragged_grid", "string_grid", "nan_grid"],
)
def test_bad_arguments(tiny_model, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SamHQAutomaticMaskGenerator(tiny_model, **kwargs)


def test_numpy_integers_are_accepted(tiny_model):
    """As the original: counts often come from numpy (np.int64 from an array or a config file)."""
    generator = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=np.int64(4), points_per_batch=np.int32(8), crop_n_layers=np.int64(1))
    expected = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=4, points_per_batch=8, crop_n_layers=1)
    assert all(np.array_equal(a, b) for a, b in zip(generator.point_grids, expected.point_grids)) and len(generator.point_grids) == 2


@pytest.mark.parametrize("module, kwargs", [("pycocotools", dict(output_mode="coco_rle")), ("scipy", dict(min_mask_region_area=10))])
def test_optional_dependencies_are_named(tiny_model, monkeypatch, module, kwargs):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ImportError, match=re.escape(f"needs {module}: pip install 'samhq-fast[amg]' (or pip install {module})")):
        SamHQAutomaticMaskGenerator(tiny_model, **kwargs)


@pytest.mark.parametrize("height, width, layers", [(1, 50, 1), (3, 3, 2), (5, 200, 2)])
def test_crop_layers_on_tiny_images_skip_empty_crops(tiny_model, height, width, layers):
    """Deep crop layers of a tiny image have crops 0 pixels wide or high (the original would fail on
    them): they are skipped, the others give records inside the image."""
    boxes, _ = crop_boxes(height, width, layers, 512 / 1500)
    assert any(x1 <= x0 or y1 <= y0 for x0, y0, x1, y1 in boxes)  # the case at hand
    generator = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=2, crop_n_layers=layers, **LOOSE)
    for image in (make_photo(height, width, seed=4), torch.from_numpy(make_photo(height, width, seed=4))[None]):  # also a batch of one
        records = generator.generate(image)
        assert records and all(r["segmentation"].shape == (height, width) for r in records)
        assert all(w > 0 and h > 0 for _, _, w, h in (r["crop_box"] for r in records))


def test_records_are_plain_json(tiny_model, photo):
    records = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=2, output_mode="uncompressed_rle", **LOOSE).generate(torch.from_numpy(photo))
    assert records and json.loads(json.dumps(records)) == records


def test_bad_model_and_image(tiny_model):
    with pytest.raises(TypeError, match="SamHQ"):
        SamHQAutomaticMaskGenerator(object())
    with pytest.raises(TypeError, match="numpy array, PIL image or torch tensor"):
        SamHQAutomaticMaskGenerator(tiny_model, points_per_side=2).generate("photo.jpg")
    with pytest.raises(ValueError, match=re.escape("generate takes one image, got a batch of shape [2, 20, 30, 3]")):
        SamHQAutomaticMaskGenerator(tiny_model, points_per_side=2).generate(torch.zeros(2, 20, 30, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="multimask_output must be True or False, got 'False'"):
        SamHQAutomaticMaskGenerator(tiny_model, points_per_side=2).generate(np.zeros((20, 30, 3), np.uint8), multimask_output="False")


def _assert_same_records(got: list[dict], expected: list[dict], score_tol: float, pixel_tol: float = 1e-3) -> None:
    """The same grid points, scores within score_tol, masks equal but for a fraction pixel_tol of
    their pixels (at the threshold, where the two paths' rounding may differ)."""
    by_point = {tuple(r["point_coords"][0]): r for r in expected}
    assert sorted(tuple(r["point_coords"][0]) for r in got) == sorted(by_point)
    for g in got:
        e = by_point[tuple(g["point_coords"][0])]
        assert abs(g["predicted_iou"] - e["predicted_iou"]) <= score_tol
        assert (g["segmentation"] != e["segmentation"]).mean() <= pixel_tol


def test_fused_decoder_gives_the_eager_records(tiny_model, photo):
    """The fused backend's padded decoder (here uncompiled, to stay fast on the CPU; the compiled one
    is checked against it in test_decoding.py) behind the generator: the eager backend's records."""
    fused_model = copy.deepcopy(tiny_model)
    fused_model.backend = "fused"  # the decoder path (the fused encoder is checked in test_fused_backend.py)
    generator = SamHQAutomaticMaskGenerator(fused_model, points_per_side=4, points_per_batch=6, **LOOSE)
    generator.predictor._prompt_decoder = PromptDecoder(fused_model, compile=False)
    expected = SamHQAutomaticMaskGenerator(tiny_model, points_per_side=4, points_per_batch=6, **LOOSE).generate(photo)
    _assert_same_records(generator.generate(photo), expected, score_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# Geometry and thresholds, against the original generator: both driven by one synthetic mask model
# ---------------------------------------------------------------------------------------------
# The tiny model's masks cover most of each crop, so the records kept come from crops at the image's
# origin, where an uncrop offset of the wrong sign or axis changes nothing. A disk of logits around
# each prompt point keeps every mask inside its crop, so every crop contributes records.


def disk_masks(coords, original_size, input_size, integer_levels=False):
    """A stand-in for predict_torch(..., return_logits=True): coords [N, 1, 2] in the input frame ->
    (logits [N, 1, H, W] of a ~6-pixel disk around each point, IoU scores [N, 1], None).
    integer_levels: integer logits and 2-decimal scores, some negative, so thresholds can tie exactly."""
    (height, width), (input_h, input_w) = original_size, input_size
    # our generator hands float32 grid points over, the original float64: compare from the same float32
    points = coords[:, 0].float().double() * torch.tensor([width / input_w, height / input_h], dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    distance = ((xx - points[:, 0, None, None]) ** 2 + (yy - points[:, 1, None, None]) ** 2).sqrt()
    logits = (3.0 - distance / 2 + 0.013 * points[:, 0, None, None]).float()
    scores = (0.5 + 0.4 * torch.frac(0.37 * points[:, 0] + 0.61 * points[:, 1])).float()
    if integer_levels:
        logits, scores = logits.round(), (scores - 0.8).round(decimals=2)
    return logits[:, None], scores[:, None], None


def drive_with_disks(predictor, integer_levels=False) -> None:
    """Replaces a predictor's image encoding and decoding (ours or the original's) with disk_masks."""
    def set_image(image, *args, **kwargs):
        predictor.original_size = tuple(image.shape[:2])
        predictor.input_size = preprocess_shape(*image.shape[:2], 256)

    def disks(coords):
        return disk_masks(coords, predictor.original_size, predictor.input_size, integer_levels)

    predictor.set_image = set_image
    predictor.reset_image = lambda: None
    predictor.predict_torch = lambda coords, labels, *args, **kwargs: disks(coords)  # the original's generator
    # Ours decodes low-res logits, then upsamples them a few prompts at a time: here the prompt
    # points themselves [N, 1, 2] stand in for the low-res logits, and "upsampling" draws their disks.
    predictor._decode_low_res = lambda converted, *args: {i: (prompts[0], disks(prompts[0])[1]) for i, prompts in converted.items()}
    predictor._masks = lambda low_res, input_size, original_size, return_logits: disks(low_res)[0]


def run_both(tiny_model, image, integer_levels=False, **settings) -> tuple[list[dict], list[dict]]:
    """(our records, the original generator's records) for one image under the same settings."""
    original = import_original()
    # all the original generator reads of its model
    stub_model = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=256), mask_threshold=0.0, device=torch.device("cpu"))
    ours, theirs = SamHQAutomaticMaskGenerator(tiny_model, **settings), original.SamAutomaticMaskGenerator(stub_model, **settings)
    drive_with_disks(ours.predictor, integer_levels)
    drive_with_disks(theirs.predictor, integer_levels)
    return ours.generate(image), theirs.generate(image)


@pytest.mark.parametrize(
    "settings",
    [
        dict(crop_n_layers=1),
        dict(crop_n_layers=2, crop_n_points_downscale_factor=2, crop_nms_thresh=0.3, box_nms_thresh=0.6),
        dict(crop_n_layers=1, min_mask_region_area=30, box_nms_thresh=0.5, crop_nms_thresh=0.9),
        dict(crop_n_layers=1, output_mode="coco_rle"),
    ],
    ids=["one_layer", "two_layers_downscaled", "small_regions", "coco_rle"],
)
def test_crops_match_the_original_record_for_record(tiny_model, settings):
    """Crop grids, uncropping of boxes / points / masks, NMS within and across crops (smaller crops
    preferred), clean-up and output formats: the original's records, in its order."""
    if settings.get("min_mask_region_area") or settings.get("output_mode") == "coco_rle":
        pytest.importorskip("scipy")
        pytest.importorskip("pycocotools")
    image = make_photo(150, 223, seed=1)
    got, expected = run_both(tiny_model, image, points_per_side=12, points_per_batch=17, pred_iou_thresh=0.0,
                             stability_score_thresh=0.0, stability_score_offset=0.05, **settings)
    assert len({tuple(r["crop_box"]) for r in expected if r["crop_box"][:2] != [0, 0]}) >= 2  # crops off the origin count
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g["crop_box"], g["bbox"], g["area"]) == (e["crop_box"], e["bbox"], e["area"])
        np.testing.assert_allclose(g["point_coords"], e["point_coords"])
        assert g["predicted_iou"] == pytest.approx(e["predicted_iou"])
        assert g["stability_score"] == pytest.approx(e["stability_score"])
        if isinstance(e["segmentation"], np.ndarray):
            np.testing.assert_array_equal(g["segmentation"], e["segmentation"])
        else:
            assert g["segmentation"] == e["segmentation"]


def test_thresholds_at_exact_ties_match_the_original(tiny_model):
    """Integer logits (ties with threshold +- offset in the stability score) and 2-decimal IoU scores,
    some negative (kept by the original at pred_iou_thresh 0), with each threshold set to a value
    that occurs: every > / >= of the original shows."""
    image = make_photo(150, 223, seed=1)
    common = dict(points_per_side=12, points_per_batch=17, stability_score_offset=1.0, box_nms_thresh=1.0, integer_levels=True)
    every, _ = run_both(tiny_model, image, pred_iou_thresh=0.0, stability_score_thresh=0.0, **common)
    ious = sorted(r["predicted_iou"] for r in every)
    stabilities = sorted(r["stability_score"] for r in every)
    assert ious[0] < 0 < ious[-len(ious) // 10]
    # one threshold at a time: a tie in one filter can hide behind the other
    for thresholds in (dict(pred_iou_thresh=0.0, stability_score_thresh=0.0),
                       dict(pred_iou_thresh=ious[-len(ious) // 10], stability_score_thresh=0.0),
                       dict(pred_iou_thresh=0.0, stability_score_thresh=stabilities[len(stabilities) // 2])):
        got, expected = run_both(tiny_model, image, **thresholds, **common)
        assert [r["point_coords"] for r in got] == [r["point_coords"] for r in expected]
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g["segmentation"], e["segmentation"])
            assert g["stability_score"] == e["stability_score"]


@pytest.mark.gpu
def test_generator_on_the_gpu(tiny_checkpoints, photo):
    """The fused CUDA model (Triton encoder, compiled and graphed decoder) against the eager CPU one."""
    options = dict(points_per_side=6, points_per_batch=16, **LOOSE)
    cuda = samhq_fast.load(tiny_checkpoints["pth"], device="cuda", backend="fused")
    cpu = samhq_fast.load(tiny_checkpoints["pth"], device="cpu", backend="eager")
    got = SamHQAutomaticMaskGenerator(cuda, **options).generate(torch.from_numpy(photo).cuda())
    expected = SamHQAutomaticMaskGenerator(cpu, **options).generate(photo)
    # the CUDA path resizes on the GPU (within 1 level of PIL) and runs TF32-free fp32 kernels
    _assert_same_records(got, expected, score_tol=5e-4, pixel_tol=1e-2)
