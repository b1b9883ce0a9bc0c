"""SamHQPredictor: the original SamPredictor's pipeline, its batched extension, its frames and its errors.

The oracle is `ReferencePredictor` below, an independent re-implementation of the original
segment_anything_hq SamPredictor written from the project's shared/REFERENCE.md ("Pre- and
post-processing" and "HQ mask decoder"): it shares only the model's submodules (image encoder,
prompt encoder, `mask_decoder.predict_masks` giving all 5 masks and 4 IoU scores) with the code
under test, and redoes everything around them itself: the PIL resize with int(x * scale + 0.5)
rounding, normalization and padding, the HQ features, the prompt scaling (x by new_w / W, y by
new_h / H), the mask selection rule and the two-step bilinear post-processing.

All tests use the tiny random-weight model from conftest (256-pixel input, a 16x16 embedding grid,
so low-res logits are 64x64). Everything is fp32 on CPU and the reference runs the same kernels
in the same order, so logits agree to ~1e-6 of their scale; masks may only differ at pixels whose
logit is within 1e-4 of the 0 threshold.
"""

import copy
import re
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_CONFIG, make_model
from samhq_fast import SamHQPredictor
from samhq_fast import predictor as predictor_module
from samhq_fast.modeling import sam_hq
from samhq_fast.predictor import POINT_MARGIN, ImageNotSetError, as_finite_array

S = TINY_CONFIG.img_size  # 256: model input side
G = TINY_CONFIG.embedding_size  # 16: embedding grid
LOW = 4 * G  # 64: low-res logits side
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

# (H, W) of the test photos. 200x300 -> 171x256 (non-square, landscape); 330x180 -> 256x140
# (portrait, 139.64 needs the +0.5 rounding); 103x300 -> 88x256 (87.89 needs the rounding too).
IMAGE_SIZES = {"landscape_200x300": (200, 300), "portrait_330x180": (330, 180), "rounding_103x300": (103, 300)}

LOGIT_REL_TOL = 1e-5  # of the logits' max-abs value
SCORE_TOL = 1e-5
MAX_TIE_PIXELS = 5
TIE_LOGIT = 1e-4


def make_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic synthetic RGB photo: colour gradients, a disc, a rectangle and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    yy, xx = yy / height, xx / width
    image = np.stack([40 + 180 * xx, 60 + 150 * yy, 200 - 120 * xx * yy], axis=-1)
    image[(xx - 0.4) ** 2 + (yy - 0.5) ** 2 < 0.05] = (230, 40, 30)
    image[(xx > 0.65) & (xx < 0.9) & (yy > 0.2) & (yy < 0.6)] = (20, 90, 220)
    image += rng.normal(0, 8, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The independent reference: the original SamPredictor pipeline for ONE prompt
# ---------------------------------------------------------------------------------------------


def reference_postprocess(low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
    """REFERENCE.md: bilinear (align_corners=False) 4G -> S, crop to the resized size, bilinear to the original size."""
    up = F.interpolate(low_res, (S, S), mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    return F.interpolate(up, tuple(original_size), mode="bilinear", align_corners=False)


class ReferencePredictor:
    """The original segment_anything_hq SamPredictor + MaskDecoderHQ selection, for one prompt."""

    def __init__(self, model, image: np.ndarray):
        self.model = model
        height, width = image.shape[:2]
        self.original_size = (height, width)
        scale = S / max(height, width)
        self.input_size = (int(height * scale + 0.5), int(width * scale + 0.5))
        new_h, new_w = self.input_size
        resized = np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        x = torch.from_numpy(resized).permute(2, 0, 1)[None].float()
        x = F.pad((x - MEAN) / STD, (0, S - new_w, 0, S - new_h))  # zero pad bottom / right
        with torch.no_grad():
            self.embedding, global_outputs = model.image_encoder(x)
            dec = model.mask_decoder
            # hq_feat = embedding_encoder(img_emb) + compress_vit_feat(first global block as NCHW)
            self.hq_feat = dec.embedding_encoder(self.embedding) + dec.compress_vit_feat(global_outputs[0].permute(0, 3, 1, 2))

    def scale(self, coords) -> np.ndarray:
        """Original-frame (x, y) -> input frame: x by new_w / W, y by new_h / H (apply_coords)."""
        (height, width), (new_h, new_w) = self.original_size, self.input_size
        coords = np.array(coords, dtype=np.float64).reshape(-1, 2)
        return coords * np.array([new_w / width, new_h / height])

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True, hq_token_only=False):
        """-> (logits [1, H, W] float, score [1], low_res_logits [1, 4G, 4G])."""
        points = boxes = masks = None
        if point_coords is not None:
            points = (
                torch.as_tensor(self.scale(point_coords), dtype=torch.float32)[None],
                torch.as_tensor(np.asarray(point_labels), dtype=torch.int64)[None],
            )
        if box is not None:
            boxes = torch.as_tensor(self.scale(box).reshape(1, 4), dtype=torch.float32)
        if mask_input is not None:
            masks = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32)[None]
        with torch.no_grad():
            sparse, dense = self.model.prompt_encoder(points, boxes, masks)
            pe = self.model.prompt_encoder.get_dense_pe()
            all_masks, iou = self.model.mask_decoder.predict_masks(self.embedding, pe, sparse, dense, self.hq_feat)
        all_masks, iou = all_masks[0], iou[0]  # [5, 4G, 4G], [4]
        token = 1 + int(torch.argmax(iou[1:4])) if multimask_output else 0  # best multimask token, or token 0
        self.last_token = token
        low_res = all_masks[4] if hq_token_only else all_masks[token] + all_masks[4]
        logits = reference_postprocess(low_res[None, None], self.input_size, self.original_size)[0]
        return logits.numpy(), iou[token].reshape(1).numpy(), low_res[None].numpy()


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, rel: float = LOGIT_REL_TOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    atol = rel * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=atol)


def assert_masks_match(masks: np.ndarray, expected_logits: np.ndarray) -> None:
    """Equal to expected_logits > 0, except a handful of pixels whose logit ties with the threshold."""
    assert masks.dtype == np.bool_ and masks.shape == expected_logits.shape
    differ = masks != (expected_logits > 0)
    assert differ.sum() <= MAX_TIE_PIXELS, f"{differ.sum()} mask pixels differ"
    assert np.all(np.abs(expected_logits[differ]) < TIE_LOGIT), "a mask pixel differs away from the threshold"


# ---------------------------------------------------------------------------------------------
# Fixtures: one predictor and one reference per test photo, built once per module
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """The tiny model's ops are too small to gain from intra-op threads, and on a busy 2-core machine
    OpenMP's spinning barriers made each predict ~1 s instead of ~15 ms. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> dict:
    return {name: make_photo(*size, seed=i) for i, (name, size) in enumerate(IMAGE_SIZES.items())}


@pytest.fixture(scope="module")
def prepared(tiny_model, photos):
    """name -> (SamHQPredictor with the photo set, ReferencePredictor), built lazily. Tests must not
    call set_image / reset_image on these shared predictors (they make their own for that)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            predictor = SamHQPredictor(tiny_model)
            predictor.set_image(photos[name])
            cache[name] = (predictor, ReferencePredictor(tiny_model, photos[name]))
        return cache[name]

    return get


def make_prompt(kind: str, height: int, width: int, reference: ReferencePredictor) -> dict:
    """Prompt kwargs in the original frame, placed relative to the image size."""

    def pts(*fractions):
        return np.array([[fx * width, fy * height] for fx, fy in fractions])

    box = np.array([0.2 * width, 0.25 * height, 0.8 * width, 0.7 * height])
    if kind == "one_positive_point":
        return dict(point_coords=pts((0.41, 0.52)), point_labels=np.array([1]))
    if kind == "positive_and_negative_points":
        return dict(point_coords=pts((0.3, 0.4), (0.77, 0.35), (0.55, 0.8)), point_labels=np.array([1, 0, 1]))
    if kind == "ignored_point":  # label -1: the point's position encoding is replaced by not_a_point_embed
        return dict(point_coords=pts((0.4, 0.5), (0.8, 0.8)), point_labels=np.array([1, -1]))
    if kind == "points_on_and_just_outside_the_border":
        coords = np.array([[-3.0, 0.5 * height], [width - 1.0, height - 1.0], [width + 2.5, 0.0]])
        return dict(point_coords=coords, point_labels=np.array([1, 0, 1]))
    if kind == "box":
        return dict(box=box)
    if kind == "box_reaching_past_the_border":  # an object leaving the frame: corners beyond POINT_MARGIN
        return dict(box=np.array([0.6 * width, -0.3 * height, 1.4 * width, 0.5 * height]))
    if kind == "box_and_points":
        return dict(box=box, point_coords=pts((0.5, 0.5), (0.3, 0.6)), point_labels=np.array([1, 0]))
    # mask_input: a previous low_res_logits fed back, as in the original notebooks
    previous = reference.predict(point_coords=pts((0.41, 0.52)), point_labels=np.array([1]))[2]
    if kind == "mask_input_and_point":
        return dict(point_coords=pts((0.6, 0.45)), point_labels=np.array([1]), mask_input=previous)
    if kind == "mask_input_only":
        return dict(mask_input=previous)
    raise ValueError(kind)


PROMPT_KINDS = [
    "one_positive_point",
    "positive_and_negative_points",
    "ignored_point",
    "points_on_and_just_outside_the_border",
    "box",
    "box_reaching_past_the_border",
    "box_and_points",
    "mask_input_and_point",
    "mask_input_only",
]


