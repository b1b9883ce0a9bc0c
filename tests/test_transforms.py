"""Image conversion, the longest-side resize and prompt-coordinate scaling (samhq_fast.transforms).

The expected values are derived by hand from the original SamPredictor (ResizeLongestSide):
new side = int(side * long_side / max(H, W) + 0.5), a PIL bilinear resize, and prompts scaled by
new_w / W on x and new_h / H on y (two different factors once the rounding kicks in).
"""

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import torch

from samhq_fast.transforms import (
    ResizeLongestSide,
    as_rgb_uint8,
    as_rgb_uint8_torch,
    load_image,
    preprocess_shape,
    resize_longest_side,
    resize_longest_side_torch,
    scale_coords,
)

from original_sam_hq import import_original

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def photo(h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    """A small RGB uint8 image with all 256 levels likely present (extremes included)."""
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[0, 0] = (0, 128, 255)
    return image


# ---------------------------------------------------------------------------------------------
# preprocess_shape / scale_coords: hand-derived values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width, long_side, expected",
    [
        (200, 300, 256, (171, 256)),  # 200 * 256/300 = 170.67 -> 171
        (330, 180, 256, (256, 140)),  # 180 * 256/330 = 139.64 -> 140 (needs the +0.5; int() alone gives 139)
        (103, 300, 256, (88, 256)),  # 103 * 256/300 = 87.89 -> 88 (int() alone gives 87)
        (256, 256, 256, (256, 256)),
        (480, 640, 1024, (768, 1024)),
        (1080, 1920, 1024, (576, 1024)),
        (333, 500, 1024, (682, 1024)),  # 681.98 -> 682
        (1500, 2250, 1024, (683, 1024)),  # 682.67 -> 683
        (10, 20, 1024, (512, 1024)),  # upscaling small images, as the original does
    ],
)
def test_preprocess_shape_hand_values(height, width, long_side, expected):
    assert preprocess_shape(height, width, long_side) == expected


@pytest.mark.parametrize("long_side", [256, 1024])
def test_preprocess_shape_ties_round_up_as_the_original(long_side):
    """With a power-of-two long side, every odd short side is an exact .5 tie (2048x1365 -> 1024x682.5):
    the original's int(x + 0.5) rounds it up, where Python's round() would go to the even neighbour.
    Every short side of a 2048-long image, both orientations, against the original's own function."""
    original = import_original().utils.transforms.ResizeLongestSide.get_preprocess_shape
    for short in range(1, 2049):
        for height, width in ((short, 2048), (2048, short)):
            assert preprocess_shape(height, width, long_side) == original(height, width, long_side)


@given(st.integers(1, 6000), st.integers(1, 6000), st.sampled_from([256, 1024]))
@settings(max_examples=300, deadline=None)
def test_preprocess_shape_properties(height, width, long_side):
    """The longest side lands exactly on long_side and the other is the (float) round-half-up of
    side * scale, as int(x * scale + 0.5) in the original."""
    new_h, new_w = preprocess_shape(height, width, long_side)
    assert max(new_h, new_w) == long_side
    # exact rational value of side * long_side / max side; the float formula may only differ at an exact .5 tie
    for old, new in ((height, new_h), (width, new_w)):
        exact = old * long_side / max(height, width)
        assert abs(new - exact) <= 0.5 + 1e-9


@pytest.mark.parametrize(
    "original_size, point, expected",
    [
        # H=200, W=300 -> 171 x 256: x by 256/300, y by 171/200 (not 256/300: the rounding changes it)
        ((200, 300), (150.0, 100.0), (128.0, 85.5)),
        ((200, 300), (300.0, 200.0), (256.0, 171.0)),  # the far corner maps to the resized image's corner
        ((200, 300), (0.0, 0.0), (0.0, 0.0)),
        # H=330, W=180 -> 256 x 140: x by 140/180, y by 256/330
        ((330, 180), (90.0, 165.0), (70.0, 128.0)),
        ((330, 180), (180.0, 330.0), (140.0, 256.0)),
        # H=103, W=300 -> 88 x 256
        ((103, 300), (30.0, 103.0), (25.6, 88.0)),
        # slightly outside the image (allowed by the predictor): the same linear map
        ((200, 300), (-3.0, 210.0), (-3 * 256 / 300, 210 * 171 / 200)),
    ],
)
def test_scale_coords_hand_values(original_size, point, expected):
    out = scale_coords(np.array([point]), original_size, 256)
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-9)


