"""Several images at once (set_images + predict_batch), torch-tensor images and torch outputs.

The oracle is the single-image predictor (set_image + predict), itself checked against the
original pipeline in test_predictor.py. Everything runs on the tiny random-weight model (256-pixel
input, 64x64 low-res logits), fp32 on the CPU.
"""

import copy
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from samhq_fast import SamHQPredictor
from samhq_fast.decoding import PromptDecoder
from samhq_fast.predictor import ImageNotSetError
from samhq_fast.transforms import scale_coords
from test_predictor import LOW, SCORE_TOL, assert_logits_close, assert_masks_match, make_photo

# Three sizes and orientations: landscape and portrait downscales and a small upscale
# (longest side 300 -> 256, 330 -> 256, 160 -> 256).
SIZES = [(200, 300), (330, 180), (120, 160)]


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """As in test_predictor: the tiny model's ops do not gain from threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [make_photo(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def singles(tiny_model, photos) -> list[SamHQPredictor]:
    """One single-image predictor per photo (the oracle)."""
    out = []
    for photo in photos:
        predictor = SamHQPredictor(tiny_model)
        predictor.set_image(photo)
        out.append(predictor)
    return out


@pytest.fixture(scope="module")
def batch(tiny_model, photos) -> SamHQPredictor:
    """All three photos in one encoder batch (a PIL image among the numpy ones)."""
    predictor = SamHQPredictor(tiny_model)
    predictor.set_images([photos[0], Image.fromarray(photos[1]), photos[2]])
    return predictor


def mixed_prompts(singles) -> list[dict]:
    """Image 0: one box + two points (4 sparse tokens); image 1: a point with a previous low-res mask
    (2 tokens); image 2: five boxes (2 tokens each). Images 1 and 2 share a decoder call (per-prompt
    feature gather), image 0 gets its own (broadcast features)."""
    (h0, w0), (h1, w1), (h2, w2) = SIZES
    previous = singles[1].predict(point_coords=np.array([[0.5 * w1, 0.4 * h1]]), point_labels=np.array([1]))[2]
    boxes = np.array([[0.1, 0.1, 0.5, 0.6], [0.4, 0.2, 0.95, 0.9], [0.3, 0.3, 0.7, 0.5], [0.0, 0.0, 1.0, 1.0], [0.6, 0.5, 0.9, 0.99]])
    return [
        dict(box=np.array([0.2 * w0, 0.25 * h0, 0.8 * w0, 0.7 * h0]), point_coords=np.array([[0.5 * w0, 0.5 * h0], [0.3 * w0, 0.6 * h0]]), point_labels=np.array([1, 0])),
        dict(point_coords=np.array([[0.6 * w1, 0.45 * h1]]), point_labels=np.array([1]), mask_input=previous),
        dict(box=boxes * [w2, h2, w2, h2]),
    ]


def assert_same_as_single(result, expected_prediction) -> None:
    """result: (masks, scores, low_res) of predict_batch; expected_prediction: the single-image
    predict of the same prompt with return_logits=True."""
    masks, scores, low_res = result
    logits, one_scores, one_low_res = expected_prediction
    assert masks.shape == logits.shape and scores.shape == one_scores.shape and low_res.shape == one_low_res.shape
    assert_logits_close(low_res, one_low_res)
    np.testing.assert_allclose(scores, one_scores, rtol=0, atol=SCORE_TOL)
    if masks.dtype == np.bool_:
        assert_masks_match(masks, logits)
    else:
        assert_logits_close(masks, logits)


# ---------------------------------------------------------------------------------------------
# set_images + predict_batch equal set_image + predict, image by image
# ---------------------------------------------------------------------------------------------


def test_set_images_state(batch, singles):
    assert batch.num_images == 3 and batch.is_image_set
    assert batch.features.shape == (3, 256, 16, 16) and batch.hq_features.shape == (3, 32, LOW, LOW)
    assert batch.original_sizes == SIZES
    assert batch.input_sizes == [(171, 256), (256, 140), (192, 256)]
    assert batch.original_size is None and batch.input_size is None  # several images: no single-image state
    assert batch.get_image_embedding().shape == (3, 256, 16, 16)
    for i, single in enumerate(singles):  # one encoder batch = the images one by one
        torch.testing.assert_close(batch.features[i : i + 1], single.features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.hq_features[i : i + 1], single.hq_features, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "multimask_output, hq_token_only, return_logits",
    [(True, False, False), (False, False, False), (True, True, True)],
    ids=["multimask", "single", "hq_only_logits"],
)
def test_predict_batch_equals_single_image_predict(batch, singles, multimask_output, hq_token_only, return_logits):
    prompts = mixed_prompts(singles)
    flags = dict(multimask_output=multimask_output, hq_token_only=hq_token_only)
    calls = []  # prompts per decoder call
    hook = batch.model.mask_decoder.register_forward_hook(lambda module, args, out: calls.append(args[2].shape[0]))
    try:
        results = batch.predict_batch(prompts, return_logits=return_logits, **flags)
    finally:
        hook.remove()
    assert sorted(calls) == [1, 6]  # image 0 alone (4 sparse tokens); images 1 and 2 together (2 tokens)
    assert len(results) == 3
    (h0, w0), (h1, w1), (h2, w2) = SIZES
    assert [r[0].shape for r in results] == [(1, h0, w0), (1, h1, w1), (5, 1, h2, w2)]  # unbatched, unbatched, 5 boxes
    assert [r[1].shape for r in results] == [(1,), (1,), (5, 1)]
    for result, single, prompt in zip(results, singles, prompts):
        assert result[0].dtype == (np.float32 if return_logits else np.bool_) and result[1].dtype == np.float32
        assert_same_as_single(result, single.predict(**prompt, return_logits=True, **flags))
    # the images' outputs really differ (the comparison above is not vacuous)
    assert not np.allclose(results[0][2], results[1][2], atol=1e-3)


def test_predict_batch_one_shared_decoder_call(batch, singles):
    """Same prompt structure for every image (1 point per prompt, 2, 1 and 3 prompts): one decoder
    call gathering each prompt's image features."""
    prompts = []
    for (h, w), n in zip(SIZES, (2, 1, 3)):
        fractions = np.array([[0.3, 0.4], [0.7, 0.6], [0.5, 0.2]])[:n]
        prompts.append(dict(point_coords=(fractions * [w, h])[:, None, :], point_labels=np.ones((n, 1))))
    calls = []
    hook = batch.model.mask_decoder.register_forward_hook(lambda module, args, out: calls.append(args[2].shape[0]))
    try:
        results = batch.predict_batch(prompts)
    finally:
        hook.remove()
    assert calls == [6]
    for result, single, prompt in zip(results, singles, prompts):
        assert result[0].shape == (len(prompt["point_labels"]), 1, *single.original_size)
        assert_same_as_single(result, single.predict(**prompt, return_logits=True))