# ---------------------------------------------------------------------------------------------
# 1. One prompt: the predictor equals the original pipeline
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq_token_only", [False, True], ids=["sam_plus_hq", "hq_only"])
@pytest.mark.parametrize("multimask_output", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("kind", PROMPT_KINDS)
@pytest.mark.parametrize("image", list(IMAGE_SIZES))
def test_one_prompt_matches_reference_pipeline(prepared, image, kind, multimask_output, hq_token_only):
    predictor, reference = prepared(image)
    height, width = IMAGE_SIZES[image]
    prompt = make_prompt(kind, height, width, reference)
    flags = dict(multimask_output=multimask_output, hq_token_only=hq_token_only)

    masks, scores, low_res = predictor.predict(**prompt, **flags)
    ref_logits, ref_score, ref_low_res = reference.predict(**prompt, **flags)

    assert masks.shape == (1, height, width) and masks.dtype == np.bool_
    assert scores.shape == (1,) and scores.dtype == np.float32
    assert low_res.shape == (1, LOW, LOW) and low_res.dtype == np.float32
    assert_logits_close(low_res, ref_low_res)
    np.testing.assert_allclose(scores, ref_score, rtol=0, atol=SCORE_TOL)
    assert_masks_match(masks, ref_logits)


def test_a_logit_of_exactly_the_threshold_is_background(prepared, monkeypatch):
    """mask = logits > 0 (REFERENCE.md), strictly: a pixel whose logit is exactly 0 is off. (Real
    logits seldom land on 0 exactly, so the parity tests allow ties either way.)"""
    predictor, _ = prepared(next(iter(IMAGE_SIZES)))
    low_res = 4 * predictor.model.config.embedding_size
    monkeypatch.setattr(predictor_module, "decode_eager", lambda *args: (torch.zeros(1, 1, low_res, low_res), torch.ones(1, 1)))
    masks, _, logits = predictor.predict(box=np.array([10, 10, 50, 50]), multimask_output=False)
    assert masks.shape == (1, *predictor.original_size) and (logits == 0).all() and not masks.any()


def test_selection_flags_change_the_output(prepared):
    """Guard against a vacuous parity test: multimask (best of tokens 1-3 + HQ), single (token 0 + HQ)
    and hq_token_only (HQ alone) give three different masks with these weights, so the test above
    would notice a predictor that ignored a flag. hq_token_only ignores multimask_output for the
    mask (the HQ token is the same) but not for the score (the selected SAM token's IoU)."""
    predictor, reference = prepared("landscape_200x300")
    prompt = make_prompt("positive_and_negative_points", 200, 300, reference)
    multi, single, hq_multi, hq_single = (
        predictor.predict(**prompt, multimask_output=m, hq_token_only=h) for m, h in ((True, False), (False, False), (True, True), (False, True))
    )
    for a, b in ((multi, single), (multi, hq_multi), (single, hq_multi)):
        assert not np.allclose(a[2], b[2], atol=1e-3)
    np.testing.assert_array_equal(hq_multi[2], hq_single[2])
    np.testing.assert_array_equal(hq_multi[1], multi[1])
    np.testing.assert_array_equal(hq_single[1], single[1])
    assert hq_multi[1] != hq_single[1]


@pytest.fixture(scope="module")
def varied_selection(photos):
    """A second random model (seed 1) whose best multimask token varies with the prompt. With the
    seed-0 tiny_model the IoU head picks the same token for every prompt tried, which would leave
    the per-prompt selection (argmax of iou[1:4], batched too) untested."""
    model = make_model(TINY_CONFIG, seed=1)
    image = photos["portrait_330x180"]
    predictor = SamHQPredictor(model)
    predictor.set_image(image)
    return predictor, ReferencePredictor(model, image)


def test_multimask_picks_the_best_token_per_prompt(varied_selection):
    predictor, reference = varied_selection
    height, width = IMAGE_SIZES["portrait_330x180"]
    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, 1, (24, 2, 2)), axis=1) * [width, height]  # [box, (top-left, bottom-right), (x, y)]
    boxes = corners.reshape(24, 4) + [0, 0, 1, 1]  # never empty
    expected, tokens = [], []
    for box in boxes:
        expected.append(reference.predict(box=box))
        tokens.append(reference.last_token)
    assert set(tokens) == {1, 2, 3}, "the prompts must exercise all three multimask tokens"

    masks, scores, low_res = predictor.predict(box=boxes)  # all 24 at once: per-prompt selection
    for i, (ref_logits, ref_score, ref_low_res) in enumerate(expected):
        assert_logits_close(low_res[i], ref_low_res)
        np.testing.assert_allclose(scores[i], ref_score, rtol=0, atol=SCORE_TOL)
        assert_masks_match(masks[i], ref_logits)
    for token in (1, 2, 3):  # and one prompt at a time
        i = tokens.index(token)
        one_masks, one_scores, one_low_res = predictor.predict(box=boxes[i])
        assert_logits_close(one_low_res, expected[i][2])
        np.testing.assert_allclose(one_scores, expected[i][1], rtol=0, atol=SCORE_TOL)
        assert_masks_match(one_masks, expected[i][0])


@pytest.mark.parametrize("image", list(IMAGE_SIZES))
def test_input_size_and_embedding_match_reference(prepared, image):
    predictor, reference = prepared(image)
    assert predictor.original_size == IMAGE_SIZES[image]
    assert predictor.input_size == reference.input_size
    embedding = predictor.get_image_embedding()
    assert embedding.shape == (1, 256, G, G)
    torch.testing.assert_close(embedding, reference.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predictor.hq_features, reference.hq_feat, rtol=1e-5, atol=1e-5)


def test_rounded_input_sizes_are_the_hand_derived_ones(prepared):
    # int(x * scale + 0.5): plain int() would give 139 and 87
    assert prepared("landscape_200x300")[0].input_size == (171, 256)
    assert prepared("portrait_330x180")[0].input_size == (256, 140)
    assert prepared("rounding_103x300")[0].input_size == (88, 256)


# ---------------------------------------------------------------------------------------------
# 2. Several prompts at once equal the same prompts one by one
# ---------------------------------------------------------------------------------------------


def make_batched_prompt(kind: str, height: int, width: int, predictor: SamHQPredictor) -> tuple[dict, list[dict]]:
    """-> (batched kwargs for N=3 prompts, the same 3 prompts as single-prompt kwargs)."""
    boxes = np.array([[0.1, 0.1, 0.5, 0.6], [0.4, 0.2, 0.95, 0.9], [0.3, 0.3, 0.7, 0.5]]) * [width, height, width, height]
    points = np.array([[[0.3, 0.3], [0.6, 0.7]], [[0.8, 0.2], [0.1, 0.9]], [[0.5, 0.5], [0.5, 0.1]]]) * [width, height]
    labels = np.array([[1, 0], [1, 1], [1, -1]])
    batched = {
        "boxes": lambda: dict(box=boxes),
        "point_sets": lambda: dict(point_coords=points, point_labels=labels),
        "boxes_and_points": lambda: dict(box=boxes, point_coords=points[:, :1], point_labels=np.ones((3, 1))),
        # previous low-res logits [3, 1, 4G, 4G] fed back, one per prompt
        "mask_inputs": lambda: dict(mask_input=predictor.predict(point_coords=points, point_labels=labels)[2]),
        "mask_inputs_and_boxes": lambda: dict(mask_input=predictor.predict(point_coords=points, point_labels=labels)[2], box=boxes),
    }[kind]()
    one_by_one = [{k: v[i] for k, v in batched.items()} for i in range(3)]
    return batched, one_by_one


@pytest.mark.parametrize(
    "kind, multimask_output",
    [
        ("boxes", True),
        ("point_sets", True),
        ("point_sets", False),
        ("boxes_and_points", True),
        ("mask_inputs", False),
        ("mask_inputs_and_boxes", True),
    ],
)
def test_batched_prompts_equal_one_by_one(prepared, kind, multimask_output):
    """Each row of a batched call equals the single-prompt call (itself checked against the
    original pipeline above); per-prompt selection of the best multimask token included."""
    predictor, _ = prepared("portrait_330x180")
    height, width = IMAGE_SIZES["portrait_330x180"]
    batched, singles = make_batched_prompt(kind, height, width, predictor)

    masks, scores, low_res = predictor.predict(**batched, multimask_output=multimask_output)
    assert masks.shape == (3, 1, height, width) and masks.dtype == np.bool_
    assert scores.shape == (3, 1) and scores.dtype == np.float32
    assert low_res.shape == (3, 1, LOW, LOW) and low_res.dtype == np.float32

    for i, single in enumerate(singles):
        one_logits, one_scores, one_low_res = predictor.predict(**single, multimask_output=multimask_output, return_logits=True)
        assert_logits_close(low_res[i], one_low_res)
        np.testing.assert_allclose(scores[i], one_scores, rtol=0, atol=SCORE_TOL)
        assert_masks_match(masks[i], one_logits)
    # the three prompts are really different (the comparison above is not vacuous)
    assert not np.allclose(low_res[0], low_res[1], atol=1e-3)


def test_single_prompt_shapes_batched_or_not(prepared):
    """box [4] and box [1, 4] are ONE prompt (unbatched output, as the notebooks' box[None, :]);
    point_coords [1, K, 2] is an explicit batch of one (batched output)."""
    predictor, _ = prepared("landscape_200x300")
    box = np.array([30.0, 40.0, 250.0, 160.0])
    flat = predictor.predict(box=box)
    row = predictor.predict(box=box[None, :])
    for a, b in zip(flat, row):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert flat[0].shape == (1, 200, 300) and flat[1].shape == (1,) and flat[2].shape == (1, LOW, LOW)

    point, label = np.array([[120.0, 80.0]]), np.array([1])
    unbatched = predictor.predict(point_coords=point, point_labels=label)
    batched = predictor.predict(point_coords=point[None], point_labels=label[None])
    assert [o.shape for o in batched] == [(1, 1, 200, 300), (1, 1), (1, 1, LOW, LOW)]
    for a, b in zip(unbatched, batched):
        np.testing.assert_array_equal(a, b[0])