def test_scale_coords_keeps_batch_shape_and_does_not_modify_input():
    coords = np.array([[[10.0, 20.0], [30.0, 40.0]], [[1.0, 2.0], [3.0, 4.0]]])
    before = coords.copy()
    out = scale_coords(coords, (200, 300), 256)
    assert out.shape == coords.shape and out.dtype == np.float64
    np.testing.assert_array_equal(coords, before)
    np.testing.assert_allclose(out[..., 0], coords[..., 0] * 256 / 300)
    np.testing.assert_allclose(out[..., 1], coords[..., 1] * 171 / 200)


def test_coordinate_maps_take_whole_number_float_sizes():
    """The original takes (1080.0, 1920.0) as an original_size: so do the maps (a fraction is refused below)."""
    transform = ResizeLongestSide(1024)
    np.testing.assert_array_equal(transform.apply_coords(np.array([[960.0, 540.0]]), (1080.0, np.float64(1920))), [[512.0, 288.0]])
    torch.testing.assert_close(transform.apply_boxes_torch(torch.tensor([[960.0, 540.0, 1920.0, 1080.0]]), (1080.0, 1920.0)),
                               torch.tensor([[512.0, 288.0, 1024.0, 576.0]]))


@pytest.mark.parametrize("original_size", [(0, 300), (200, 0), (200.5, 300), (-1, 300), (200,)])
@pytest.mark.parametrize("method", ["apply_coords", "apply_boxes", "apply_coords_torch", "apply_boxes_torch"])
def test_coordinate_maps_reject_a_bad_original_size(original_size, method):
    """An empty or malformed original frame is a ValueError naming it (a zero side divided by zero)."""
    boxes = np.array([[10.0, 20.0, 30.0, 40.0]])
    arg = torch.from_numpy(boxes) if method.endswith("torch") else boxes
    with pytest.raises(ValueError, match="original_size must be"):
        getattr(ResizeLongestSide(256), method)(arg, original_size)