def decoder_backend_predictor(tiny_model, backend: str) -> SamHQPredictor:
    """A predictor on a copy of the tiny model whose decoder path is `backend`: model.backend =
    "fused" on the eager encoder (the fused encoder is checked in test_fused_backend.py), with the
    fused decoder uncompiled (compile=False), which keeps it fast on the CPU."""
    model = copy.deepcopy(tiny_model)
    model.backend = backend
    predictor = SamHQPredictor(model)
    if backend == "fused":
        predictor._prompt_decoder = PromptDecoder(model, compile=False)
    return predictor


def test_fused_predict_batch_is_one_padded_decoder_call(tiny_model, photos, singles):
    """The fused backend's predict_batch: the mixed prompts of three images (4, 2 + mask and 2 sparse
    tokens: three groups for the eager backend) in ONE padded decoder call, equal to single-image
    predict."""
    fused = decoder_backend_predictor(tiny_model, "fused")
    fused.set_images(photos)
    calls = []
    run = fused._prompt_decoder._decode
    fused._prompt_decoder._decode = lambda *args: calls.append(args[5].shape[0]) or run(*args)
    prompts = mixed_prompts(singles)
    results = fused.predict_batch(prompts, return_logits=True)
    assert calls == [16]  # 7 prompts -> the 16-prompt bucket, one call
    for result, single, prompt in zip(results, singles, prompts):
        assert_same_as_single(result, single.predict(**prompt, return_logits=True))


def to_input_frame(prompt: dict, original_size: tuple[int, int]) -> dict:
    """A predict_batch prompt dict (original frame, maybe unbatched) -> a predict_batch_torch one
    (input frame, batched torch tensors)."""
    out = {}
    if "point_coords" in prompt:
        coords = np.asarray(prompt["point_coords"], dtype=np.float64)
        coords, labels = (coords, prompt["point_labels"]) if coords.ndim == 3 else (coords[None], prompt["point_labels"][None])
        out["point_coords"] = torch.tensor(scale_coords(coords, original_size, 256), dtype=torch.float32)
        out["point_labels"] = torch.tensor(labels, dtype=torch.int64)
    if "box" in prompt:
        corners = np.asarray(prompt["box"], dtype=np.float64).reshape(-1, 2, 2)
        out["boxes"] = torch.tensor(scale_coords(corners, original_size, 256).reshape(-1, 4), dtype=torch.float32)
    if "mask_input" in prompt:
        masks = np.asarray(prompt["mask_input"])
        out["mask_input"] = torch.tensor(masks if masks.ndim == 4 else masks[None])
    return out