def test_mask_input_batch_of_one_keeps_the_prompt_axis(prepared):
    """mask_input [1, 4G, 4G] is ONE prompt (unbatched output); [1, 1, 4G, 4G] is an explicit batch
    of one (batched output, as point_coords [1, K, 2]), alone or with a box [4]; the values agree."""
    predictor, _ = prepared("landscape_200x300")
    previous = predictor.predict(point_coords=np.array([[120.0, 80.0]]), point_labels=np.array([1]))[2]  # [1, 4G, 4G]
    box = np.array([30.0, 40.0, 250.0, 160.0])
    for extra in ({}, dict(box=box)):
        unbatched = predictor.predict(mask_input=previous, **extra)
        batched = predictor.predict(mask_input=previous[None], **extra)
        assert [o.shape for o in unbatched] == [(1, 200, 300), (1,), (1, LOW, LOW)]
        assert [o.shape for o in batched] == [(1, 1, 200, 300), (1, 1), (1, 1, LOW, LOW)]
        for a, b in zip(unbatched, batched):
            np.testing.assert_array_equal(a, b[0])


def test_prompts_accept_lists_and_tensors(prepared):
    predictor, _ = prepared("landscape_200x300")
    expected = predictor.predict(point_coords=np.array([[120.0, 80.0]]), point_labels=np.array([1]), box=np.array([30, 40, 250, 160]))
    for coords, labels, box in [
        ([[120, 80]], [1], [30, 40, 250, 160]),
        (torch.tensor([[120.0, 80.0]]), torch.tensor([1]), torch.tensor([30.0, 40.0, 250.0, 160.0])),
        # bfloat16 (numpy has none; these values are exact in it)
        (torch.tensor([[120.0, 80.0]], dtype=torch.bfloat16), torch.tensor([1]), torch.tensor([30.0, 40.0, 250.0, 160.0], dtype=torch.bfloat16)),
    ]:
        out = predictor.predict(point_coords=coords, point_labels=labels, box=box)
        for a, b in zip(out, expected):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# 3. Coordinate frames and post-processing
# ---------------------------------------------------------------------------------------------


def test_predict_scales_prompts_with_hand_derived_factors(prepared):
    """200x300 -> 171x256: x is scaled by 256/300 but y by 171/200 (= 0.855, not 0.8533), so a
    predict() in the original frame equals predict_torch() with these hand-computed input-frame values."""
    predictor, _ = prepared("landscape_200x300")
    masks, scores, low_res = predictor.predict(
        point_coords=np.array([[150.0, 100.0], [60.0, 20.0]]), point_labels=np.array([1, 0]), box=np.array([30.0, 40.0, 270.0, 160.0])
    )
    fx, fy = 256 / 300, 0.855
    t_masks, t_scores, t_low_res = predictor.predict_torch(
        torch.tensor([[[128.0, 85.5], [60 * fx, 20 * fy]]]),
        torch.tensor([[1, 0]]),
        torch.tensor([[30 * fx, 40 * fy, 270 * fx, 160 * fy]]),
    )
    assert t_masks.shape == (1, 1, 200, 300) and t_scores.shape == (1, 1) and t_low_res.shape == (1, 1, LOW, LOW)
    assert_logits_close(low_res, t_low_res[0].numpy())
    np.testing.assert_allclose(scores, t_scores[0].numpy(), rtol=0, atol=SCORE_TOL)
    assert_masks_match(masks, reference_postprocess(t_low_res, (171, 256), (200, 300))[0].numpy())


@pytest.mark.parametrize(
    "size, input_size",
    [((200, 300), (171, 256)), ((330, 180), (256, 140))],
    ids=["landscape", "portrait"],
)
def test_prediction_depends_only_on_the_input_frame(tiny_model, size, input_size):
    """The same resized input declared as an H x W photo or as its 2H x 2W version (both resize to
    the same input size), prompted at (x, y) and (2x, 2y): the low-res logits and scores are
    identical, and the 2x masks are the same logits post-processed to the 2x size."""
    height, width = size
    assert input_size == (int(height * S / max(size) + 0.5), int(width * S / max(size) + 0.5))
    assert input_size == (int(2 * height * S / (2 * max(size)) + 0.5), int(2 * width * S / (2 * max(size)) + 0.5))
    resized = np.array(Image.fromarray(make_photo(height, width, seed=5)).resize(input_size[::-1], Image.BILINEAR))
    tensor = torch.from_numpy(resized).permute(2, 0, 1)[None].float()

    one, two = SamHQPredictor(tiny_model), SamHQPredictor(tiny_model)
    one.set_torch_image(tensor, (height, width))
    two.set_torch_image(tensor, (2 * height, 2 * width))
    points, labels = np.array([[0.37 * width, 0.61 * height], [0.8 * width, 0.2 * height]]), np.array([1, 0])
    box = np.array([0.1 * width, 0.2 * height, 0.7 * width, 0.9 * height])

    masks1, scores1, low1 = one.predict(point_coords=points, point_labels=labels, box=box)
    masks2, scores2, low2 = two.predict(point_coords=2 * points, point_labels=labels, box=2 * box)
    assert masks1.shape == (1, height, width) and masks2.shape == (1, 2 * height, 2 * width)
    assert_logits_close(low2, low1)
    np.testing.assert_allclose(scores2, scores1, rtol=0, atol=SCORE_TOL)
    assert_masks_match(masks2, reference_postprocess(torch.from_numpy(low1)[None], input_size, (2 * height, 2 * width))[0].numpy())


@pytest.mark.parametrize(
    "transformed, original_size, message",
    [
        (torch.zeros(3, 170, 256), (200, 300), "must be a [1, 3, h, w] tensor, got [3, 170, 256]"),
        (torch.zeros(1, 3, 170, 250), (200, 300), "longest side resized to 256, got [170, 250]"),
        (torch.zeros(1, 3, 170, 256), (300, 200), "(H, W) = (300, 200) resizes to (256, 171), not to transformed_image's (170, 256)"),  # swapped
        (torch.zeros(1, 3, 170, 256), (200, 300, 3), "must be (H, W), two positive integers, got (200, 300, 3)"),  # image.shape
        (torch.zeros(1, 3, 170, 256), (200.5, 300), "two positive integers"),
        (torch.zeros(1, 3, 170, 256), (0, 0), "two positive integers"),
        (torch.zeros(1, 3, 170, 256), (True, True), "two positive integers"),  # bool is an int subclass, not a size
        # a 1 x 2000 image resizes to 0 x 256 (set_image refuses it): no image to predict on
        (torch.zeros(1, 3, 0, 256), (1, 2000), "image of 2000x1 (width x height) is too elongated"),
    ],
    ids=["no_batch_axis", "not_resized", "swapped_size", "shape_with_channels", "float_size", "zero_size", "bool_size", "zero_pixels_high"],
)
def test_set_torch_image_rejects_mismatched_input(tiny_model, transformed, original_size, message):
    """The original takes any original_image_size and returns masks of a wrong shape, or fails later."""
    predictor = SamHQPredictor(tiny_model)
    with pytest.raises(ValueError, match=re.escape(message)):
        predictor.set_torch_image(transformed, original_size)
    assert not predictor.is_image_set


@pytest.mark.parametrize("batched", [False, True], ids=["one_prompt", "three_prompts"])
def test_return_logits_are_the_upsampled_low_res_logits(prepared, batched):
    predictor, _ = prepared("rounding_103x300")
    points = np.array([[[40.0, 50.0]], [[200.0, 30.0]], [[150.0, 90.0]]])
    labels = np.ones((3, 1))
    prompt = dict(point_coords=points, point_labels=labels) if batched else dict(point_coords=points[0], point_labels=labels[0])

    logits, scores, low_res = predictor.predict(**prompt, return_logits=True)
    masks, scores_b, low_res_b = predictor.predict(**prompt)
    assert logits.dtype == np.float32 and logits.shape == masks.shape
    np.testing.assert_array_equal(logits > 0, masks)  # threshold 0, same call otherwise
    np.testing.assert_array_equal(scores, scores_b)
    np.testing.assert_array_equal(low_res, low_res_b)

    low = torch.from_numpy(low_res if batched else low_res[None])  # [P, 1, 4G, 4G]
    expected = reference_postprocess(low, (88, 256), (103, 300)).numpy()
    assert_logits_close(logits, expected if batched else expected[0])