# ---------------------------------------------------------------------------------------------
# resize_longest_side: PIL bilinear, as the original's torchvision resize of a PIL image
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(200, 300), (330, 180), (103, 300), (300, 300)])
def test_resize_longest_side_is_pil_bilinear(shape):
    image = photo(*shape)
    out = resize_longest_side(image, 256)
    new_h, new_w = preprocess_shape(*shape, 256)
    expected = np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    assert out.shape == (new_h, new_w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_resize_longest_side_keeps_an_image_already_at_size():
    image = photo(171, 256)
    np.testing.assert_array_equal(resize_longest_side(image, 256), image)
    kept = ResizeLongestSide(256).apply_image(image)  # the original's apply_image: always a new array
    np.testing.assert_array_equal(kept, image)
    assert not np.shares_memory(kept, image)


def test_resize_longest_side_rejects_an_image_whose_short_side_rounds_to_zero():
    # 1 x 1000 -> 0.256 x 256: the short side would vanish; the error must say so (not PIL's bare message)
    with pytest.raises(ValueError, match="elongated"):
        resize_longest_side(np.zeros((1, 1000, 3), np.uint8), 256)


# ---------------------------------------------------------------------------------------------
# as_rgb_uint8: every accepted input equals the plain RGB uint8 image
# ---------------------------------------------------------------------------------------------


def _conversions(rgb: np.ndarray) -> dict:
    gray = rgb[..., 1]
    return {
        "rgb": (rgb, "RGB", rgb),
        "bgr": (np.ascontiguousarray(rgb[..., ::-1]), "BGR", rgb),
        "bgr_view": (rgb[..., ::-1], "BGR", rgb),  # negative strides, as cv2-style img[..., ::-1]
        "rgba": (np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "RGB", rgb),
        "bgra": (np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 7, np.uint8)]), "BGR", rgb),
        "gray_2d": (gray, "RGB", np.repeat(gray[..., None], 3, axis=2)),
        "gray_hw1": (gray[..., None], "RGB", np.repeat(gray[..., None], 3, axis=2)),
        "uint16": (rgb.astype(np.uint16) * 257, "RGB", rgb),
        "uint16_big_endian": ((rgb.astype(np.uint16) * 257).astype(">u2"), "RGB", rgb),
        "float16_big_endian": ((rgb / 255.0).astype(">f2"), "RGB", rgb),
        "float64_unit": (rgb / 255.0, "RGB", rgb),
        "float32_unit": ((rgb / 255.0).astype(np.float32), "RGB", rgb),
        "int64_0_255": (rgb.astype(np.int64), "RGB", rgb),
        "bool": (rgb > 127, "RGB", (rgb > 127).astype(np.uint8) * 255),
        "pil_rgb": (Image.fromarray(rgb), "RGB", rgb),
        "pil_rgba": (Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])), "RGB", rgb),
        "pil_gray": (Image.fromarray(gray), "RGB", np.repeat(gray[..., None], 3, axis=2)),
        "pil_uint16": (Image.fromarray(gray.astype(np.uint16) * 257), "RGB", np.repeat(gray[..., None], 3, axis=2)),
        # image_format describes the pixel data, also in a PIL image built from an OpenCV (BGR) array
        "pil_bgr": (Image.fromarray(np.ascontiguousarray(rgb[..., ::-1])), "BGR", rgb),
        "lowercase_bgr": (np.ascontiguousarray(rgb[..., ::-1]), "bgr", rgb),
        "batch_of_one": (rgb[None], "RGB", rgb),  # [1, H, W, 3], as torch images may be
        "gray_batch_of_one": (gray[None, ..., None], "RGB", np.repeat(gray[..., None], 3, axis=2)),
    }


@pytest.mark.parametrize("kind", list(_conversions(photo(3, 3))))
def test_as_rgb_uint8_accepted_inputs(kind):
    image, image_format, expected = _conversions(photo())[kind]
    out = as_rgb_uint8(image, image_format)
    assert out.dtype == np.uint8 and out.shape == expected.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA", "1", "L", "RGBA", "YCbCr"])
def test_pil_modes_convert_as_pil_does(mode):
    """Palette, CMYK, gray + alpha, bilevel...: the pixels PIL's own convert("RGB") gives."""
    image = Image.fromarray(photo()).convert(mode)
    np.testing.assert_array_equal(as_rgb_uint8(image), np.asarray(image.convert("RGB")))


def test_pil_float_image_is_read_as_a_float_array():
    """Mode "F" (32-bit float gray) follows the numpy float rule (values in [0, 1]); PIL's convert("RGB")
    would clip it to a black image."""
    levels = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(as_rgb_uint8(Image.fromarray(levels, mode="F")), as_rgb_uint8(levels))
    assert as_rgb_uint8(levels)[..., 0].max() == 255
    with pytest.raises(ValueError, match=re.escape("[0, 1]")):
        as_rgb_uint8(Image.fromarray(levels * 255, mode="F"))


