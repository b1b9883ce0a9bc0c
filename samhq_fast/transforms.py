"""Image loading and conversion, the longest-side resize, and prompt-coordinate scaling.

Frames: "original" is the user's image (H, W); "input" is the image resized so its longest side
equals the model's image size (1024), before padding. Coordinates are (x, y) pixels.
"""

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `long_side`, rounded as the original does."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file -> RGB uint8 [H, W, 3] (EXIF orientation applied)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return as_rgb_uint8(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"could not read image {path}: {e}") from e


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:  # 16-bit images: rescale the full range
        return np.round(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image has NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"float images must hold values in [0, 1] (got {array.min():.4g}..{array.max():.4g}); "
                "pass uint8 for 0..255 data"
            )
        return np.round(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"integer image of dtype {array.dtype} has values outside 0..255; pass uint8 or uint16")
        return array.astype(np.uint8)
    raise TypeError(f"unsupported image dtype {array.dtype}")


def as_rgb_uint8(image, image_format: str = "RGB") -> np.ndarray:
    """numpy [H, W], [H, W, 1|3|4] or a PIL image -> contiguous RGB uint8 [H, W, 3].

    Grayscale is replicated to 3 channels, alpha is dropped, 16-bit is rescaled, float must be in [0, 1].
    image_format: channel order of a 3/4-channel numpy input, "RGB" or "BGR".
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if isinstance(image, Image.Image):
        if image.mode.startswith("I"):  # 16-bit grayscale opens as "I;16*" or, in older files, 32-bit "I"
            image = np.asarray(image)
            if image.min() < 0 or image.max() > 65535:
                raise ValueError(f"integer image (PIL mode I) has values outside 0..65535")
            image = image.astype(np.uint16)
        elif image.mode == "F":  # float grayscale: must be in [0, 1] like float arrays
            image = np.asarray(image)
        else:
            image = np.asarray(image.convert("RGB"))
            image_format = "RGB"
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array or PIL image, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {list(image.shape)}")
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
    """RGB uint8 [H, W, 3] -> [h, w, 3] with max(h, w) == long_side (PIL bilinear, antialiased, as the original)."""
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    if min(h, w) < 1:
        raise ValueError(
            f"image of {image.shape[1]}x{image.shape[0]} (width x height) is too elongated: "
            f"its short side would be 0 pixels once the long side is resized to {long_side}"
        )
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """(x, y) pixel coordinates [..., 2] in the original frame -> the resized input frame (float64)."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    coords = np.array(coords, dtype=np.float64)
    coords[..., 0] *= new_w / old_w
    coords[..., 1] *= new_h / old_h
    return coords