def test_bool_masks_are_upsampled_a_few_prompts_at_a_time(prepared, tiny_model, monkeypatch):
    """Bool masks are upsampled and thresholded in chunks of prompts (MASK_CHUNK_PIXELS, here two
    prompts' worth: 5 prompts go as 2 + 2 + 1), so the fp32 full-size logits of all prompts never
    exist at once; each mask is still its return_logits logits > 0. The same for the model's forward."""
    predictor, _ = prepared("rounding_103x300")
    monkeypatch.setattr(sam_hq, "MASK_CHUNK_PIXELS", 2 * (S * S + 103 * 300) + 1)
    upsampled = []
    postprocess = tiny_model.postprocess_masks
    monkeypatch.setattr(tiny_model, "postprocess_masks", lambda low_res, *sizes: upsampled.append(len(low_res)) or postprocess(low_res, *sizes))
    boxes = np.array([[10, 5, 120, 90], [100, 20, 290, 100], [0, 0, 299, 102], [200, 50, 260, 80], [30, 60, 90, 100]], dtype=float)

    masks, _, _ = predictor.predict(box=boxes)
    assert upsampled == [2, 2, 1]
    logits, _, _ = predictor.predict(box=boxes, return_logits=True)
    assert masks.shape == logits.shape == (5, 1, 103, 300)
    np.testing.assert_array_equal(masks, logits > 0)

    image = torch.from_numpy(predictor.transform.apply_image(make_photo(103, 300))).permute(2, 0, 1)
    (output,) = tiny_model([dict(image=image, original_size=(103, 300), boxes=predictor.transform.apply_boxes_torch(torch.from_numpy(boxes[:3]), (103, 300)))], multimask_output=False)
    expected = postprocess(output["low_res_logits"], image.shape[-2:], (103, 300)) > 0
    assert upsampled[-2:] == [2, 1] and torch.equal(output["masks"], expected)


def test_a_prompt_larger_than_the_chunk_budget_goes_alone(prepared, tiny_model, monkeypatch):
    """A huge image can hold more pixels per prompt than MASK_CHUNK_PIXELS (here 1): the chunk is then
    one prompt, not zero."""
    predictor, _ = prepared("rounding_103x300")
    monkeypatch.setattr(sam_hq, "MASK_CHUNK_PIXELS", 1)
    upsampled = []
    postprocess = tiny_model.postprocess_masks
    monkeypatch.setattr(tiny_model, "postprocess_masks", lambda low_res, *sizes: upsampled.append(len(low_res)) or postprocess(low_res, *sizes))
    boxes = np.array([[10, 5, 120, 90], [100, 20, 290, 100]], dtype=float)
    masks, _, _ = predictor.predict(box=boxes)
    logits, _, _ = predictor.predict(box=boxes, return_logits=True)
    assert upsampled == [1, 1, 2]  # two chunks of one for the masks, then the logits in one call
    np.testing.assert_array_equal(masks, logits > 0)


def test_a_chunks_logits_are_freed_before_the_next_chunk(prepared, tiny_model, monkeypatch):
    """Bool masks keep at most one chunk of fp32 upsampled logits alive: each chunk's logits are gone
    (no reference left) before the next chunk's are made, else the peak holds two chunks."""
    predictor, _ = prepared("rounding_103x300")
    monkeypatch.setattr(sam_hq, "MASK_CHUNK_PIXELS", 1)  # one prompt per chunk
    made, alive_at_each_call = [], []
    postprocess = tiny_model.postprocess_masks

    def tracked(low_res, *sizes):
        alive_at_each_call.append(sum(ref() is not None for ref in made))
        logits = postprocess(low_res, *sizes)
        made.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(tiny_model, "postprocess_masks", tracked)
    masks, _, _ = predictor.predict(box=np.array([[10, 5, 120, 90], [100, 20, 290, 100], [0, 0, 50, 50]], dtype=float))
    assert masks.shape[0] == 3 and alive_at_each_call == [0, 0, 0]


@pytest.mark.gpu
def test_bool_masks_of_many_prompts_on_a_large_frame_gpu():
    """64 boxes on a 3840x2160 frame: their fp32 upsampled logits all at once would take 2.1 GB beside
    the 0.53 GB of bool masks; upsampled a chunk at a time (16 prompts: 0.53 GB), the call's peak
    memory stays near the bool masks plus one chunk."""
    predictor = SamHQPredictor(make_model(TINY_CONFIG).cuda())
    predictor.set_image(torch.zeros(2160, 3840, 3, dtype=torch.uint8, device="cuda"))
    corners = torch.rand(64, 2, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([3840.0, 2160.0])
    boxes = torch.cat([corners.amin(1), corners.amax(1) + 1], dim=1).numpy()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    masks, _, _ = predictor.predict(box=boxes, return_torch=True)
    peak = torch.cuda.max_memory_allocated() - before
    assert masks.dtype == torch.bool and masks.shape == (64, 1, 2160, 3840)
    assert peak < 1.4e9, f"peak {peak / 1e9:.2f} GB"


def test_prompt_encoder_reads_the_padded_input_frame(tiny_model):
    """Written from REFERENCE.md ("Prompt encoder"): a point (x, y) in the input frame is encoded as
    [sin, cos](2 pi (2 c - 1) @ G) with c = (x + 0.5, y + 0.5) / S (the padded square, not the
    resized size), plus its label embedding; one not-a-point token is appended without a box; a
    box is two corners with embeddings 2 and 3. This pins the frame the predictor must feed."""
    enc = tiny_model.prompt_encoder
    gaussian = enc.pe_layer.positional_encoding_gaussian_matrix

    def pe(xy):
        c = (torch.tensor(xy, dtype=torch.float32) + 0.5) / S
        angle = 2 * torch.pi * ((2 * c - 1) @ gaussian)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    emb = [e.weight[0] for e in enc.point_embeddings]
    coords, labels = torch.tensor([[[10.0, 200.0], [250.0, 3.0], [7.0, 7.0]]]), torch.tensor([[1, 0, -1]])
    with torch.no_grad():
        sparse, dense = enc((coords, labels), None, None)
        expected = torch.stack([pe([10.0, 200.0]) + emb[1], pe([250.0, 3.0]) + emb[0], enc.not_a_point_embed.weight[0], enc.not_a_point_embed.weight[0]])
        torch.testing.assert_close(sparse[0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense, enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, G, G))

        sparse, _ = enc((coords[:, :1], labels[:, :1]), torch.tensor([[20.0, 30.0, 200.0, 150.0]]), None)
        expected = torch.stack([pe([10.0, 200.0]) + emb[1], pe([20.0, 30.0]) + emb[2], pe([200.0, 150.0]) + emb[3]])
        torch.testing.assert_close(sparse[0], expected, rtol=1e-5, atol=1e-5)

        # The image's dense PE: grid cell (x, y) of the G x G embedding is the same encoding of its
        # centre, c = ((x + 0.5) / G, (y + 0.5) / G); cells off the diagonal tell x from y.
        dense_pe = enc.get_dense_pe()[0]  # [C, G, G], indexed [:, y, x]
        for x, y in ((0, 5), (11, 2), (3, 15), (15, 0)):
            torch.testing.assert_close(dense_pe[:, y, x], pe([(x + 0.5) * S / G - 0.5, (y + 0.5) * S / G - 0.5]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Image conversions: every accepted form gives the RGB uint8 image's embedding and masks
# ---------------------------------------------------------------------------------------------


def _image_variants(rgb: np.ndarray) -> dict:
    alpha = np.full(rgb.shape[:2], 99, np.uint8)
    return {
        "bgr": (np.ascontiguousarray(rgb[..., ::-1]), "BGR", rgb),
        "bgr_view": (rgb[..., ::-1], "BGR", rgb),
        "bgra": (np.dstack([rgb[..., ::-1], alpha]), "BGR", rgb),  # OpenCV's 4-channel order
        "gray_bgr": (rgb[..., 0], "BGR", np.repeat(rgb[..., :1], 3, axis=2)),
        "rgba": (np.dstack([rgb, alpha]), "RGB", rgb),
        "pil": (Image.fromarray(rgb), "RGB", rgb),
        "uint16": (rgb.astype(np.uint16) * 257, "RGB", rgb),
        "float_unit": (rgb / 255.0, "RGB", rgb),
        "float32_unit": ((rgb / 255.0).astype(np.float32), "RGB", rgb),
        "gray_2d": (rgb[..., 0], "RGB", np.repeat(rgb[..., :1], 3, axis=2)),
        "gray_hw1": (rgb[..., :1], "RGB", np.repeat(rgb[..., :1], 3, axis=2)),
    }


@pytest.fixture(scope="module")
def conversion_predictor(tiny_model):
    return SamHQPredictor(tiny_model)


@pytest.fixture(scope="module")
def plain_rgb_predictors(tiny_model):
    """Predictors set with the plain RGB uint8 images the conversions must reproduce, built once."""
    cache = {}

    def get(rgb: np.ndarray) -> SamHQPredictor:
        key = rgb.tobytes()
        if key not in cache:
            cache[key] = SamHQPredictor(tiny_model)
            cache[key].set_image(rgb)
        return cache[key]

    return get


@pytest.mark.parametrize("kind", list(_image_variants(np.zeros((1, 1, 3), np.uint8))))
def test_image_conversions_equal_the_rgb_image(conversion_predictor, plain_rgb_predictors, kind):
    rgb = make_photo(60, 90, seed=3)
    image, image_format, equivalent_rgb = _image_variants(rgb)[kind]
    expected = plain_rgb_predictors(equivalent_rgb)
    conversion_predictor.set_image(image, image_format=image_format)

    assert conversion_predictor.original_size == (60, 90)
    assert conversion_predictor.input_size == expected.input_size
    # the same uint8 pixels give bit-identical features, hence identical predictions
    assert torch.equal(conversion_predictor.get_image_embedding(), expected.get_image_embedding())
    assert torch.equal(conversion_predictor.hq_features, expected.hq_features)


def test_gray_image_is_not_the_rgb_image(plain_rgb_predictors):
    """Sanity for the test above: the embedding does depend on the colour channels."""
    rgb = make_photo(60, 90, seed=3)
    colour = plain_rgb_predictors(rgb).get_image_embedding()
    gray = plain_rgb_predictors(np.repeat(rgb[..., :1], 3, axis=2)).get_image_embedding()
    assert not torch.allclose(colour, gray, atol=1e-3)


@pytest.mark.parametrize(
    "image, image_format, error, message",
    [
        (np.full((20, 30, 3), 1.5), "RGB", ValueError, "float images must hold values in [0, 1] (got 1.5..1.5)"),
        (np.full((20, 30, 3), -0.5, np.float32), "RGB", ValueError, "[0, 1]"),
        (np.full((20, 30, 3), np.nan), "RGB", ValueError, "NaN"),
        (np.zeros((0, 30, 3), np.uint8), "RGB", ValueError, "empty"),
        (np.zeros((2, 20, 30, 3), np.uint8), "RGB", ValueError, "set_image takes one image, got a batch of shape [2, 20, 30, 3]: use set_images"),
        (np.zeros((20, 30, 2), np.uint8), "RGB", ValueError, "shape"),
        (np.zeros((3, 20, 30), np.uint8), "RGB", ValueError, "got [3, 20, 30] (channels first? numpy images are [H, W, C]: pass image.transpose(1, 2, 0))"),
        (np.zeros((20, 30, 3), np.uint8), "HSV", ValueError, "image_format"),
        (np.full((20, 30, 3), 1000, np.int32), "RGB", ValueError, "outside 0..255"),
        (np.zeros((1, 2000, 3), np.uint8), "RGB", ValueError, "elongated"),  # short side would round to 0 pixels
        ([[1, 2], [3, 4]], "RGB", TypeError, "numpy array, PIL image or torch tensor"),
        # torch images are accepted (tests/test_batched_images.py); their dtype and shape are checked
        (torch.zeros(20, 30, 3, dtype=torch.int32), "RGB", TypeError, "uint8"),
        (torch.zeros(20, 30, 2, dtype=torch.uint8), "RGB", ValueError, "[H, W, C] (HWC), [C, H, W] (CHW) (C = 1, 3 or 4)"),
        (torch.linspace(-0.25, 2.0, 20 * 30 * 3).reshape(20, 30, 3), "RGB", ValueError, "float images must hold values in [0, 1] (got -0.25..2)"),
        (torch.zeros(20, 30, 3, device="meta"), "RGB", ValueError, "image is on the meta device"),
        (torch.zeros(20, 30, 3, dtype=torch.float8_e4m3fn), "RGB", TypeError, "uint8 (0..255) or float16/bfloat16/float32/float64 in [0, 1]"),
    ],
    ids=[
        "float_above_1", "float_below_0", "nan", "empty_rows", "4d", "two_channels", "numpy_chw", "bad_format", "int32_range", "too_elongated",
        "list", "tensor_int32", "tensor_2_channels", "tensor_float_range", "tensor_meta", "tensor_float8",
    ],
)
def test_bad_images_raise(tiny_model, image, image_format, error, message):
    predictor = SamHQPredictor(tiny_model)
    with pytest.raises(error, match=re.escape(message)):
        predictor.set_image(image, image_format=image_format)
    assert not predictor.is_image_set


# ---------------------------------------------------------------------------------------------
# 5. Bad prompts raise clear errors
# ---------------------------------------------------------------------------------------------


def test_predict_before_set_image_raises(tiny_model):
    predictor = SamHQPredictor(tiny_model)
    for call in (
        lambda: predictor.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1])),
        lambda: predictor.predict(),
        lambda: predictor.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1)),
        predictor.get_image_embedding,
    ):
        with pytest.raises(ImageNotSetError, match="set_image") as info:
            call()
        # a RuntimeError as in the original, and a ValueError for callers that catch bad input
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


