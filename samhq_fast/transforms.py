"""Image loading and conversion, the longest-side resize, and prompt-coordinate scaling.

Frames: "original" is the user's image (H, W); "input" is the image resized so its longest side
equals the model's image size (1024), before padding. Coordinates are (x, y) pixels.
"""

import numbers
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError


def check_image_size(size, name: str) -> tuple[int, int]:
    """An image's (H, W): a tuple, list, torch.Size, or 2-element tensor / array of positive
    integers (whole-number floats such as 1080.0 too, as the original takes them) -> (H, W) as
    Python ints; anything else is a ValueError naming `name`."""
    values = size.tolist() if isinstance(size, (np.ndarray, torch.Tensor)) else size
    if not (isinstance(values, (tuple, list)) and len(values) == 2
            and all(isinstance(s, numbers.Real) and not isinstance(s, bool) and float(s).is_integer() and s > 0 for s in values)):
        raise ValueError(f"{name} must be (H, W), two positive integers, got {size!r}")
    return int(values[0]), int(values[1])


FLOAT_IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # (not float8: torch cannot check its values)


def check_flags(**flags) -> None:
    """Boolean options must be booleans (or 0 / 1): a string such as "False" is truthy and would
    silently give the other output."""
    for name, value in flags.items():
        if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1))):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def check_resized_pixels(image: torch.Tensor, name: str) -> None:
    """A resized image the model takes as it is (set_torch_image, the model's forward): RGB on a
    0..255 scale, uint8 or float. Refuses other dtypes, meta tensors and float NaN / inf or values
    outside 0..255 (one host sync, float input only); warns when every value is within [0, 1] (not
    all 0)."""
    if image.is_meta:
        raise ValueError(f"{name} is on the meta device: it holds no pixels")
    if image.dtype != torch.uint8 and image.dtype not in FLOAT_IMAGE_DTYPES:
        raise TypeError(f"{name} must be uint8 or float16/bfloat16/float32/float64 on a 0..255 scale, got {image.dtype}")
    if image.is_floating_point() and image.numel():
        nonfinite, below, above, unit = torch.stack([
            ~torch.isfinite(image).all(), (image < 0).any(), (image > 255).any(), (image <= 1).all() & (image > 0).any()]).tolist()
        if nonfinite:
            raise ValueError(f"{name} has NaN or infinite values")
        if below or above:
            raise ValueError(f"{name} has values outside 0..255: RGB pixels on a 0..255 scale are expected")
        if unit:
            warnings.warn(f"{name}: every value is within [0, 1], but the scale is 0..255 (multiply by 255?)", stacklevel=3)


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `long_side`, rounded as the original does."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class ImageTooLargeError(ValueError):
    """An image over PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, twice over)."""


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file ("~" expanded) -> RGB uint8 [H, W, 3] (EXIF orientation applied)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return as_rgb_uint8(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"image {path} is too large to read safely ({e}): if you trust the file, set PIL.Image.MAX_IMAGE_PIXELS "
            "higher (or to None) first"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"could not read image {path}: {e}") from e