@pytest.mark.parametrize(
    "values, expected",
    [
        # uint16 spans 0..65535: nearest uint8 level is round(v / 257) (65535 -> 255, not 256 -> 0)
        (np.array([0, 128, 129, 385, 386, 32767, 65535], np.uint16), [0, 0, 1, 1, 2, 127, 255]),
        # float in [0, 1]: round(v * 255)
        (np.array([0.0, 0.0019, 0.0021, 0.5, 0.998, 1.0]), [0, 0, 1, 128, 254, 255]),
    ],
    ids=["uint16", "float"],
)
def test_as_rgb_uint8_rounds_to_the_nearest_level(values, expected):
    out = as_rgb_uint8(values[None, :])  # a 1 x n grayscale image
    np.testing.assert_array_equal(out[0, :, 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_as_rgb_uint8_does_not_modify_the_input(image_format):
    # (an already RGB uint8 contiguous input may come back as the same array, like np.asarray)
    rgba = np.dstack([photo(), np.full((37, 53), 7, np.uint8)])
    before = rgba.copy()
    as_rgb_uint8(rgba, image_format)
    np.testing.assert_array_equal(rgba, before)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.full((4, 4, 3), 1.5), ValueError, "[0, 1]"),
        (np.full((4, 4, 3), -0.1), ValueError, "[0, 1]"),
        (np.full((4, 4, 3), 255.0), ValueError, "[0, 1]"),  # 0..255 floats: a classic mistake
        (np.full((4, 4, 3), np.nan), ValueError, "NaN"),
        (np.full((4, 4, 3), np.inf, np.float32), ValueError, "NaN or infinite"),
        (np.full((4, 4, 3), 300, np.int32), ValueError, "outside 0..255"),
        (np.full((4, 4, 3), -1, np.int16), ValueError, "outside 0..255"),
        (np.zeros((0, 5, 3), np.uint8), ValueError, "empty"),
        (np.zeros((5, 0, 3), np.uint8), ValueError, "empty"),
        (np.zeros((0, 5), np.float32), ValueError, "empty"),
        (np.zeros((2, 4, 4, 3), np.uint8), ValueError, "shape"),
        (np.zeros((4, 4, 2), np.uint8), ValueError, "shape"),
        (np.zeros((4, 4, 5), np.uint8), ValueError, "shape"),
        (np.zeros(4, np.uint8), ValueError, "shape"),
        (np.zeros((4, 4, 3), np.complex64), TypeError, "dtype"),
        (np.zeros((4, 4, 3), object), TypeError, "dtype"),
        ([[0, 1], [2, 3]], TypeError, "numpy array or PIL image"),
        ("image.png", TypeError, "numpy array or PIL image"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_as_rgb_uint8_rejects_bad_images(image, error, message):
    with pytest.raises(error, match=re.escape(message)):
        as_rgb_uint8(image)


@pytest.mark.parametrize("mode", ["I", "I;16"])
def test_pil_16_bit_grayscale_is_rescaled(mode):
    # 16-bit PNGs open as "I;16" (or 32-bit "I" in older Pillow/files): the full 0..65535 range maps to 0..255.
    levels = np.array([[0, 257, 65535], [128 * 257, 1000, 64000]])
    image = Image.fromarray(levels.astype(np.int32 if mode == "I" else np.uint16), mode=mode if mode == "I" else None)
    expected = np.round(levels / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(as_rgb_uint8(image), np.repeat(expected[:, :, None], 3, axis=2))


def test_pil_32_bit_integer_beyond_16_bits_is_rejected():
    image = Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I")
    with pytest.raises(ValueError, match="outside 0..65535"):
        as_rgb_uint8(image)


def test_as_rgb_uint8_rejects_an_unknown_image_format():
    with pytest.raises(ValueError, match="image_format"):
        as_rgb_uint8(photo(), "RGBA")


# ---------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------


def test_load_image_reads_rgb_and_applies_exif_orientation(tmp_path):
    rgb = photo(20, 30)
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(load_image(tmp_path / "plain.png"), rgb)

    # EXIF orientation 6 (rotate 90 degrees clockwise to display): the loaded image is the displayed one
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rotated.png", exif=exif.tobytes())
    loaded = load_image(tmp_path / "rotated.png")
    np.testing.assert_array_equal(loaded, np.rot90(rgb, k=-1))


def test_load_image_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    rgb = photo(20, 30)
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(load_image("~/plain.png"), rgb)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path} is a folder, not an image file")):
        load_image(tmp_path)
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="could not read image"):
        load_image(tmp_path / "junk.png")


def test_load_image_past_pils_size_limit(tmp_path, monkeypatch):
    """PIL refuses images over twice MAX_IMAGE_PIXELS with its own DecompressionBombError (not an
    OSError): a ValueError naming the way out, and the image loads once the user raises the limit."""
    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 600 pixels > 2 x 100
    with pytest.raises(ValueError, match=re.escape("is too large to read safely")) as info:
        load_image(tmp_path / "big.png")
    assert "MAX_IMAGE_PIXELS" in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(tmp_path / "big.png").shape == (20, 30, 3)


# ---------------------------------------------------------------------------------------------
# resize_longest_side_torch: the device-side resize, against PIL
# ---------------------------------------------------------------------------------------------


def _pil_vs_torch(image: np.ndarray, long_side: int, device: str = "cpu") -> tuple[int, float]:
    """-> (max abs difference in uint8 levels, fraction of identical values) of the torch resize on
    `device` against PIL."""
    new_h, new_w = preprocess_shape(*image.shape[:2], long_side)
    expected = np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)).astype(np.int64)
    out = resize_longest_side_torch(torch.from_numpy(image).to(device).permute(2, 0, 1)[None], long_side)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, new_h, new_w) and out.device.type == device
    diff = np.abs(out[0].permute(1, 2, 0).cpu().numpy().astype(np.int64) - expected)
    return int(diff.max()), float(np.mean(diff == 0))