@pytest.mark.parametrize("multimask_output, hq_token_only", [(False, False), (True, True)])
@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_predict_batch_torch_equals_predict_batch(tiny_model, photos, singles, backend, multimask_output, hq_token_only):
    """Input-frame torch prompts (no host-side validation) give predict_batch's results, as batched tensors."""
    predictor = decoder_backend_predictor(tiny_model, backend)
    predictor.set_images(photos)
    prompts = mixed_prompts(singles)
    prompts[1] = None  # a skipped image
    flags = dict(multimask_output=multimask_output, hq_token_only=hq_token_only)
    expected = predictor.predict_batch(prompts, return_logits=True, return_torch=True, **flags)
    torch_prompts = [None if p is None else to_input_frame(p, size) for p, size in zip(prompts, SIZES)]
    got = predictor.predict_batch_torch(torch_prompts, return_logits=True, **flags)
    assert got[1] is None and expected[1] is None
    for result, reference in zip(got[::2], expected[::2]):
        for g, e in zip(result, reference):
            e = e if g.ndim == e.ndim else e[None]  # predict_batch dropped the prompt axis of an unbatched prompt
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert [r[0].shape for r in got[::2]] == [(1, 1, *SIZES[0]), (5, 1, *SIZES[2])]
    masks = predictor.predict_batch_torch([None, None, torch_prompts[2]], **flags)[2][0]
    assert masks.dtype == torch.bool and torch.equal(masks, got[2][0] > 0)


@pytest.mark.parametrize(
    "prompts, error, message",
    [
        ([{}, {"box": torch.zeros(1, 4)}, {}], ValueError, "prompts[1] has unknown keys ['box']; allowed: ['point_coords', 'point_labels', 'boxes', 'mask_input']"),
        ([{}, {}, {"boxes": np.zeros((1, 4))}], TypeError, "prompts[2]: boxes must be a torch.Tensor [N, 4], got ndarray"),
        ([{}, {}, {"boxes": torch.zeros(4)}], ValueError, "prompts[2]: boxes must have shape [N, 4], got [4]"),
        ([{"boxes": torch.zeros(1, 4, device="meta")}, None, None], ValueError, "prompts[0]: boxes is on meta, the model on cpu"),
        ([{}, {}], ValueError, "got 2 prompt dicts for 3 images"),
    ],
    ids=["numpy_key", "numpy_value", "bad_shape", "wrong_device", "too_few"],
)
def test_bad_predict_batch_torch_prompts(batch, prompts, error, message):
    with pytest.raises(error, match=re.escape(message)):
        batch.predict_batch_torch(prompts)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_dense_positional_encoding_is_computed_per_set_image_not_per_predict(tiny_model, photos, backend, monkeypatch):
    """The prompt encoder's dense grid encoding depends on no prompt: set_image / set_images compute
    it once (the fused decoder once when it is built), predict and predict_batch reuse it."""
    predictor = decoder_backend_predictor(tiny_model, backend)
    model = predictor.model
    calls = []
    compute = model.prompt_encoder.get_dense_pe
    monkeypatch.setattr(model.prompt_encoder, "get_dense_pe", lambda: calls.append(1) or compute())
    predictor.set_image(photos[0])
    for box in ([10, 20, 150, 160], [40, 30, 250, 190], [0, 0, 300, 200]):
        predictor.predict(box=np.array(box))
    predictor.set_images(photos)
    predictor.predict_batch([dict(box=np.array([10, 20, 100, 110]))] * len(photos))
    assert len(calls) == 2


# Prompt arguments with N = 0 prompts (a frame in which a detector found nothing).
NO_PROMPTS = {
    "boxes": dict(box=np.zeros((0, 4))),
    "point_sets": dict(point_coords=np.zeros((0, 3, 2)), point_labels=np.zeros((0, 3))),
    "everything": dict(box=np.zeros((0, 4)), point_coords=np.zeros((0, 1, 2)), point_labels=np.zeros((0, 1)), mask_input=np.zeros((0, 1, LOW, LOW))),
}


def refuse_decoding(model, monkeypatch) -> None:
    """Both decoder paths make the two-way transformer's tokens with mask_decoder.prompt_tokens: make
    any call to it fail the test."""
    def decode(*args, **kwargs):
        raise AssertionError("the mask decoder ran for no prompts")
    monkeypatch.setattr(model.mask_decoder, "prompt_tokens", decode)