def test_reset_image_then_predict_raises(tiny_model, photos):
    predictor = SamHQPredictor(tiny_model)
    predictor.set_image(photos["landscape_200x300"])
    predictor.predict(box=np.array([10, 10, 100, 100]))
    predictor.reset_image()
    assert not predictor.is_image_set
    assert predictor.features is None and predictor.hq_features is None
    assert predictor.original_size is None and predictor.input_size is None
    with pytest.raises(ImageNotSetError):
        predictor.predict(box=np.array([10, 10, 100, 100]))
    with pytest.raises(ImageNotSetError):
        predictor.get_image_embedding()


P1 = np.array([[100.0, 80.0]])  # one point inside the 300 x 200 image
L1 = np.array([1])
MASK = np.zeros((1, LOW, LOW), np.float32)

BAD_PROMPTS = {
    "coords_without_labels": (dict(point_coords=P1), ValueError, "given together"),
    "labels_without_coords": (dict(point_labels=L1), ValueError, "given together"),
    "labels_too_long": (dict(point_coords=P1, point_labels=np.array([1, 1])), ValueError, "point_labels must have shape [1]"),
    "labels_not_batched_like_coords": (dict(point_coords=P1[None], point_labels=L1), ValueError, "point_labels must have shape [1, 1]"),
    "label_2": (dict(point_coords=P1, point_labels=np.array([2])), ValueError, "1 (foreground), 0 (background) or -1"),
    "label_nan": (dict(point_coords=P1, point_labels=np.array([np.nan])), ValueError, "NaN"),
    "coords_nan": (dict(point_coords=np.array([[np.nan, 3.0]]), point_labels=L1), ValueError, "point_coords has NaN or infinite"),
    "coords_inf": (dict(point_coords=np.array([[5.0, np.inf]]), point_labels=L1), ValueError, "point_coords has NaN or infinite"),
    "coords_three_columns": (dict(point_coords=np.array([[1.0, 2.0, 3.0]]), point_labels=L1), ValueError, "last dimension of 2"),
    "coords_flat": (dict(point_coords=np.array([1.0, 2.0]), point_labels=np.array(1)), ValueError, "[K, 2] or [N, K, 2]"),
    "coords_scalar": (dict(point_coords=5.0, point_labels=1), ValueError, "last dimension of 2"),
    "box_scalar": (dict(box=3.0), ValueError, "last dimension of 4"),
    "coords_4d": (dict(point_coords=np.zeros((1, 1, 1, 2)), point_labels=np.zeros((1, 1, 1))), ValueError, "[K, 2] or [N, K, 2]"),
    "coords_not_numeric": (dict(point_coords="10,20", point_labels=L1), TypeError, "numeric array"),
    "mask_beyond_float32": (dict(box=np.array([5, 5, 40, 30]), mask_input=np.full((1, LOW, LOW), 1e39)), ValueError,
                            "mask_input has values beyond float32's range (max |logit| 1e+39)"),
    "coords_on_meta": (dict(point_coords=torch.zeros(1, 2, device="meta"), point_labels=L1), ValueError, "point_coords is on the meta device"),
    # a nested list of equal lengths holding a non-number: not a ragged list
    "coords_list_of_words": (dict(point_coords=[["ten", "twenty"]], point_labels=[1]), TypeError, "point_coords must be a numeric array, got strings"),
    # numbers as strings: a cast to float would read them as numbers
    "coords_numeric_strings": (dict(point_coords=[["10", "20"]], point_labels=[1]), TypeError, "point_coords must be a numeric array, got strings"),
    "box_numeric_strings": (dict(box=np.array(["1", "2", "30", "40"])), TypeError, "box must be a numeric array, got strings"),
    # None: a cast to float would make it NaN
    "coords_none": (dict(point_coords=[[10.0, None]], point_labels=[1]), TypeError, "point_coords must be a numeric array, got Python objects"),
    "labels_none": (dict(point_coords=[[10.0, 20.0]], point_labels=[None]), TypeError, "point_labels must be a numeric array, got Python objects"),
    "coords_complex": (dict(point_coords=np.array([[10 + 5j, 20]]), point_labels=L1), TypeError, "point_coords must hold real numbers"),
    "point_far_right": (dict(point_coords=np.array([[5 * 300.0, 50.0]]), point_labels=L1), ValueError, "far outside the 300x200"),
    "point_far_above": (dict(point_coords=np.array([[50.0, -31.0]]), point_labels=L1), ValueError, "far outside"),
    "swapped_xy_like_point": (dict(point_coords=np.array([[50.0, 290.0]]), point_labels=L1), ValueError, "far outside"),
    "box_inverted_x": (dict(box=np.array([200.0, 10.0, 100.0, 90.0])), ValueError, "x2 > x1"),
    "box_inverted_y": (dict(box=np.array([10.0, 90.0, 100.0, 10.0])), ValueError, "y2 > y1"),
    "box_empty": (dict(box=np.array([50.0, 10.0, 50.0, 90.0])), ValueError, "empty or inverted box"),
    "box_empty_y": (dict(box=np.array([10.0, 60.0, 90.0, 60.0])), ValueError, "empty or inverted box [10.0, 60.0, 90.0, 60.0]"),
    "box_three_values": (dict(box=np.array([1.0, 2.0, 3.0])), ValueError, "last dimension of 4"),
    "box_3d": (dict(box=np.zeros((1, 1, 4)) + [1, 2, 3, 4]), ValueError, "[4] or [N, 4]"),
    "box_nan": (dict(box=np.array([1.0, 2.0, np.nan, 4.0])), ValueError, "box has NaN"),
    "box_far_outside": (dict(box=np.array([10.0, 10.0, 2000.0, 90.0])), ValueError, "box has a coordinate (2000, 90) far outside"),
    "box_beside_the_image": (dict(box=np.array([320.0, 10.0, 400.0, 50.0])), ValueError, "box [320.0, 10.0, 400.0, 50.0] lies entirely outside the 300x200"),
    # a box meeting the image along its border only covers none of it (the image spans [0, W] x [0, H])
    "box_touching_the_top_from_outside": (dict(box=np.array([[10.0, 10.0, 50.0, 50.0], [10.0, -40.0, 100.0, 0.0]])), ValueError, "box [10.0, -40.0, 100.0, 0.0] lies entirely outside"),
    "box_touching_the_left_from_outside": (dict(box=np.array([-40.0, 10.0, 0.0, 100.0])), ValueError, "lies entirely outside"),
    "box_touching_the_right_from_outside": (dict(box=np.array([300.0, 10.0, 340.0, 100.0])), ValueError, "lies entirely outside"),
    "box_touching_the_bottom_from_outside": (dict(box=np.array([10.0, 200.0, 100.0, 240.0])), ValueError, "lies entirely outside"),
    "swapped_xy_like_box": (dict(box=np.array([50.0, 220.0, 150.0, 280.0])), ValueError, "lies entirely outside"),
    "mask_wrong_size": (dict(mask_input=np.zeros((1, 256, 256))), ValueError, "mask_input must be [1, 64, 64]"),
    "mask_without_channel": (dict(mask_input=np.zeros((LOW, LOW))), ValueError, "mask_input must be"),
    "mask_nan": (dict(mask_input=np.full((1, LOW, LOW), np.nan)), ValueError, "mask_input has NaN"),
    "count_mismatch_box_points": (
        dict(box=np.array([[1.0, 1.0, 50.0, 50.0]] * 2), point_coords=np.tile(P1, (3, 2, 1)), point_labels=np.ones((3, 2))),
        ValueError,
        "prompt counts disagree",
    ),
    "count_mismatch_box_mask": (dict(box=np.array([[1.0, 1.0, 50.0, 50.0]] * 3), mask_input=np.zeros((2, 1, LOW, LOW))), ValueError, "prompt counts disagree"),
    "count_mismatch_box_single_mask": (dict(box=np.array([[1.0, 1.0, 50.0, 50.0]] * 2), mask_input=MASK), ValueError, "prompt counts disagree"),
    "empty_points": (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), ValueError, "empty"),
    "point_sets_of_zero_points": (dict(point_coords=np.zeros((2, 0, 2)), point_labels=np.zeros((2, 0))), ValueError, "empty"),
    "ragged_point_sets": (dict(point_coords=[[[1, 2]], [[3, 4], [5, 6]]], point_labels=[[1], [1, 1]]), ValueError, "point_coords is ragged"),
    "bool_mask": (dict(mask_input=np.zeros((1, LOW, LOW), bool)), TypeError, "mask_input must be float logits"),
}