# Measured with PIL 13 / torch 2.13 on the CPU, sizes W x H (max level difference, identical values):
#   chelsea 451x300 -> 256: 1, 99.842 %     chelsea -> 200: 1, 99.919 %     noise 640x480 -> 256: 1, 99.959 %
#   chelsea -> 1024 (upscale), noise 640x480 -> 1024, noise 90x120 -> 256: 0, 100 % (every pixel equal)
# The bounds below keep the measured maximum (1 level) and leave headroom on the fraction
# (99.5 % for downscales, 99.9 % for upscales), so a different float kernel may move a few
# more .5-boundary values without failing; a real change of filter (no antialias, no
# intermediate rounding: ~80-88 % identical) would fail.
PIL_CASES = {
    "chelsea_down_256": ("chelsea", 256, 0.995),
    "chelsea_down_200": ("chelsea", 200, 0.995),
    "noise_down_256": ("noise_480x640", 256, 0.995),
    "chelsea_up_1024": ("chelsea", 1024, 0.999),
    "noise_up_1024": ("noise_480x640", 1024, 0.999),
    "small_noise_up_256": ("noise_120x90", 256, 0.999),
    # One pixel wide / high after the resize (torch's CPU kernel mishandles a width of 1 alone).
    # Measured: 100 %, 90.36 %, 99.09 % identical, max 1 level. The two downscales are a 10-to-1
    # pass and a ~12x one: the first pass's rounding flips (~0.6 % of its values) reach ~23 source
    # rows each of the second.
    "one_wide_up_1024": ("noise_1000x1", 1024, 0.999),
    "one_wide_down_256": ("noise_3000x10", 256, 0.85),
    "one_high_down_256": ("noise_10x3000", 256, 0.98),
}