@pytest.mark.parametrize("kind", list(NO_PROMPTS))
@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_no_prompts_decode_to_empty_outputs(tiny_model, photos, backend, kind, monkeypatch):
    """N = 0 prompts give N = 0 outputs with the shapes and dtypes N prompts get (predict, its
    return_torch, predict_torch, the original-style forward), and the decoder does not run."""
    predictor = decoder_backend_predictor(tiny_model, backend)
    predictor.set_image(photos[0])
    h, w = SIZES[0]
    two_boxes = np.array([[10.0, 20.0, 150.0, 160.0], [40.0, 30.0, 250.0, 190.0]])
    torch_prompt = to_input_frame(NO_PROMPTS[kind], SIZES[0])
    for return_logits in (False, True):
        expected = {  # the same calls with two boxes, for the dtypes
            "numpy": predictor.predict(box=two_boxes, return_logits=return_logits),
            "torch": predictor.predict(box=two_boxes, return_logits=return_logits, return_torch=True),
            "predict_torch": predictor.predict_torch(None, None, to_input_frame(dict(box=two_boxes), SIZES[0])["boxes"], return_logits=return_logits),
        }
        with monkeypatch.context() as patch:
            refuse_decoding(predictor.model, patch)
            got = {
                "numpy": predictor.predict(**NO_PROMPTS[kind], return_logits=return_logits),
                "torch": predictor.predict(**NO_PROMPTS[kind], return_logits=return_logits, return_torch=True),
                "predict_torch": predictor.predict_torch(
                    torch_prompt.get("point_coords"), torch_prompt.get("point_labels"), torch_prompt.get("boxes"), torch_prompt.get("mask_input"),
                    return_logits=return_logits,
                ),
            }
        for route, outputs in got.items():
            assert [tuple(o.shape) for o in outputs] == [(0, 1, h, w), (0, 1), (0, 1, LOW, LOW)], route
            assert [type(o) for o in outputs] == [type(e) for e in expected[route]], route
            assert [o.dtype for o in outputs] == [e.dtype for e in expected[route]], route
    image = torch.from_numpy(predictor.transform.apply_image(photos[0])).permute(2, 0, 1)
    record = dict(image=image, original_size=(h, w), **{("mask_inputs" if k == "mask_input" else k): v for k, v in torch_prompt.items()})
    refuse_decoding(predictor.model, monkeypatch)
    (output,) = predictor.model([record], multimask_output=True)
    assert output["masks"].shape == (0, 1, h, w) and output["masks"].dtype == torch.bool
    assert output["iou_predictions"].shape == (0, 1) and output["low_res_logits"].shape == (0, 1, LOW, LOW)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_predict_batch_with_an_image_without_prompts(tiny_model, photos, singles, backend, monkeypatch):
    """One image of three has N = 0 prompts: it gets empty outputs, the others what single-image
    predict gives (the fused backend still in one padded call); with no prompt on any image
    (predict_batch_torch too), the decoder does not run."""
    predictor = decoder_backend_predictor(tiny_model, backend)
    predictor.set_images(photos)
    prompts = mixed_prompts(singles)
    prompts[1] = NO_PROMPTS["boxes"]
    results = predictor.predict_batch(prompts, return_logits=True)
    h1, w1 = SIZES[1]
    assert [r.shape for r in results[1]] == [(0, 1, h1, w1), (0, 1), (0, 1, LOW, LOW)]
    assert [r.dtype for r in results[1]] == [np.float32] * 3
    for i in (0, 2):
        assert_same_as_single(results[i], singles[i].predict(**prompts[i], return_logits=True))
    refuse_decoding(predictor.model, monkeypatch)
    for empty in predictor.predict_batch([NO_PROMPTS["point_sets"], None, NO_PROMPTS["everything"]], return_torch=True)[::2]:
        assert [r.dtype for r in empty] == [torch.bool, torch.float32, torch.float32] and len(empty[0]) == 0
    results = predictor.predict_batch_torch([{"boxes": torch.zeros(0, 4)}] * 3)
    assert [r[0].shape for r in results] == [(0, 1, *size) for size in SIZES]


def test_predict_batch_skips_none_and_accepts_an_empty_prompt(batch, singles):
    results = batch.predict_batch([None, {}, None])
    assert results[0] is None and results[2] is None
    assert_same_as_single(results[1], singles[1].predict(return_logits=True))  # predict() with no prompt at all
    assert batch.predict_batch([None, None, None]) == [None, None, None]


def test_set_image_equals_set_images_of_one(tiny_model, photos, singles):
    one = SamHQPredictor(tiny_model)
    one.set_images([photos[0]])
    assert one.num_images == 1 and one.original_size == SIZES[0] and one.input_size == (171, 256)
    assert torch.equal(one.features, singles[0].features) and torch.equal(one.hq_features, singles[0].hq_features)
    prompt = dict(point_coords=np.array([[100.0, 80.0]]), point_labels=np.array([1]))
    for a, b in zip(one.predict(**prompt), singles[0].predict(**prompt)):
        np.testing.assert_array_equal(a, b)
    # and predict_batch works after set_image too
    for a, b in zip(singles[0].predict_batch([prompt])[0], singles[0].predict(**prompt)):
        np.testing.assert_array_equal(a, b)


def test_set_image_after_set_images_is_single_again(tiny_model, photos):
    predictor = SamHQPredictor(tiny_model)
    predictor.set_images(photos)
    predictor.set_image(photos[1])
    assert predictor.num_images == 1 and predictor.original_size == SIZES[1]
    assert predictor.predict(box=np.array([10.0, 10.0, 100.0, 200.0]))[0].shape == (1, *SIZES[1])