@pytest.mark.parametrize("kind", list(BAD_PROMPTS))
def test_bad_prompts_raise(prepared, kind):
    predictor, _ = prepared("landscape_200x300")  # H=200, W=300
    prompt, error, message = BAD_PROMPTS[kind]
    with pytest.raises(error, match=re.escape(message)):
        predictor.predict(**prompt)


BAD_TORCH_PROMPTS = {
    # predict_torch takes input-frame tensors with a prompt axis; only shapes and devices are checked (no GPU sync).
    "coords_without_prompt_axis": (dict(point_coords=torch.zeros(3, 2), point_labels=torch.ones(3)), ValueError, "point_coords must have shape [N, K, 2]"),
    "labels_shape": (dict(point_coords=torch.zeros(2, 3, 2), point_labels=torch.ones(2, 4)), ValueError, "point_labels must have shape [N, K]"),
    "labels_missing": (dict(point_coords=torch.zeros(1, 3, 2), point_labels=None), ValueError, "given together"),
    "box_1d": (dict(point_coords=None, point_labels=None, boxes=torch.tensor([1.0, 2.0, 30.0, 40.0])), ValueError, "boxes must have shape [N, 4]"),
    "mask_size": (dict(point_coords=None, point_labels=None, mask_input=torch.zeros(1, 1, 32, 32)), ValueError, f"mask_input must have shape [N, 1, {LOW}, {LOW}]"),
    "count_mismatch": (dict(point_coords=torch.zeros(2, 1, 2), point_labels=torch.ones(2, 1), boxes=torch.zeros(3, 4)), ValueError, "prompt counts disagree"),
    "numpy_box": (dict(point_coords=None, point_labels=None, boxes=np.zeros((1, 4))), TypeError, "boxes must be a torch.Tensor"),
    # (the original would decode these as one not-a-point token each; the padded fused decoder cannot tell them from no points)
    "zero_points_per_prompt": (dict(point_coords=torch.zeros(2, 0, 2), point_labels=torch.ones(2, 0)), ValueError, "point_coords has no points (shape [2, 0, 2])"),
    # (the meta device stands in for a GPU: a device mismatch is metadata, checked without a sync)
    "wrong_device": (dict(point_coords=None, point_labels=None, boxes=torch.zeros(1, 4, device="meta")), ValueError, "boxes is on meta, the model on cpu"),
    "bool_labels": (dict(point_coords=torch.zeros(1, 1, 2), point_labels=torch.ones(1, 1, dtype=torch.bool)), TypeError, "point_labels must hold 1"),
    "complex_coords": (dict(point_coords=torch.zeros(1, 1, 2, dtype=torch.complex64), point_labels=torch.ones(1, 1)), TypeError,
                       "point_coords must hold (x, y) pixels as real numbers, got dtype torch.complex64"),
    "bool_boxes": (dict(point_coords=None, point_labels=None, boxes=torch.ones(1, 4, dtype=torch.bool)), TypeError,
                   "boxes must hold (x1, y1, x2, y2) pixels as real numbers, got dtype torch.bool"),
    "bool_mask": (dict(point_coords=None, point_labels=None, mask_input=torch.zeros(1, 1, LOW, LOW, dtype=torch.bool)), TypeError, "mask_input must be float logits"),
    # (with a box, a third coordinate column used to be ignored silently)
    "coords_three_columns": (dict(point_coords=torch.zeros(1, 2, 3), point_labels=torch.ones(1, 2), boxes=torch.zeros(1, 4)), ValueError,
                             "point_coords must have shape [N, K, 2]"),
}