def _pil_case_image(name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if name == "chelsea":
        return np.array(Image.open(ASSETS / "chelsea.jpg").convert("RGB"))
    height, width = map(int, name.removeprefix("noise_").split("x"))
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # video frames resize on the GPU
@pytest.mark.parametrize("case", list(PIL_CASES))
def test_resize_longest_side_torch_is_close_to_pil(case, device):
    name, long_side, min_identical = PIL_CASES[case]
    max_diff, identical = _pil_vs_torch(_pil_case_image(name), long_side, device)
    assert max_diff <= 1, f"{case}: a value is {max_diff} levels away from PIL's"
    assert identical >= min_identical, f"{case}: only {identical:.4%} of the values equal PIL's"


def test_resize_longest_side_torch_keeps_an_image_already_at_size():
    images = torch.from_numpy(photo(171, 256)).permute(2, 0, 1)[None]
    assert resize_longest_side_torch(images, 256) is images  # no interpolation at all: exact


def test_resize_longest_side_torch_batch_equals_one_by_one():
    images = [torch.from_numpy(photo(200, 300, seed=s)).permute(2, 0, 1)[None] for s in range(3)]
    batch = resize_longest_side_torch(torch.cat(images), 256)
    for i, image in enumerate(images):
        assert torch.equal(batch[i : i + 1], resize_longest_side_torch(image, 256))


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(1, 3, 10, 10), "uint8 tensor [B, 3, H, W]"),
        (torch.zeros(3, 10, 10, dtype=torch.uint8), "uint8 tensor [B, 3, H, W]"),
        (torch.zeros(1, 10, 10, 3, dtype=torch.uint8), "uint8 tensor [B, 3, H, W]"),
        (np.zeros((1, 3, 10, 10), np.uint8), "uint8 tensor [B, 3, H, W]"),
        (torch.zeros(1, 3, 1, 1000, dtype=torch.uint8), "elongated"),
    ],
    ids=["float", "3d", "channels_last", "numpy", "elongated"],
)
def test_resize_longest_side_torch_rejects_bad_input(images, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resize_longest_side_torch(images, 256)


# ---------------------------------------------------------------------------------------------
# as_rgb_uint8_torch: torch images (HWC or CHW, uint8 or float in [0, 1]) -> RGB uint8 [1, 3, H, W]
# ---------------------------------------------------------------------------------------------


def _torch_conversions(rgb: np.ndarray) -> dict:
    hwc = torch.from_numpy(rgb)
    return {
        "hwc_uint8": (hwc, "RGB"),
        "chw_uint8": (hwc.permute(2, 0, 1), "RGB"),  # a non-contiguous view
        "chw_contiguous": (hwc.permute(2, 0, 1).contiguous(), "RGB"),
        "hwc_bgr": (hwc.flip(-1), "BGR"),
        "chw_bgr": (hwc.permute(2, 0, 1).flip(0), "BGR"),
        "hwc_float32": (hwc.float() / 255, "RGB"),
        "chw_float64": (hwc.permute(2, 0, 1).double() / 255, "RGB"),
        "hwc_float16": (hwc.half() / 255, "RGB"),
        "hwc_rgba": (torch.cat([hwc, torch.full_like(hwc[..., :1], 9)], dim=-1), "RGB"),  # alpha dropped
        "chw_bgra": (torch.cat([hwc.flip(-1), torch.full_like(hwc[..., :1], 9)], dim=-1).permute(2, 0, 1), "BGR"),
    }


@pytest.mark.parametrize("layout", ["hw", "hw1", "1hw", "hw_float"])
def test_as_rgb_uint8_torch_gray_equals_numpy(layout):
    gray = photo()[..., 0]
    image = {"hw": torch.from_numpy(gray), "hw1": torch.from_numpy(gray)[..., None], "1hw": torch.from_numpy(gray)[None],
             "hw_float": torch.from_numpy(gray).double() / 255}[layout]
    out = as_rgb_uint8_torch(image)
    assert out.shape == (1, 3, 37, 53) and out.is_contiguous()
    np.testing.assert_array_equal(out[0].permute(1, 2, 0).numpy(), as_rgb_uint8(gray))


@pytest.mark.parametrize("kind", list(_torch_conversions(photo(2, 2))))
def test_as_rgb_uint8_torch_accepted_inputs(kind):
    rgb = photo()
    image, image_format = _torch_conversions(rgb)[kind]
    out = as_rgb_uint8_torch(image, image_format)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 37, 53) and out.is_contiguous()
    np.testing.assert_array_equal(out[0].permute(1, 2, 0).numpy(), rgb)


def test_float16_numpy_rounds_as_float32():
    """x * 255 in float16 is up to one level off (0.7 -> 178.5 -> 178 instead of 179): float16 numpy
    images are scaled in float32, as torch ones."""
    values = np.linspace(0, 1, 1801, dtype=np.float16)[None, :]
    expected = np.round(values.astype(np.float32) * 255).astype(np.uint8)
    got = as_rgb_uint8(values)[..., 0]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(as_rgb_uint8_torch(torch.from_numpy(values))[0, 0].numpy(), got)