# ---------------------------------------------------------------------------------------------
# return_torch: the same values as torch tensors on the model's device
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_logits", [False, True], ids=["masks", "logits"])
def test_predict_return_torch_equals_numpy(singles, return_logits):
    predictor = singles[0]
    for prompt in (
        dict(point_coords=np.array([[120.0, 80.0]]), point_labels=np.array([1])),  # one prompt: unbatched
        dict(box=np.array([[30.0, 40.0, 250.0, 160.0], [10.0, 10.0, 100.0, 100.0]])),  # two: batched
    ):
        numpy_out = predictor.predict(**prompt, return_logits=return_logits)
        torch_out = predictor.predict(**prompt, return_logits=return_logits, return_torch=True)
        for t, a in zip(torch_out, numpy_out):
            assert isinstance(t, torch.Tensor) and t.device == predictor.device
            assert t.dtype == (torch.bool if a.dtype == np.bool_ else torch.float32)
            assert torch.equal(t, torch.from_numpy(a))


def test_predict_batch_return_torch_equals_numpy(batch, singles):
    prompts = mixed_prompts(singles)
    numpy_results = batch.predict_batch(prompts)
    torch_results = batch.predict_batch(prompts, return_torch=True)
    for torch_out, numpy_out in zip(torch_results, numpy_results):
        for t, a in zip(torch_out, numpy_out):
            assert isinstance(t, torch.Tensor) and t.device == batch.device
            assert torch.equal(t, torch.from_numpy(a))


# ---------------------------------------------------------------------------------------------
# Torch-tensor images
# ---------------------------------------------------------------------------------------------


PROMPT = dict(point_coords=np.array([[0.4, 0.5]]), box=np.array([0.2, 0.2, 0.8, 0.7]))


def _prompt(height: int, width: int) -> dict:
    return dict(point_coords=PROMPT["point_coords"] * [width, height], point_labels=np.array([1]), box=PROMPT["box"] * [width, height, width, height])


@pytest.mark.parametrize("layout", ["hwc", "chw", "chw_bgr", "float_hwc"])
def test_torch_image_at_model_size_is_exactly_the_numpy_path(tiny_model, layout):
    """Longest side already 256: no resize on either path (PIL's resize to the same size is the
    identity, and the torch path skips interpolate), so features and predictions are bit-identical."""
    rgb = make_photo(171, 256, seed=7)
    hwc = torch.from_numpy(rgb)
    image, image_format = {
        "hwc": (hwc, "RGB"),
        "chw": (hwc.permute(2, 0, 1), "RGB"),
        "chw_bgr": (hwc.permute(2, 0, 1).flip(0), "BGR"),
        "float_hwc": (hwc.double() / 255, "RGB"),
    }[layout]
    from_numpy, from_torch = SamHQPredictor(tiny_model), SamHQPredictor(tiny_model)
    from_numpy.set_image(rgb)
    from_torch.set_image(image, image_format=image_format)
    assert from_torch.original_size == (171, 256) and from_torch.input_size == (171, 256)
    assert torch.equal(from_torch.features, from_numpy.features) and torch.equal(from_torch.hq_features, from_numpy.hq_features)
    for a, b in zip(from_torch.predict(**_prompt(171, 256)), from_numpy.predict(**_prompt(171, 256))):
        np.testing.assert_array_equal(a, b)


# Resized torch images differ from PIL's by at most 1 uint8 level on ~0.1 % of the values
# (downscales; upscales measured identical, see test_transforms.py). Through this random-weight
# encoder that moved the low-res logits by at most 0.3 % of their max-abs value and the scores by
# <= 1.3e-5 (measured on 5 photos, chelsea.jpg included). The bounds are ~4x that: a real
# preprocessing error (e.g. no antialiasing, a one-pixel shift, a wrong channel order) moves them
# by tens of percent. Mask pixels may flip only where the numpy path's logit is within the
# logit bound of the threshold.
TORCH_RESIZE_LOGIT_REL = 1e-2
TORCH_RESIZE_SCORE_TOL = 5e-5


@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("index", range(len(SIZES)), ids=["landscape_down", "portrait_down", "small_up"])
def test_resized_torch_image_is_close_to_numpy(singles, photos, tiny_model, index, layout):
    photo = torch.from_numpy(photos[index])
    predictor = SamHQPredictor(tiny_model)
    predictor.set_image(photo if layout == "hwc" else photo.permute(2, 0, 1))
    single = singles[index]
    assert predictor.original_size == single.original_size and predictor.input_size == single.input_size
    height, width = SIZES[index]
    for multimask_output in (True, False):
        masks, scores, low_res = predictor.predict(**_prompt(height, width), multimask_output=multimask_output)
        logits, one_scores, one_low_res = single.predict(**_prompt(height, width), multimask_output=multimask_output, return_logits=True)
        bound = TORCH_RESIZE_LOGIT_REL * float(np.abs(one_low_res).max())
        np.testing.assert_allclose(low_res, one_low_res, rtol=0, atol=bound)
        np.testing.assert_allclose(scores, one_scores, rtol=0, atol=TORCH_RESIZE_SCORE_TOL)
        differ = masks != (logits > 0)
        assert np.all(np.abs(logits[differ]) < bound), "a mask pixel differs away from the threshold"