def test_an_image_already_at_the_models_size_skips_the_resize_quietly(tiny_model):
    """An image whose longest side is the model's input size is not resized; a read-only array (what
    numpy gives of a PIL image) is copied rather than handed to torch (which warns about it). The
    features are those of the same pixels given to set_torch_image."""
    size = tiny_model.config.img_size
    image = make_photo(size * 3 // 4, size, seed=4)
    image.flags.writeable = False
    expected = SamHQPredictor(tiny_model)
    expected.set_torch_image(torch.from_numpy(image.copy()).permute(2, 0, 1)[None], image.shape[:2])
    for given in (image, Image.fromarray(image)):
        predictor = SamHQPredictor(tiny_model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            predictor.set_image(given)
        torch.testing.assert_close(predictor.features, expected.features, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, ">f4", np.longdouble])
def test_mask_logits_are_checked_in_their_own_float_precision(dtype):
    """mask_input (N x 256 x 256 logits) is checked without a float64 copy: float arrays keep their
    dtype and values (the model takes them as float32), other numbers (and floats torch cannot take:
    big-endian, long double) become float64; NaN / inf and non-numbers are refused as for every prompt."""
    values = (np.arange(-6, 6).reshape(1, 3, 4) * 7.5).astype(dtype)
    checked = as_finite_array(values, "mask_input", keep_float=True)
    assert checked.dtype == (dtype if dtype in (np.float16, np.float32, np.float64) else np.float64)
    torch.as_tensor(checked)  # a dtype torch takes
    np.testing.assert_array_equal(checked, values)
    assert as_finite_array(values, "point_coords").dtype == np.float64  # coordinates: float64, as the original
    if dtype in (np.float16, np.float32, np.float64):
        with pytest.raises(ValueError, match="mask_input has NaN or infinite values"):
            as_finite_array(np.full((1, 2), np.inf, dtype), "mask_input", keep_float=True)
    with pytest.raises(TypeError, match="mask_input must be a numeric array, got strings"):
        as_finite_array(np.array([["1"]]), "mask_input", keep_float=True)


@pytest.mark.parametrize(
    "prompt",
    [
        dict(point_coords=np.array([[0.5, 0.4]]), point_labels=L1),
        dict(box=np.array([0.1, 0.2, 0.6, 0.9])),
        dict(box=np.array([0.0, 0.0, 1.0, 1.0])),  # the whole image, normalized: [0, 1] includes both ends
        dict(point_coords=np.array([[0.0, 1.0], [1.0, 0.0]]), point_labels=np.array([1, 0])),
    ],
    ids=["points", "box", "full_image_box", "corner_points"],
)
def test_normalized_coordinates_warn(prepared, prompt):
    """Coordinates in [0, 1] on a 300 x 200 image: most likely normalized ones, a silent top-left mask otherwise."""
    predictor, _ = prepared("landscape_200x300")
    with pytest.warns(UserWarning, match=re.escape("every prompt coordinate lies in [0, 1] on a 300x200 image")):
        predictor.predict(**prompt)


def test_negative_coordinates_near_the_corner_do_not_warn(prepared):
    """(-1, -1) is a pixel just off the corner, not a normalized coordinate."""
    predictor, _ = prepared("landscape_200x300")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor.predict(point_coords=np.array([[-1.0, -1.0]]), point_labels=L1)


@pytest.mark.parametrize("height, width, warns", [(20, 32, True), (32, 20, True), (20, 31, False), (31, 31, False)])
def test_normalized_coordinate_warning_starts_at_a_32_pixel_side(tiny_model, height, width, warns):
    """On an image whose longest side is under 32 pixels, coordinates in [0, 1] may well be pixels: no warning there."""
    predictor = SamHQPredictor(tiny_model)
    predictor.set_image(make_photo(height, width, seed=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor.predict(point_coords=np.array([[0.5, 0.4]]), point_labels=L1)
    assert [str(w.message).startswith("every prompt coordinate lies in [0, 1]") for w in caught] == ([True] if warns else [])


def test_normalized_coordinate_warning_points_at_the_callers_line(prepared, tiny_model):
    """The warning names the user's line (this file), from predict and from predict_batch."""
    predictor, _ = prepared("landscape_200x300")
    batch = SamHQPredictor(tiny_model)
    batch.set_images([make_photo(200, 300, seed=1)])
    for call in (lambda: predictor.predict(box=np.array([0.1, 0.2, 0.6, 0.9])), lambda: batch.predict_batch([dict(box=np.array([0.1, 0.2, 0.6, 0.9]))])):
        with pytest.warns(UserWarning, match="normalized") as record:
            call()
        assert record[0].filename == __file__


def test_pixel_coordinates_do_not_warn(prepared):
    predictor, _ = prepared("landscape_200x300")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor.predict(point_coords=np.array([[0.5, 0.5], [120.0, 80.0]]), point_labels=np.array([1, 0]))
        predictor.predict(box=np.array([0.0, 0.0, 1.0, 150.0]))


def test_no_warning_when_only_some_prompt_arguments_look_normalized(prepared):
    """The warning needs every coordinate given in [0, 1]: pixel points with a 1-pixel box at the
    corner (or a pixel box with a point on the corner pixel) are pixel prompts."""
    predictor, _ = prepared("landscape_200x300")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor.predict(point_coords=np.array([[120.0, 80.0]]), point_labels=L1, box=np.array([0.0, 0.0, 1.0, 1.0]))
        predictor.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=L1, box=np.array([10.0, 20.0, 150.0, 120.0]))


def test_model_forward_equals_the_predictor(tiny_model):
    """The original Sam.forward over two images of different sizes (one encoder batch) gives, image
    by image, what set_torch_image + predict_torch give for the same prompts."""
    transform = SamHQPredictor(tiny_model).transform
    photos = [make_photo(200, 300, seed=5), make_photo(330, 180, seed=6)]
    images = [torch.from_numpy(transform.apply_image(p)).permute(2, 0, 1) for p in photos]
    prompts = [
        dict(boxes=torch.tensor([[10.0, 20.0, 200.0, 150.0], [50.0, 40.0, 120.0, 160.0]])),
        dict(point_coords=torch.tensor([[[60.0, 100.0], [20.0, 200.0]]]), point_labels=torch.tensor([[1, 0]]), mask_inputs=torch.randn(1, 1, LOW, LOW)),
    ]
    batched_input = [dict(image=image, original_size=p.shape[:2], **prompt) for image, p, prompt in zip(images, photos, prompts)]
    for multimask_output, hq_token_only in ((True, False), (False, True)):
        outputs = tiny_model(batched_input, multimask_output=multimask_output, hq_token_only=hq_token_only)
        for output, image, photo, prompt in zip(outputs, images, photos, prompts):
            predictor = SamHQPredictor(tiny_model)
            predictor.set_torch_image(image[None], photo.shape[:2])
            masks, scores, low_res = predictor.predict_torch(
                prompt.get("point_coords"), prompt.get("point_labels"), prompt.get("boxes"), prompt.get("mask_inputs"),
                multimask_output=multimask_output, hq_token_only=hq_token_only, return_logits=True,
            )
            assert output["masks"].dtype == torch.bool and output["masks"].shape == masks.shape == (len(scores), 1, *photo.shape[:2])
            torch.testing.assert_close(output["low_res_logits"], low_res, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(output["iou_predictions"], scores, rtol=1e-5, atol=1e-5)
            away = masks.abs() > 1e-4  # away from the threshold, where float rounding cannot flip a pixel
            assert torch.equal(output["masks"][away], (masks > 0)[away])


def test_original_model_attributes(tiny_model):
    """pixel_mean / pixel_std are what preprocess normalizes with; image_encoder.img_size is the input side."""
    image = torch.from_numpy(make_photo(256, 170, seed=2)).permute(2, 0, 1).float()
    normalized = tiny_model.preprocess(image[None])[0, :, :, :170]
    torch.testing.assert_close(normalized, (image - tiny_model.pixel_mean) / tiny_model.pixel_std)
    assert tiny_model.image_encoder.img_size == 256 and tiny_model.image_format == "RGB"


@pytest.mark.parametrize(
    "batched_input, message",
    [
        ([], "non-empty list of dicts"),
        ([dict(image=torch.zeros(3, 300, 200), original_size=(300, 200))], "must be a [3, h, w] tensor resized to at most 256 pixels a side, got [3, 300, 200]"),
        ([dict(image=torch.zeros(256, 200, 3), original_size=(256, 200))], "must be a [3, h, w] tensor"),
        ([dict(image=torch.zeros(3, 256, 200))], "batched_input[0] has no 'original_size'"),
        ([dict(image=torch.zeros(3, 256, 200), original_size=(256, 200), boxes=torch.zeros(4))], "batched_input[0]: boxes must have shape [N, 4]"),
        ([dict(image=torch.zeros(3, 256, 200), original_size=(256, 200), mask_inputs=torch.zeros(1, 1, 8, 8))], "batched_input[0]: mask_inputs must have shape [N, 1, 64, 64]"),
        ([dict(image=torch.zeros(3, 256, 200), original_size=(0, 5))], "batched_input[0]: original_size must be (H, W), two positive integers, got (0, 5)"),
        ([dict(image=torch.zeros(3, 256, 200), original_size=(256, 200, 3))], "batched_input[0]: original_size must be (H, W)"),  # image.shape
        ([dict(image=torch.zeros(3, 256, 200), original_size=torch.tensor([25.5, 20.0]))], "batched_input[0]: original_size must be (H, W)"),
        ([dict(image=torch.full((3, 256, 200), float("nan")), original_size=(256, 200))], "batched_input[0]: image has NaN or infinite values"),
        ([dict(image=torch.full((3, 256, 200), 300.0), original_size=(256, 200))], "batched_input[0]: image has values outside 0..255"),
        ([dict(image=torch.ones(3, 256, 200, dtype=torch.bool), original_size=(256, 200))], "batched_input[0]: image must be uint8 or float16"),
        # the second image's prompts are refused before the encoder runs on both
        ([dict(image=torch.zeros(3, 256, 200), original_size=(256, 200)),
          dict(image=torch.zeros(3, 256, 200), original_size=(256, 200), point_coords=torch.zeros(1, 2, 2), point_labels=torch.ones(1, 3))],
         "batched_input[1]: point_labels must have shape [N, K]"),
    ],
    ids=["empty", "not_resized", "hwc", "no_original_size", "box_shape", "mask_shape", "zero_original_size", "original_size_with_channels",
         "float_original_size", "nan_image", "image_over_255", "bool_image", "second_image_prompts"],
)
def test_model_forward_rejects_bad_input(tiny_model, monkeypatch, batched_input, message):
    monkeypatch.setattr(tiny_model, "encode_image", lambda images: pytest.fail("the encoder ran before the input was checked"))
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        tiny_model(batched_input, multimask_output=False)


def test_model_forward_refuses_flags_that_are_not_booleans(tiny_model, monkeypatch):
    """A string is truthy: "no" would silently give the multimask output."""
    monkeypatch.setattr(tiny_model, "encode_image", lambda images: pytest.fail("the encoder ran before the input was checked"))
    batched_input = [dict(image=torch.zeros(3, 256, 200), original_size=(256, 200))]
    with pytest.raises(TypeError, match="multimask_output must be True or False, got 'no'"):
        tiny_model(batched_input, multimask_output="no")
    with pytest.raises(TypeError, match="hq_token_only must be True or False, got 'no'"):
        tiny_model(batched_input, multimask_output=False, hq_token_only="no")


@pytest.mark.parametrize("image, error, message", [
    (torch.full((1, 3, 171, 256), float("inf")), ValueError, "transformed_image has NaN or infinite values"),
    (torch.full((1, 3, 171, 256), -1.0), ValueError, "transformed_image has values outside 0..255"),
    (torch.ones(1, 3, 170, 256, dtype=torch.int64), TypeError, "transformed_image must be uint8 or float16/bfloat16/float32/float64"),
    (torch.zeros(1, 3, 170, 256, device="meta"), ValueError, "transformed_image is on the meta device"),
], ids=["inf", "negative", "int64", "meta"])
def test_set_torch_image_refuses_pixels_it_cannot_take(tiny_model, image, error, message):
    """Every other image entry point refuses these; the original would encode them (NaN: NaN scores)."""
    predictor = SamHQPredictor(tiny_model)
    with pytest.raises(error, match=re.escape(message)):
        predictor.set_torch_image(image, (200, 300))
    assert not predictor.is_image_set


def test_a_model_cast_after_set_image_needs_the_image_set_again(tiny_model):
    """The embeddings of the image set are in the old dtype: a clear error, not a dtype clash deep in torch."""
    predictor = SamHQPredictor(copy.deepcopy(tiny_model))
    predictor.set_image(make_photo(60, 90))
    predictor.model.half()
    with pytest.raises(RuntimeError, match=re.escape("the model was cast or moved (now torch.float16 on cpu) since the image was set")):
        predictor.predict(box=np.array([5, 5, 40, 30]))
    predictor.set_image(make_photo(60, 90))
    assert predictor.predict(box=np.array([5, 5, 40, 30]))[0].shape == (1, 60, 90)


def test_set_torch_image_warns_of_a_unit_scale_image(tiny_model):
    """Float pixels in [0, 1] (a common convention) would reach the model as a black image."""
    with pytest.warns(UserWarning, match=re.escape("every value is within [0, 1], but the scale is 0..255")):
        SamHQPredictor(tiny_model).set_torch_image(torch.full((1, 3, 171, 256), 0.5), (200, 300))


def test_model_forward_takes_original_size_as_a_tensor_or_array(tiny_model):
    """Code written for the original passes image.shape[:2], a torch.Size, or an array of two ints."""
    image = torch.from_numpy(make_photo(256, 170, seed=2)).permute(2, 0, 1)
    box = torch.tensor([[20.0, 30.0, 150.0, 200.0]])
    outputs = [tiny_model([dict(image=image, original_size=size, boxes=box)], multimask_output=False)[0]
               for size in ((301, 200), torch.Size([301, 200]), torch.tensor([301, 200]), np.array([301, 200]))]
    for output in outputs:
        assert output["masks"].shape == (1, 1, 301, 200)
        assert torch.equal(output["masks"], outputs[0]["masks"])


def test_transform_gives_predict_torch_the_original_workflow(prepared):
    """The original's torch workflow: predictor.transform maps original-frame prompts to the input
    frame for predict_torch; it must give what predict gives for the same original-frame prompts."""
    predictor, _ = prepared("portrait_330x180")
    boxes = np.array([[10.0, 20.0, 120.0, 200.0], [30.0, 5.0, 170.0, 300.0]])
    points = np.array([[[50.0, 60.0]], [[100.0, 250.0]]])
    expected = predictor.predict(point_coords=points, point_labels=np.ones((2, 1)), box=boxes, return_logits=True)
    original_size = (330, 180)
    transform = predictor.transform
    torch_boxes = transform.apply_boxes_torch(torch.from_numpy(boxes), original_size)
    torch_points = transform.apply_coords_torch(torch.from_numpy(points), original_size)
    np.testing.assert_allclose(torch_boxes.numpy(), transform.apply_boxes(boxes, original_size), rtol=1e-6)
    np.testing.assert_allclose(torch_points.numpy(), transform.apply_coords(points, original_size), rtol=1e-6)
    got = predictor.predict_torch(torch_points, torch.ones(2, 1, dtype=torch.int64), torch_boxes, return_logits=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, torch.from_numpy(e), rtol=1e-5, atol=1e-5)
    photo = make_photo(330, 180, seed=1)
    assert transform.apply_image(photo).shape == (256, 140, 3)
    assert transform.apply_image(photo[..., 0]).shape == (256, 140)  # gray stays gray, as the original
    chw = torch.from_numpy(photo).permute(2, 0, 1)[None]
    assert transform.apply_image_torch(chw).shape == (1, 3, 256, 140)
    resized = transform.apply_image_torch(chw.float())  # float: the original's single antialiased pass (test_original_parity)
    assert resized.dtype == torch.float32 and resized.shape == (1, 3, 256, 140)
    with pytest.raises(ValueError, match=re.escape("apply_image_torch takes a batch [B, C, H, W], as the original, got shape [3, 330, 180]")):
        transform.apply_image_torch(chw[0].float())


@pytest.mark.parametrize("kind", list(BAD_TORCH_PROMPTS))
def test_bad_torch_prompts_raise(prepared, kind):
    predictor, _ = prepared("landscape_200x300")
    prompt, error, message = BAD_TORCH_PROMPTS[kind]
    with pytest.raises(error, match=re.escape(message)):
        predictor.predict_torch(**prompt)


@pytest.mark.parametrize("flag", ["multimask_output", "return_logits", "hq_token_only", "return_torch"])
@pytest.mark.parametrize("value", ["False", None, 2, 0.5, 1.0, np.float64(0.0)])
def test_non_boolean_flags_are_refused(prepared, flag, value):
    """"False" is truthy: taken as True it would silently give the other output."""
    predictor, _ = prepared("landscape_200x300")
    box = np.array([10.0, 20.0, 150.0, 120.0])
    with pytest.raises(TypeError, match=re.escape(f"{flag} must be True or False, got {value!r}")):
        predictor.predict(box=box, **{flag: value})
    if flag != "return_torch":
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            predictor.predict_torch(None, None, torch.as_tensor(box, dtype=torch.float32)[None], **{flag: value})


def test_boolean_like_flags_are_accepted(prepared):
    predictor, _ = prepared("landscape_200x300")
    box = np.array([10.0, 20.0, 150.0, 120.0])
    expected = predictor.predict(box=box, multimask_output=False, hq_token_only=True)
    for flags in (dict(multimask_output=np.bool_(False), hq_token_only=np.bool_(True)), dict(multimask_output=0, hq_token_only=1)):
        for got, e in zip(predictor.predict(box=box, **flags), expected):
            np.testing.assert_array_equal(got, e)


def test_points_slightly_outside_are_accepted(prepared):
    """POINT_MARGIN = 10% of the longest side (30 px for 300x200) may lie outside the image; the
    parity test above checks the values of such points (x = -3, x = W + 2.5)."""
    assert POINT_MARGIN * 300 == 30
    predictor, _ = prepared("landscape_200x300")
    points = np.array([[[-3.0, 50.0]], [[300.0, 200.0]], [[-30.0, -30.0]], [[330.0, 230.0]], [[299.5, -0.5]]])
    masks, scores, low_res = predictor.predict(point_coords=points, point_labels=np.ones((5, 1)))
    assert masks.shape == (5, 1, 200, 300) and scores.shape == (5, 1) and low_res.shape == (5, 1, LOW, LOW)
    assert np.isfinite(scores).all() and np.isfinite(low_res).all()


def test_failed_predict_leaves_the_predictor_usable(prepared):
    predictor, _ = prepared("landscape_200x300")
    before = predictor.predict(box=np.array([10.0, 10.0, 100.0, 100.0]))
    with pytest.raises(ValueError):
        predictor.predict(box=np.array([100.0, 10.0, 10.0, 100.0]))
    after = predictor.predict(box=np.array([10.0, 10.0, 100.0, 100.0]))
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# 6. Image state: embedding, reset, replacement, per-image HQ features
# ---------------------------------------------------------------------------------------------


def test_set_image_twice_replaces_the_image(tiny_model, photos, prepared):
    predictor = SamHQPredictor(tiny_model)
    predictor.set_image(photos["landscape_200x300"])
    predictor.set_image(photos["portrait_330x180"])
    only_portrait, _ = prepared("portrait_330x180")

    assert predictor.original_size == (330, 180) and predictor.input_size == (256, 140)
    assert torch.equal(predictor.get_image_embedding(), only_portrait.get_image_embedding())
    assert torch.equal(predictor.hq_features, only_portrait.hq_features)
    box = np.array([20.0, 30.0, 150.0, 300.0])
    for a, b in zip(predictor.predict(box=box), only_portrait.predict(box=box)):
        np.testing.assert_array_equal(a, b)


def test_encoder_and_hq_features_run_once_per_image(tiny_model, photos, monkeypatch):
    """The original recomputes the HQ features on every predict; here they are computed once per
    set_image (and the encoder runs once), however many prompts follow."""
    calls = {"hq_features": 0, "image_encoder": 0}
    decoder = tiny_model.mask_decoder
    original_hq_features = decoder.hq_features

    def counting_hq_features(*args, **kwargs):
        calls["hq_features"] += 1
        return original_hq_features(*args, **kwargs)

    monkeypatch.setattr(decoder, "hq_features", counting_hq_features)
    hook = tiny_model.image_encoder.register_forward_hook(lambda *_: calls.__setitem__("image_encoder", calls["image_encoder"] + 1))
    try:
        predictor = SamHQPredictor(tiny_model)
        predictor.set_image(photos["landscape_200x300"])
        assert calls == {"hq_features": 1, "image_encoder": 1}

        box = np.array([[10.0, 10.0, 100.0, 100.0], [50.0, 60.0, 250.0, 190.0]])
        first = predictor.predict(box=box[0])
        predictor.predict(box=box)
        predictor.predict(point_coords=np.array([[30.0, 40.0]]), point_labels=np.array([1]), multimask_output=False)
        predictor.predict(mask_input=first[2], hq_token_only=True)
        predictor.predict_torch(torch.tensor([[[5.0, 5.0]]]), torch.tensor([[1]]))
        again = predictor.predict(box=box[0])
        assert calls == {"hq_features": 1, "image_encoder": 1}
        for a, b in zip(first, again):  # no state carried from one predict to the next
            np.testing.assert_array_equal(a, b)

        predictor.set_image(photos["portrait_330x180"])
        assert calls == {"hq_features": 2, "image_encoder": 2}
    finally:
        hook.remove()


def test_predict_torch_batched_shapes_and_dtypes(prepared):
    predictor, _ = prepared("portrait_330x180")
    coords = torch.tensor([[[30.0, 40.0], [100.0, 200.0]], [[70.0, 10.0], [5.0, 250.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 139.0, 255.0]])
    masks, scores, low_res = predictor.predict_torch(coords, labels, boxes, torch.zeros(2, 1, LOW, LOW))
    assert masks.shape == (2, 1, 330, 180) and masks.dtype == torch.bool
    assert scores.shape == (2, 1) and low_res.shape == (2, 1, LOW, LOW)
    logits, _, _ = predictor.predict_torch(coords, labels, boxes, torch.zeros(2, 1, LOW, LOW), return_logits=True)
    assert logits.dtype == torch.float32 and torch.equal(logits > 0, masks)