def _float_range_error(low: float, high: float) -> ValueError:
    return ValueError(f"float images must hold values in [0, 1] (got {low:.4g}..{high:.4g}); pass uint8 for 0..255 data")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if not array.dtype.isnative:  # big-endian data (e.g. from a FITS or PNG reader): same values, native order
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:  # 16-bit images: rescale the full range
        return np.round(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if array.dtype == np.float16:  # x * 255 in float16 is up to a level off: round as the torch path does
            array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("image has NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise _float_range_error(array.min(), array.max())
        return np.round(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"integer image of dtype {array.dtype} has values outside 0..255; pass uint8 or uint16")
        return array.astype(np.uint8)
    raise TypeError(f"unsupported image dtype {array.dtype}")


def channel_order(image_format: str) -> str:
    """"RGB" or "BGR" (any case) -> "RGB" / "BGR"; anything else is a ValueError."""
    if not isinstance(image_format, str) or image_format.upper() not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    return image_format.upper()


def as_rgb_uint8(image, image_format: str = "RGB") -> np.ndarray:
    """numpy [H, W], [H, W, 1|3|4] (or a batch of one, [1, H, W, C]) or a PIL image -> contiguous
    RGB uint8 [H, W, 3].

    Grayscale is replicated to 3 channels, alpha is dropped, 16-bit is taken as the full 0..65535
    range and rescaled, float must be in [0, 1]. image_format: channel order of the pixel data,
    "RGB" or "BGR" (a PIL image built from a BGR array, e.g. OpenCV's, is BGR too). A PIL image is
    taken as stored: its EXIF orientation is not applied (`load_image` applies it).
    """
    image_format = channel_order(image_format)
    if isinstance(image, Image.Image):
        if image.mode.startswith("I"):  # 16-bit grayscale opens as "I;16*" or, in older files, 32-bit "I"
            image = np.asarray(image)
            if image.min() < 0 or image.max() > 65535:
                raise ValueError("integer image (PIL mode I) has values outside 0..65535")
            image = image.astype(np.uint16)
        elif image.mode == "F":  # float grayscale: must be in [0, 1] like float arrays
            image = np.asarray(image)
        else:
            image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array or PIL image, got {type(image).__name__}")
    if image.ndim == 4 and image.shape[0] == 1:  # a batch of one, as torch images may be
        image = image[0]
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        channels_first = image.ndim == 3 and image.shape[0] in (1, 3, 4)
        hint = " (channels first? numpy images are [H, W, C]: pass image.transpose(1, 2, 0))" if channels_first else ""
        raise ValueError(f"image must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {list(image.shape)}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty (shape {list(image.shape)})")
    image = _to_uint8(image)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    image = image[:, :, :3]
    if image_format == "BGR":
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """uint8 [H, W, 3] (or [H, W], [H, W, 4]) -> [h, w, ...] with max(h, w) == long_side (PIL bilinear,
    antialiased, as the original)."""
    h, w = check_resized_shape(image.shape[0], image.shape[1], long_side)
    if (h, w) == image.shape[:2]:  # PIL's resize to the same size is a copy
        return image
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def check_resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """preprocess_shape's (h, w), refusing an image whose short side would resize to 0 pixels."""
    h, w = preprocess_shape(height, width, long_side)
    if min(h, w) < 1:
        raise ValueError(
            f"image of {width}x{height} (width x height) is too elongated: "
            f"its short side would be 0 pixels once the long side is resized to {long_side}"
        )
    return h, w


def as_rgb_uint8_torch(
    image: torch.Tensor, image_format: str = "RGB", device: torch.device | str | None = None, batched: bool = False
) -> torch.Tensor:
    """A torch image [H, W, C] (HWC, as numpy), [C, H, W] (CHW) or [H, W] (gray), C = 3 (RGB), 4 (with
    alpha) or 1 (gray) -> RGB uint8 [1, 3, H, W] on `device`; with batched=True, same-size images
    [B, H, W, C] or [B, C, H, W] -> [B, 3, H, W].

    uint8 is taken as is; floating point must be in [0, 1] and is rounded to round(x * 255) as
    numpy floats are (`as_rgb_uint8`). Gray is replicated to 3 channels and alpha dropped, as for
    numpy. HWC wins where both read (a [3, H, 3] tensor is HWC, the numpy layout). Shape and dtype
    checks read only metadata; uint8 input needs no host sync at all, while the NaN / range check of
    a float input reads one small tensor back (one sync, float input only).
    """
    image_format = channel_order(image_format)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8 and image.dtype not in FLOAT_IMAGE_DTYPES:
        raise TypeError(f"torch images must be uint8 (0..255) or float16/bfloat16/float32/float64 in [0, 1], got dtype {image.dtype}")
    if image.is_meta:
        raise ValueError("image is on the meta device: it holds no pixels")
    layouts = "[B, H, W, C] or [B, C, H, W] (C = 1, 3 or 4)" if batched else "[H, W, C] (HWC), [C, H, W] (CHW) (C = 1, 3 or 4) or [H, W]"
    if not batched and image.ndim == 2:  # [H, W] gray
        images = image[None, None]
    elif image.ndim != (4 if batched else 3):
        raise ValueError(f"torch images must have shape {layouts}, got {list(image.shape)}")
    else:
        images = image if batched else image[None]  # [B, ...]
        if images.shape[-1] in (1, 3, 4):
            images = images.permute(0, 3, 1, 2)  # BHWC -> BCHW
        elif images.shape[1] not in (1, 3, 4):
            raise ValueError(f"torch images must have shape {layouts}, got {list(image.shape)}")
    if images.numel() == 0:
        raise ValueError(f"image is empty (shape {list(image.shape)})")
    images = images[:, :3].expand(-1, 3, -1, -1)  # drop alpha; replicate gray
    images = images.to(device)
    if images.dtype.is_floating_point:
        # one host sync, float input only: both flags come back in one read
        nonfinite, out_of_range = torch.stack([~torch.isfinite(images).all(), ((images < 0) | (images > 1)).any()]).tolist()
        if nonfinite:
            raise ValueError("image has NaN or infinite values")
        if out_of_range:  # (a second read, on the error path only)
            raise _float_range_error(images.amin().item(), images.amax().item())
        if images.dtype in (torch.float16, torch.bfloat16):
            images = images.float()
        images = torch.round(images * 255.0).to(torch.uint8)  # round half to even (fp32, or fp64 for fp64 input), as np.round
    if image_format == "BGR":
        images = images.flip(1)
    return images.contiguous()


def resize_longest_side_torch(images: torch.Tensor, long_side: int) -> torch.Tensor:
    """RGB uint8 [B, 3, H, W] -> uint8 [B, 3, h, w] with max(h, w) == long_side, on the images' device.

    Mimics PIL's antialiased bilinear resize (what `resize_longest_side` and the original use) with
    `F.interpolate(mode="bilinear", antialias=True, align_corners=False)` in float32: like PIL, it
    resizes the width first, then the height, rounds each pass to uint8 (round half up, clamped to
    0..255) and skips a pass whose size does not change (so an image already at size is returned
    unchanged). What is left is PIL's fixed-point (22-bit) filter weights against float32 ones, so
    a pixel may differ by one level where the exact value sits next to a .5 rounding boundary.
    Measured against PIL 13 (torch 2.13, CPU; sizes W x H; see tests/test_transforms.py):
      - upscales (assets/chelsea.jpg 451x300 -> 1024x681, uniform noise 640x480 -> 1024x768 and
        90x120 -> 192x256): identical, every pixel;
      - downscales (chelsea.jpg -> 256x170 and -> 200x133, noise 640x480 -> 256x192): at most 1
        level apart, 99.84 % / 99.92 % / 99.96 % of the values identical;
      - one pixel wide or high after the resize (noise 1x1000 -> 1x1024, 10x3000 -> 1x256,
        3000x10 -> 256x1): at most 1 level apart (100 % / 90.4 % / 99.1 % identical: in the
        extreme downscales one pass's rounding flips spread over the next pass's wide filter).
    A single float pass without the intermediate rounding would be ~80-88 % identical (also max 1).
    Needs no host sync.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        what = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor [B, 3, H, W], got {what}")
    height, width = images.shape[-2:]
    h, w = check_resized_shape(height, width, long_side)
    if (h, w) == (height, width):
        return images
    x = images.float()
    if w != width:  # horizontal pass first, as PIL
        x = _bilinear_aa_round(x, (height, w))
    if h != height:
        x = _bilinear_aa_round(x, (h, w))
    return x.to(torch.uint8)


def _bilinear_aa_round(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One antialiased bilinear pass rounded as PIL rounds its 8-bit output: floor(v + 0.5) clamped to 0..255."""
    if x.shape[-1] == 1 and size[1] == 1:
        # torch 2.13's CPU antialiased kernel returns the first row repeated for a one-pixel-wide
        # image; a width of 2 resized to 2 weights each column by exactly 1 and 0: same function.
        return _bilinear_aa_round(x.expand(*x.shape[:-1], 2), (size[0], 2))[..., :1]
    out = F.interpolate(x, size, mode="bilinear", antialias=True, align_corners=False)
    return torch.floor(out.add_(0.5)).clamp_(0, 255)


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """(x, y) pixel coordinates [..., 2] in the original frame -> the resized input frame (float64)."""
    old_h, old_w = check_image_size(original_size, "original_size")
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    coords = np.array(coords, dtype=np.float64)
    coords[..., 0] *= new_w / old_w
    coords[..., 1] *= new_h / old_h
    return coords


class ResizeLongestSide:
    """The original predictor's `predictor.transform`: the resize to the model's input frame (longest
    side = target_length) for images, and the matching map of (x, y) pixel coordinates from an
    image's original frame (original_size = (H, W)) to that input frame."""

    def __init__(self, target_length: int):
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(old_h: int, old_w: int, long_side_length: int) -> tuple[int, int]:
        return preprocess_shape(old_h, old_w, long_side_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W] or [H, W, C] -> [h, w] / [h, w, C] (PIL bilinear, antialiased, as the original)."""
        image = np.asarray(image)
        resized = resize_longest_side(image, self.target_length)
        return resized.copy() if resized is image else resized  # always a new array, as the original's

    def apply_image_torch(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, h, w] on the images' device: uint8 RGB by `resize_longest_side_torch`
        (PIL's rounding), floating point as the original (one antialiased bilinear pass, float32 out)."""
        if isinstance(images, torch.Tensor) and images.ndim != 4:
            raise ValueError(f"apply_image_torch takes a batch [B, C, H, W], as the original, got shape {list(images.shape)}")
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            size = check_resized_shape(*images.shape[-2:], self.target_length)
            return F.interpolate(images.float(), size, mode="bilinear", align_corners=False, antialias=True)
        return resize_longest_side_torch(images, self.target_length)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(x, y) [..., 2] -> float64 [..., 2] in the input frame."""
        return scale_coords(coords, original_size, self.target_length)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(x1, y1, x2, y2) [..., 4] -> float64 [N, 4] in the input frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """(x, y) [..., 2] -> float32 [..., 2] in the input frame, on the coordinates' device (no host sync)."""
        old_h, old_w = check_image_size(original_size, "original_size")
        new_h, new_w = preprocess_shape(old_h, old_w, self.target_length)
        coords = coords.float()
        return torch.stack([coords[..., 0] * (new_w / old_w), coords[..., 1] * (new_h / old_h)], dim=-1)

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """(x1, y1, x2, y2) [..., 4] -> float32 [N, 4] in the input frame."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