def test_hwc_and_chw_torch_images_are_identical(tiny_model, photos):
    hwc, chw = SamHQPredictor(tiny_model), SamHQPredictor(tiny_model)
    hwc.set_image(torch.from_numpy(photos[1]))
    chw.set_image(torch.from_numpy(photos[1]).permute(2, 0, 1).contiguous())
    assert torch.equal(hwc.features, chw.features) and torch.equal(hwc.hq_features, chw.hq_features)


def test_set_images_mixes_torch_and_numpy(tiny_model, photos, singles):
    """A torch image at model size (exact) among numpy ones: the numpy images' results are unchanged."""
    at_size = make_photo(256, 200, seed=3)
    mixed = SamHQPredictor(tiny_model)
    mixed.set_images([photos[0], torch.from_numpy(at_size).permute(2, 0, 1), photos[2]])
    alone = SamHQPredictor(tiny_model)
    alone.set_image(at_size)
    prompts = [_prompt(*SIZES[0]), _prompt(256, 200), _prompt(*SIZES[2])]
    results = mixed.predict_batch(prompts)
    for result, oracle, prompt in zip(results, [singles[0], alone, singles[2]], prompts):
        assert_same_as_single(result, oracle.predict(**prompt, return_logits=True))


def test_set_images_resizes_host_images_in_threads_and_runs_torch_on_the_callers(tiny_model, photos, monkeypatch):
    """Host images are resized in worker threads; every torch step (the uploads, a torch image's
    conversion) runs on the calling thread, whose CUDA stream the caller may have chosen."""
    threads = {"resize": set(), "torch": set()}
    resize, upload, transform = SamHQPredictor._resize_on_host, SamHQPredictor._upload, SamHQPredictor._transform_image

    def recorded(kind, method):
        def call(*args, **kwargs):
            threads[kind].add(threading.get_ident())
            return method(*args, **kwargs)
        return call

    monkeypatch.setattr(SamHQPredictor, "_resize_on_host", recorded("resize", resize))
    monkeypatch.setattr(SamHQPredictor, "_upload", recorded("torch", upload))
    monkeypatch.setattr(SamHQPredictor, "_transform_image", recorded("torch", transform))
    monkeypatch.setattr("samhq_fast.predictor.HOST_CPUS", 2)
    SamHQPredictor(tiny_model).set_images([photos[0], torch.from_numpy(photos[1]), photos[2]])
    assert threads["torch"] == {threading.get_ident()} and threading.get_ident() not in threads["resize"]


# A 4-D array of same-size frames (a decoded video clip): converted and resized as ONE batch must
# give exactly what the same frames give as a list (each resized on its own).
FRAMES_SHAPE = (3, 150, 200)  # 3 frames of 150 x 200: a downscale to 192 x 256


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.stack([make_photo(*FRAMES_SHAPE[1:], seed=40 + i) for i in range(FRAMES_SHAPE[0])])  # [B, H, W, 3] uint8


@pytest.fixture(scope="module")
def frames_as_list(tiny_model, frames) -> SamHQPredictor:
    predictor = SamHQPredictor(tiny_model)
    predictor.set_images([torch.from_numpy(frame) for frame in frames])
    return predictor


@pytest.mark.parametrize("layout", ["bhwc", "bchw", "bchw_bgr", "bhwc_float"])
def test_set_images_of_a_frame_batch_equals_a_list(tiny_model, frames, frames_as_list, layout):
    bhwc = torch.from_numpy(frames)
    batch, image_format = {
        "bhwc": (bhwc, "RGB"),
        "bchw": (bhwc.permute(0, 3, 1, 2), "RGB"),  # a non-contiguous view
        "bchw_bgr": (bhwc.permute(0, 3, 1, 2).flip(1), "BGR"),
        "bhwc_float": (bhwc.double() / 255, "RGB"),
    }[layout]
    predictor = SamHQPredictor(tiny_model)
    predictor.set_images(batch, image_format=image_format)
    assert predictor.num_images == 3 and predictor.original_sizes == [FRAMES_SHAPE[1:]] * 3
    assert predictor.input_sizes == frames_as_list.input_sizes == [(192, 256)] * 3
    assert torch.equal(predictor.features, frames_as_list.features)
    assert torch.equal(predictor.hq_features, frames_as_list.hq_features)
    assert not torch.equal(predictor.features[0], predictor.features[1])  # the frames really differ