def test_as_rgb_uint8_torch_rounds_floats_as_numpy():
    values = torch.tensor([0.0, 0.0019, 0.0021, 0.5, 0.998, 1.0, 0.5 / 255, 1.5 / 255], dtype=torch.float64)
    image = values[None, :, None].expand(-1, -1, 3)  # 1 x n, HWC
    expected = as_rgb_uint8(values.numpy()[None, :])
    np.testing.assert_array_equal(as_rgb_uint8_torch(image)[0].permute(1, 2, 0).numpy(), expected)


def test_as_rgb_uint8_torch_hwc_wins_when_both_dims_are_3():
    image = torch.arange(3 * 5 * 3, dtype=torch.uint8).reshape(3, 5, 3)  # 3 rows, 5 columns, RGB (as numpy)
    out = as_rgb_uint8_torch(image)
    assert out.shape == (1, 3, 3, 5)
    assert torch.equal(out[0], image.permute(2, 0, 1))


@pytest.mark.parametrize("kind", list(_torch_conversions(photo(2, 2))))
def test_as_rgb_uint8_torch_batch_equals_its_images(kind):
    """batched=True: a [B, ...] stack of images converts to the stack of their single conversions."""
    images = [_torch_conversions(photo(seed=seed))[kind] for seed in (1, 2)]
    image_format = images[0][1]
    out = as_rgb_uint8_torch(torch.stack([image for image, _ in images]), image_format, batched=True)
    assert out.shape == (2, 3, 37, 53) and out.is_contiguous()
    assert torch.equal(out, torch.cat([as_rgb_uint8_torch(image, image_format) for image, _ in images]))
    assert not torch.equal(out[0], out[1])


def test_as_rgb_uint8_torch_batched_needs_a_batch_axis():
    with pytest.raises(ValueError, match=re.escape("[B, H, W, C] or [B, C, H, W] (C = 1, 3 or 4), got [4, 4, 3]")):
        as_rgb_uint8_torch(torch.zeros(4, 4, 3, dtype=torch.uint8), batched=True)


@pytest.mark.parametrize(
    "image, image_format, error, message",
    [
        (torch.full((4, 4, 3), 1.5), "RGB", ValueError, "[0, 1]"),
        (torch.full((3, 4, 4), -0.1), "RGB", ValueError, "[0, 1]"),
        (torch.full((4, 4, 3), 255.0), "RGB", ValueError, "[0, 1]"),
        (torch.full((4, 4, 3), float("nan")), "RGB", ValueError, "NaN"),
        (torch.full((4, 4, 3), float("inf")), "RGB", ValueError, "NaN or infinite"),
        (torch.zeros(4, 4, 3, dtype=torch.int32), "RGB", TypeError, "uint8"),
        (torch.zeros(4, 4, 3, dtype=torch.bool), "RGB", TypeError, "uint8"),
        (torch.zeros(5, 6, 2, dtype=torch.uint8), "RGB", ValueError, "[H, W, C] (HWC), [C, H, W] (CHW) (C = 1, 3 or 4) or [H, W], got [5, 6, 2]"),
        (torch.zeros(5, 4, 6, dtype=torch.uint8), "RGB", ValueError, "[H, W, C] (HWC), [C, H, W] (CHW)"),
        (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), "RGB", ValueError, "[H, W, C] (HWC), [C, H, W] (CHW)"),
        (torch.zeros(4, dtype=torch.uint8), "RGB", ValueError, "[H, W, C] (HWC), [C, H, W] (CHW)"),
        (torch.zeros(0, 4, 3, dtype=torch.uint8), "RGB", ValueError, "empty"),
        (torch.zeros(3, 4, 0, dtype=torch.uint8), "RGB", ValueError, "empty"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), "HSV", ValueError, "image_format"),
        (np.zeros((4, 4, 3), np.uint8), "RGB", TypeError, "torch.Tensor"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_as_rgb_uint8_torch_rejects_bad_images(image, image_format, error, message):
    with pytest.raises(error, match=re.escape(message)):
        as_rgb_uint8_torch(image, image_format)