def test_set_images_of_a_numpy_frame_batch_equals_a_list(tiny_model, frames):
    stacked, listed = SamHQPredictor(tiny_model), SamHQPredictor(tiny_model)
    stacked.set_images(frames)
    listed.set_images(list(frames))
    assert stacked.original_sizes == listed.original_sizes and torch.equal(stacked.features, listed.features)


def test_set_images_list_entries_may_be_batches_of_one(tiny_model, frames, frames_as_list):
    """Each list entry takes what set_image takes, a [1, H, W, 3] / [1, 3, H, W] tensor and a
    [1, H, W, 3] numpy array included."""
    predictor = SamHQPredictor(tiny_model)
    bhwc = torch.from_numpy(frames)
    predictor.set_images([bhwc[:1], bhwc[1:2].permute(0, 3, 1, 2), frames[2:3]])
    assert predictor.original_sizes == frames_as_list.original_sizes
    assert torch.equal(predictor.features, frames_as_list.features)
    with pytest.raises(ValueError, match=r"images\[1\]: a 4-D image tensor must be a batch of one, got shape \[2, "):
        predictor.set_images([bhwc[0], bhwc[:2]])
    with pytest.raises(ValueError, match=r"images\[1\]: image must have shape .*, got \[2, "):
        predictor.set_images([frames[0], frames[:2]])


@pytest.mark.parametrize("as_tensor", [True, False], ids=["torch", "numpy"])
def test_set_image_takes_a_batch_of_one(tiny_model, frames, as_tensor):
    batch_of_one, single = SamHQPredictor(tiny_model), SamHQPredictor(tiny_model)
    if as_tensor:
        batch_of_one.set_image(torch.from_numpy(frames[:1]).permute(0, 3, 1, 2))
        single.set_image(torch.from_numpy(frames[0]).permute(2, 0, 1))
    else:
        batch_of_one.set_image(frames[:1])
        single.set_image(frames[0])
    assert batch_of_one.num_images == 1 and batch_of_one.original_size == single.original_size
    assert torch.equal(batch_of_one.features, single.features)
    for a, b in zip(batch_of_one.predict(**_prompt(*FRAMES_SHAPE[1:])), single.predict(**_prompt(*FRAMES_SHAPE[1:]))):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_predict_batch_before_set_images(tiny_model):
    with pytest.raises(ImageNotSetError, match="set_images"):
        SamHQPredictor(tiny_model).predict_batch([{}])


def test_single_image_calls_refuse_several_images(batch):
    with pytest.raises(RuntimeError, match="3 images are set.*use predict_batch"):
        batch.predict(box=np.array([10.0, 10.0, 50.0, 50.0]))
    with pytest.raises(RuntimeError, match="use predict_batch"):
        batch.predict_torch(torch.tensor([[[5.0, 5.0]]]), torch.tensor([[1]]))


@pytest.mark.parametrize(
    "prompts, error, message",
    [
        ([{}, {}], ValueError, "got 2 prompt dicts for 3 images"),
        ([{}, {}, {}, {}], ValueError, "got 4 prompt dicts for 3 images"),
        ({"box": np.array([1.0, 1.0, 5.0, 5.0])}, TypeError, "list of dicts"),
        ([{}, {"boxes": np.array([1.0, 1.0, 5.0, 5.0])}, {}], ValueError, "prompts[1] has unknown keys ['boxes']"),
        ([{}, {}, np.array([1.0, 1.0, 5.0, 5.0])], TypeError, "prompts[2] must be a dict"),
        ([{}, {"box": np.array([5.0, 1.0, 1.0, 5.0])}, {}], ValueError, "prompts[1]: box must be (x1, y1, x2, y2)"),
        ([{}, {}, {"point_coords": np.array([[1.0, 1.0]])}], ValueError, "prompts[2]: point_coords and point_labels must be given together"),
        # x = 250 is inside image 0 (300 wide) but far outside image 2 (160 wide): checked per image
        ([{}, {}, {"point_coords": np.array([[250.0, 50.0]]), "point_labels": np.array([1])}], ValueError, "prompts[2]: point_coords has a coordinate (250, 50) far outside the 160x120"),
        # 2 point prompts with 3 boxes, 2 boxes with 1 mask: the decoder would fail deep inside torch
        ([{"box": np.array([[1.0, 1.0, 5.0, 5.0]] * 3), "point_coords": np.ones((2, 1, 2)), "point_labels": np.ones((2, 1))}, {}, {}],
         ValueError, "prompts[0]: prompt counts disagree"),
        ([{}, {"box": np.array([[1.0, 1.0, 5.0, 5.0]] * 2), "mask_input": np.zeros((1, 1, 64, 64))}, {}], ValueError, "prompts[1]: prompt counts disagree"),
    ],
    ids=["too_few", "too_many", "a_dict", "unknown_key", "not_a_dict", "bad_box", "labels_missing", "outside_its_image",
         "points_vs_boxes", "boxes_vs_mask"],
)
def test_bad_predict_batch_prompts(batch, prompts, error, message):
    with pytest.raises(error, match=re.escape(message)):
        batch.predict_batch(prompts)


@pytest.mark.parametrize(
    "images, error, message",
    [
        ([], ValueError, "images is empty"),
        (np.zeros((20, 30, 3), np.uint8), TypeError, "list of images"),
        (torch.zeros(20, 30, 3, dtype=torch.uint8), TypeError, "list of images"),
        ([np.zeros((20, 30, 3), np.uint8), np.full((20, 30, 3), 2.0)], ValueError, "images[1]: float images must hold values in [0, 1]"),
        # converted in threads: the error raised is still the first bad image's
        ([np.zeros((20, 30, 3), np.uint8), np.full((20, 30, 3), 2.0), "image.png"], ValueError, "images[1]: float images must hold values in [0, 1]"),
        ([np.zeros((20, 30, 3), np.uint8), torch.full((20, 30, 3), float("nan"))], ValueError, "images[1]: image has NaN"),
        ([torch.zeros(20, 30, 3, dtype=torch.int64)], TypeError, "images[0]: torch images must be uint8"),
        ([torch.zeros(2, 20, 30, dtype=torch.uint8)], ValueError, "images[0]: torch images must have shape [H, W, C] (HWC), [C, H, W] (CHW)"),
        ([torch.zeros(3, 1, 2000, dtype=torch.uint8)], ValueError, "images[0]: image of 2000x1 (width x height) is too elongated"),
        (["image.png"], TypeError, "images[0]: image must be a numpy array, PIL image or torch tensor"),
        (torch.zeros(2, 2, 20, 30, dtype=torch.uint8), ValueError, "torch images must have shape [B, H, W, C] or [B, C, H, W] (C = 1, 3 or 4), got [2, 2, 20, 30]"),
        (torch.zeros(0, 3, 20, 30, dtype=torch.uint8), ValueError, "image is empty"),
        (torch.full((2, 20, 30, 3), 1.5), ValueError, "float images must hold values in [0, 1]"),
        (torch.zeros(1, 2, 20, 30, 3, dtype=torch.uint8), TypeError, "got a 5-D Tensor"),
    ],
    ids=[
        "empty", "numpy_image", "tensor_image", "float_range", "first_of_two_bad", "tensor_nan", "tensor_int64", "tensor_2_channels", "elongated", "path",
        "batch_2_channels", "empty_batch", "batch_float_range", "5d_tensor",
    ],
)
def test_bad_set_images_inputs(tiny_model, images, error, message):
    predictor = SamHQPredictor(tiny_model)
    with pytest.raises(error, match=re.escape(message)):
        predictor.set_images(images)
    assert not predictor.is_image_set


@pytest.mark.parametrize("batch", [torch.zeros(2, 3, 20, 30, dtype=torch.uint8), np.zeros((2, 3, 20, 30), np.uint8)], ids=["torch", "numpy"])
def test_set_image_refuses_a_batch_of_several(tiny_model, batch):
    with pytest.raises(ValueError, match=re.escape("set_image takes one image, got a batch of shape [2, 3, 20, 30]: use set_images")):
        SamHQPredictor(tiny_model).set_image(batch)


@pytest.mark.parametrize("call", ["set_images", "set_image", "set_torch_image"])
def test_a_failed_set_image_forgets_the_previous_images(tiny_model, photos, call):
    """After a failed set_image, predicting must not silently answer for the previous image(s)."""
    predictor = SamHQPredictor(tiny_model)
    predictor.set_images(photos[:2])
    bad = {
        "set_images": lambda: predictor.set_images([photos[2], np.full((5, 5, 3), 7.0)]),
        "set_image": lambda: predictor.set_image(np.full((5, 5, 3), 7.0)),
        "set_torch_image": lambda: predictor.set_torch_image(torch.zeros(1, 3, 100, 100), (100, 100)),
    }[call]
    with pytest.raises(ValueError):
        bad()
    assert predictor.num_images == 0 and predictor.features is None
    with pytest.raises(ImageNotSetError):
        predictor.predict_batch([None, None])


def test_batch_flags_must_be_booleans(batch):
    prompts = [{"box": np.array([10.0, 10.0, 60.0, 50.0])}, None, None]
    with pytest.raises(TypeError, match="hq_token_only must be True or False, got 'yes'"):
        batch.predict_batch(prompts, hq_token_only="yes")
    with pytest.raises(TypeError, match="return_torch must be True or False, got 'no'"):
        batch.predict_batch(prompts, return_torch="no")
    with pytest.raises(TypeError, match="multimask_output must be True or False, got 'False'"):
        batch.predict_batch_torch([{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]])}, None, None], multimask_output="False")
