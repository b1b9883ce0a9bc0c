"""SamHQPredictor: the original SamPredictor's API (set an image once, prompt it many times),
plus several prompts per call, torch-tensor images and outputs, and several images at once."""

import itertools
import numbers
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, overload

import numpy as np
import torch
from PIL import Image

from .decoding import PromptDecoder
from .graphs import GraphedEncoder
from .modeling import ImageEncoderViT, SamHQ
from .modeling.prompt_encoder import prompt_count
from .modeling.sam_hq import decode_eager, no_prompt_outputs
from .switches import triton_interpreter_on
from .transforms import (
    ResizeLongestSide, as_rgb_uint8, as_rgb_uint8_torch, channel_order, check_flags, check_image_size, check_resized_pixels, check_resized_shape,
    resize_longest_side, resize_longest_side_torch, scale_coords,
)

PROMPT_KEYS = ("point_coords", "point_labels", "box", "mask_input")  # what a predict_batch prompt dict may hold
TORCH_PROMPT_KEYS = ("point_coords", "point_labels", "boxes", "mask_input")  # and a predict_batch_torch one

# Points may sit this far outside the image (as a fraction of its longest side): the original
# accepts points slightly off the border, but a point far outside is almost surely a bug
# (swapped x/y, coordinates of another image...).
POINT_MARGIN = 0.1
# A box must overlap the image but may reach this far past its border (same unit): a tracker's box
# for an object leaving the frame extends beyond it, and the original takes any box.
BOX_MARGIN = 1.0
# On an image at least this large (longest side, pixels), prompts whose every coordinate lies in
# [0, 1] are almost surely normalized coordinates, not pixels: they get a warning.
NORMALIZED_WARNING_MIN_SIDE = 32
# Threads for the host-side resizes of set_images: the CPUs this process may run on.
HOST_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def as_finite_array(value, name: str, last_dim: int | None = None, keep_float: bool = False) -> np.ndarray:
    """A prompt-like value (numpy, torch, nested lists) -> a finite float64 numpy array, or a
    TypeError / ValueError naming `name`. keep_float: float arrays keep their precision (checked in
    it, not copied to float64: mask logits are large and go to the model as float32)."""
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            raise ValueError(f"{name} is on the meta device: it holds no values")
        value = value.detach().cpu()
        numpy_lacks = value.dtype == torch.bfloat16 or (value.is_floating_point() and value.dtype.itemsize == 1)  # float8s
        value = (value.float() if numpy_lacks else value).numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as e:
        if isinstance(value, (list, tuple)) and "sequence" in str(e):  # numpy's words for nested lists of unequal lengths
            hint = ": every prompt needs the same number of points (pad with label -1)" if name in ("point_coords", "point_labels") else ""
            raise ValueError(f"{name} is ragged (nested lists of different lengths){hint}") from e
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__}") from e
    if np.iscomplexobj(array):
        raise TypeError(f"{name} must hold real numbers, got complex values")
    if array.dtype.kind not in "biuf":  # a cast would read the string "10" as 10, and None as NaN
        kind = {"U": "strings", "S": "strings", "O": "Python objects"}.get(array.dtype.kind, f"dtype {array.dtype}")
        raise TypeError(f"{name} must be a numeric array, got {kind}")
    if not (keep_float and array.dtype in (np.float16, np.float32, np.float64) and array.dtype.isnative):  # (what torch takes)
        array = array.astype(np.float64)
    if last_dim is not None and (array.ndim == 0 or array.shape[-1] != last_dim):
        raise ValueError(f"{name} must have a last dimension of {last_dim}, got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return array


# What predict returns for one image (masks, scores, low_res_logits): numpy, or torch with return_torch=True
# (the overloads below give type checkers the one that a literal return_torch picks).
NumpyOutputs = tuple[np.ndarray, np.ndarray, np.ndarray]
TorchOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ImageNotSetError(RuntimeError, ValueError):
    """predict / get_image_embedding was called before set_image (a RuntimeError, as in the original)."""


def _to_output(tensors: TorchOutputs, return_torch: bool, batched: bool) -> tuple:
    """Decoder outputs -> numpy (bool masks, float32 values), or float32 / bool tensors left on their
    device (no host sync) with return_torch; the prompt axis dropped when the prompt was unbatched."""
    if return_torch:
        outputs = tuple(t if t.dtype == torch.bool else t.float() for t in tensors)
    else:
        outputs = tuple(t.detach().cpu().numpy() if t.dtype == torch.bool else t.detach().float().cpu().numpy() for t in tensors)
    return outputs if batched else tuple(o[0] for o in outputs)


class SamHQPredictor:
    def __init__(self, model: SamHQ, encoder_graphs: bool | None = None):
        """model: from `samhq_fast.load`. encoder_graphs=True replays the image encoder from one
        CUDA graph per batch size (`graphs.GraphedEncoder`; CUDA models only): the encoder's hundreds
        of kernel launches become one replay, at the cost of one graph memory pool per batch size
        seen (the first call per batch size records it). None (the default): a graph for batch 1
        (one image, e.g. video frames) on a fused CUDA model with a ViT encoder (not TinyViT, not
        under the Triton interpreter), where launches bound the encoder (on an H200 in bf16, vit_h
        18.6 -> 16.0 ms, vit_b 7.9 -> 3.9 ms; from batch 8 on graphs gained nothing), and no graphs
        otherwise. False: no graphs."""
        if not isinstance(model, SamHQ):
            raise TypeError(f"SamHQPredictor needs a samhq_fast SamHQ model (from samhq_fast.load), got {type(model).__name__}")
        if encoder_graphs not in (None, True, False):
            raise TypeError(f"encoder_graphs must be True, False or None (the default), got {encoder_graphs!r}")
        self.model = model
        self._prompt_decoder = None  # the fused backend's compiled decoder, built on first use
        self._graphs_at_every_batch_size = encoder_graphs is not None
        if encoder_graphs is None:  # what was measured faster: the Triton ViT encoder compiled for a GPU
            encoder_graphs = (model.device.type == "cuda" and getattr(model, "backend", "eager") == "fused"
                              and isinstance(model.image_encoder, ImageEncoderViT) and not triton_interpreter_on())
        self._graphed_encoder = GraphedEncoder(model) if encoder_graphs else None
        self.transform = ResizeLongestSide(model.config.img_size)  # the original's: original frame -> input frame
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image(s) and their features."""
        if self._prompt_decoder is not None:
            self._prompt_decoder.forget_images()
        self.is_image_set = False
        self.features = None  # [B, 256, G, G] (B = 1 after set_image)
        self.hq_features = None  # [B, 32, 4G, 4G], computed once per image
        self.dense_pe = None  # [1, 256, G, G], the prompt encoder's grid encoding (the eager decoder's image_pe)
        self.original_sizes = []  # (H, W) per image
        self.input_sizes = []  # (h, w) per image after the longest-side resize
        self.original_size = None  # (H, W) when ONE image is set (what predict / predict_torch use)
        self.input_size = None

    @property
    def num_images(self) -> int:
        """How many images are set: 1 after set_image, len(images) after set_images, 0 before."""
        return len(self.original_sizes)

    def set_image(self, image, image_format: str = "RGB") -> None:
        """Compute the image's embeddings once for all later `predict` calls (= set_images([image])).

        image: numpy [H, W, 3] uint8 (also [H, W] gray, [H, W, 4] with alpha, uint16, float in [0, 1];
        or a batch of one, [1, H, W, C]), a PIL image (taken as stored: `transforms.load_image`
        applies EXIF rotation), or a torch tensor [H, W, C] (HWC), [C, H, W] (CHW) or [H, W] with
        C = 3, 4 (alpha) or 1 (gray) (or a batch of one, [1, H, W, C] / [1, C, H, W]), uint8 or
        float in [0, 1], on any device.
        image_format: "RGB" or "BGR" (any case), the channel order of the pixel data.

        A tensor image stays on the device: it is moved to the model's device, resized there by
        `transforms.resize_longest_side_torch` (antialiased bilinear like the original's PIL resize:
        at most 1 level off on ~0.1 % of the values (some upscales measured identical); an image whose
        longest side already is the model's img_size is used unchanged, bit for bit the numpy
        path), normalized and padded there. uint8 tensors cost no host sync; float tensors cost one
        (their NaN / [0, 1] range check). A failed call leaves no image set (not the previous one).
        """
        self.reset_image()
        if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4 and image.shape[0] != 1:
            raise ValueError(f"set_image takes one image, got a batch of shape {list(image.shape)}: use set_images for several")
        resized, original_size = self._transform_image(image, image_format)
        self._encode_images([resized], [original_size])

    def set_images(self, images, image_format: str = "RGB") -> None:
        """Encode several images in ONE image-encoder batch, for `predict_batch`.

        images: a list (or tuple) of images of any sizes, each as `set_image` accepts (numpy, PIL,
        torch; they may be mixed), or one array of same-size images: a torch tensor [B, H, W, 3] or
        [B, 3, H, W] (e.g. decoded video frames on the GPU: converted and resized as one batch
        there) or a numpy array [B, H, W, 3]. Each image is resized (longest side to the model's
        img_size) and zero-padded to a square, then all go through the encoder together: the
        encoder's memory grows with the number of images, so split very long lists. Stores
        features [B, 256, G, G], hq_features [B, 32, 4G, 4G], original_sizes and input_sizes (one
        per image). With one image this is set_image; with several, `predict` / `predict_torch`
        refuse (they are single-image: use predict_batch). A failed call leaves no image set.
        """
        self.reset_image()
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            rgb = as_rgb_uint8_torch(images, image_format, self.device, batched=True)  # [B, 3, H, W]
            self._encode_images([resize_longest_side_torch(rgb, self.model.config.img_size)], [tuple(rgb.shape[-2:])] * len(rgb))
            return
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if isinstance(images, (np.ndarray, torch.Tensor, Image.Image)) or not isinstance(images, (list, tuple)):
            raise TypeError(
                "images must be a list of images, or a 4-D array of same-size images (use set_image for one image), got "
                + (f"a {images.ndim}-D {type(images).__name__}" if isinstance(images, (np.ndarray, torch.Tensor)) else type(images).__name__)
            )
        if len(images) == 0:
            raise ValueError("images is empty: give at least one image")

        # Host images are converted and resized (PIL, ~25 ms a 1080p frame) in threads: PIL's resize
        # releases the GIL, so this scales with the host's cores. Only host work goes there: torch
        # work stays on this thread, on its current CUDA stream. The first bad image's error is raised.
        on_host = [i for i, image in enumerate(images) if not isinstance(image, torch.Tensor)]
        with ThreadPoolExecutor(max_workers=max(1, min(len(on_host), HOST_CPUS))) as pool:
            resizing = {i: pool.submit(self._resize_on_host, images[i], image_format) for i in on_host}
            transformed = []
            for i, image in enumerate(images):
                try:
                    transformed.append(self._upload(*resizing[i].result(), image_format) if i in resizing
                                       else self._transform_image(image, image_format))
                except (TypeError, ValueError) as e:
                    pool.shutdown(cancel_futures=True)  # the images not started yet are not resized
                    raise type(e)(f"images[{i}]: {e}") from e
        self._encode_images([t for t, _ in transformed], [size for _, size in transformed])

    def _transform_image(self, image, image_format: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """Any accepted image (a torch tensor also as a batch of one) -> (RGB uint8 [1, 3, h, w] resized
        to the model's input, on the model's device; the original (H, W))."""
        if isinstance(image, torch.Tensor):
            if image.ndim == 4 and image.shape[0] != 1:
                raise ValueError(f"a 4-D image tensor must be a batch of one, got shape {list(image.shape)}")
            rgb = as_rgb_uint8_torch(image, image_format, self.device, batched=image.ndim == 4)
            return resize_longest_side_torch(rgb, self.model.config.img_size), tuple(rgb.shape[-2:])
        return self._upload(*self._resize_on_host(image, image_format), image_format)

    def _resize_on_host(self, image, image_format: str) -> tuple[np.ndarray, tuple[int, int]]:
        """A numpy or PIL image -> (uint8 [h, w, 3] resized to the model's input, channels still in
        image_format's order; the original (H, W)). Host work only (set_images runs it in threads)."""
        if not isinstance(image, (np.ndarray, Image.Image)):
            raise TypeError(f"image must be a numpy array, PIL image or torch tensor, got {type(image).__name__}")
        channel_order(image_format)  # a bad image_format fails before the work
        pixels = as_rgb_uint8(image)  # uint8 [H, W, 3]
        return resize_longest_side(pixels, self.model.config.img_size), pixels.shape[:2]

    def _upload(self, resized: np.ndarray, original_size: tuple[int, int], image_format: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """`_resize_on_host`'s output -> (RGB uint8 [1, 3, h, w] on the model's device; original (H, W)).
        BGR data was resized as it is (the resize works per channel) and is flipped here, on the
        device: on the host, flipping a 1080p frame is a strided copy costing about as much as its resize."""
        # (an image already at the model's size is the caller's pixels: read-only from PIL, maybe)
        resized = torch.as_tensor(np.require(resized, requirements="W"), device=self.device).permute(2, 0, 1)[None]
        return (resized.flip(1) if channel_order(image_format) == "BGR" else resized), original_size

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """model.encode_image, replayed from a CUDA graph at the batch sizes encoder_graphs chose."""
        if self._graphed_encoder is not None and (self._graphs_at_every_batch_size or len(images) == 1):
            return self._graphed_encoder(images)
        return self.model.encode_image(images)

    @torch.inference_mode()
    def _encode_images(self, resized: list[torch.Tensor], original_sizes: list[tuple[int, int]]) -> None:
        """resized: groups of same-size images [b_i, 3, h_i, w_i] on a 0..255 scale (longest side =
        img_size); original_sizes: one (H, W) per image -> the predictor's state, from one encoder batch.
        (Its callers reset the state first, so that a failure anywhere leaves no image set.)"""
        batch = torch.cat([self.model.preprocess(group.to(self.device)) for group in resized])  # normalize + pad each
        self.features, _, self.hq_features = self._encode(batch)
        self.dense_pe = self.model.prompt_encoder.get_dense_pe()
        self.original_sizes = [tuple(int(s) for s in size) for size in original_sizes]
        self.input_sizes = [tuple(int(s) for s in group.shape[-2:]) for group in resized for _ in range(len(group))]
        if len(self.original_sizes) == 1:
            self.original_size, self.input_size = self.original_sizes[0], self.input_sizes[0]
        self.is_image_set = True
        self._prepare_decoder()

    def _prepare_decoder(self) -> None:
        """On the fused backend, the compiled decoder's per-image work on the images set, done once,
        here rather than in the first predict (`PromptDecoder.prepare_images`)."""
        current = self.is_image_set and (self.features.dtype, self.features.device) == (self.model.dtype, self.model.device)
        if self.model.backend == "fused" and current:  # (a model cast since set_image: predict says so)
            self._fused_decoder().prepare_images(self.features, self.hq_features)

    @torch.inference_mode()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """transformed_image: [1, 3, h, w] RGB on a 0..255 scale, already resized so max(h, w) equals the
        model's image size; original_image_size: (H, W) of the image prompts refer to."""
        self.reset_image()
        size = self.model.config.img_size
        if not isinstance(transformed_image, torch.Tensor) or transformed_image.ndim != 4 or transformed_image.shape[:2] != (1, 3):
            shape = list(transformed_image.shape) if isinstance(transformed_image, torch.Tensor) else type(transformed_image).__name__
            raise ValueError(f"transformed_image must be a [1, 3, h, w] tensor, got {shape}")
        check_resized_pixels(transformed_image, "transformed_image")
        if max(transformed_image.shape[-2:]) != size:
            raise ValueError(f"transformed_image must have its longest side resized to {size}, got {list(transformed_image.shape[-2:])}")
        input_size = tuple(transformed_image.shape[-2:])
        original_image_size = check_image_size(original_image_size, "original_image_size")
        expected_size = check_resized_shape(*original_image_size, size)  # (refuses a size whose short side resizes to 0)
        if expected_size != input_size:
            raise ValueError(
                f"original_image_size (H, W) = {tuple(original_image_size)} resizes to {expected_size}, "
                f"not to transformed_image's {input_size}: give the (H, W) of the image before predictor.transform.apply_image_torch"
            )
        self._encode_images([transformed_image], [original_image_size])

    @torch.inference_mode()
    def warm_up(self, batch_sizes=(1,), prompts=(1,), points=(1,)) -> None:
        """Pay the one-time costs before the first real image, e.g. ahead of a video stream.

        For each batch size b: one image-encoder pass on b blank images (Triton autotuning at new
        shapes, the CUDA graph where encoder_graphs gives it one). On the fused backend also decoder calls
        per (prompt count n, points per prompt k): n prompts on one image, and n prompts spread over
        min(n, b) of the b images (torch.compile and the CUDA graph of each bucket shape; a decoder
        shape is (prompt bucket, point bucket, b, or 1 when all prompts read one image, whether any
        prompt has a mask_input)). A later call with as many images set, whose prompt and point
        counts fall in warmed buckets (`decoding.PROMPT_BUCKETS` / `POINT_BUCKETS`) and which has no
        mask_input, compiles nothing; box-only prompts count as k = 1. The images set (if any) are kept.
        """
        counts = {"batch_sizes": batch_sizes, "prompts": prompts, "points": points}
        for name, values in counts.items():
            if isinstance(values, numbers.Integral):
                counts[name] = values = (values,)
            if not values or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
        size = self.model.config.img_size
        for b in counts["batch_sizes"]:
            blank = self.model.preprocess(torch.zeros(b, 3, size, size, device=self.device))
            features, _, hq_features = self._encode(blank)
            if self.model.backend != "fused":
                continue
            for n in counts["prompts"]:
                dealt = [len(range(i, n, min(n, b))) for i in range(min(n, b))]  # n prompts dealt over the images
                for per_image, k in itertools.product((dealt, [n]) if len(dealt) > 1 else ([n],), counts["points"]):
                    prompt_sets = [(i, torch.zeros(m, k, 2, device=self.device), torch.ones(m, k, dtype=torch.int64, device=self.device),
                                    None, None) for i, m in enumerate(per_image)]
                    self._fused_decoder().decode_images(features, hq_features, prompt_sets, False, False)
        if self._prompt_decoder is not None:  # it holds the blank images: back to the ones set
            self._prompt_decoder.forget_images()
            self._prepare_decoder()

    def get_image_embedding(self) -> torch.Tensor:
        """Image embeddings [B, 256, G, G] of the images set (B = 1 after set_image; G = 64 for a 1024
        model): an inference-mode tensor, so .clone() it outside torch.inference_mode() to train on it."""
        self._require_image(single=False)
        return self.features

    def _require_image(self, single: bool = True) -> None:
        if not self.is_image_set:
            raise ImageNotSetError("no image is set: call set_image(...) or set_images([...]) before predicting / get_image_embedding")
        if (self.features.dtype, self.features.device) != (self.model.dtype, self.model.device):
            raise RuntimeError(
                f"the model was cast or moved (now {self.model.dtype} on {self.model.device}) since the image was set "
                f"({self.features.dtype} on {self.features.device}): call set_image / set_images again"
            )
        if single and self.num_images != 1:
            raise RuntimeError(
                f"{self.num_images} images are set (set_images): predict / predict_torch take one image; "
                "use predict_batch, or set_image for a single image"
            )

    def _check_in_image(self, coords: np.ndarray, name: str, original_size: tuple[int, int], margin_fraction: float) -> None:
        h, w = original_size
        margin = margin_fraction * max(h, w)
        x, y = coords[..., 0], coords[..., 1]
        bad = (x < -margin) | (x > w + margin) | (y < -margin) | (y > h + margin)
        if bad.any():
            first = coords[bad][0]
            raise ValueError(
                f"{name} has a coordinate ({first[0]:g}, {first[1]:g}) far outside the {w}x{h} (width x height) image; "
                "coordinates are (x, y) pixels of the original image"
            )

    @overload
    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output: bool = True,
                return_logits: bool = False, hq_token_only: bool = False, return_torch: Literal[False] = False) -> NumpyOutputs: ...
    @overload
    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output: bool = True,
                return_logits: bool = False, hq_token_only: bool = False, *, return_torch: Literal[True]) -> TorchOutputs: ...
    @overload
    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output: bool = True,
                return_logits: bool = False, hq_token_only: bool = False, return_torch: bool = False) -> NumpyOutputs | TorchOutputs: ...

    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
        return_torch: bool = False,
    ) -> NumpyOutputs | TorchOutputs:
        """Predict masks for prompts in the original image's pixel frame.

        One prompt (as the original): point_coords [K, 2] (x, y), point_labels [K] (1 foreground,
        0 background, -1 ignore), box [4] or [1, 4] (x1, y1, x2, y2), mask_input [1, 4G, 4G] (a
        previous low_res_logits) -> masks [1, H, W], scores [1], low_res_logits [1, 4G, 4G].
        N prompts at once: point_coords [N, K, 2] with labels [N, K], and/or box [N, 4], and/or
        mask_input [N, 1, 4G, 4G] -> masks [N, 1, H, W], scores [N, 1], low_res_logits [N, 1, 4G, 4G];
        N may be 0 (e.g. box of shape [0, 4]: empty outputs, the decoder does not run). Points may lie
        up to POINT_MARGIN (10%) of the longest side outside the image; a box must overlap the image
        and may reach up to BOX_MARGIN (1x) of the longest side past its border.
        multimask_output picks the best of SAM's 3 multimask outputs (by predicted IoU) before adding
        the HQ mask; hq_token_only returns the HQ mask alone. Masks are bool unless return_logits.
        return_torch=True returns torch tensors on the model's device instead of numpy (bool masks,
        float32 scores and logits, same shapes) without reading them back to the host (inference-mode
        tensors: read-only outside torch.inference_mode, .clone() one to modify it in place). (The prompts
        are validated on the host: prompts given as GPU tensors are read back for that; predict_torch
        takes device tensors without any check of their values.)
        """
        check_flags(multimask_output=multimask_output, return_logits=return_logits, hq_token_only=hq_token_only, return_torch=return_torch)
        self._require_image()
        coords, labels, boxes, masks_in, batched = self._prompts_to_torch(point_coords, point_labels, box, mask_input)
        outputs = self.predict_torch(coords, labels, boxes, masks_in, multimask_output, return_logits, hq_token_only)
        return _to_output(outputs, return_torch, batched)

    @overload
    def predict_batch(self, prompts, multimask_output: bool = True, return_logits: bool = False, hq_token_only: bool = False,
                      return_torch: Literal[False] = False) -> list[NumpyOutputs | None]: ...
    @overload
    def predict_batch(self, prompts, multimask_output: bool = True, return_logits: bool = False, hq_token_only: bool = False,
                      *, return_torch: Literal[True]) -> list[TorchOutputs | None]: ...
    @overload
    def predict_batch(self, prompts, multimask_output: bool = True, return_logits: bool = False, hq_token_only: bool = False,
                      return_torch: bool = False) -> list[NumpyOutputs | None] | list[TorchOutputs | None]: ...

    def predict_batch(
        self,
        prompts,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
        return_torch: bool = False,
    ) -> list:
        """Prompts for each of the images given to `set_images`, decoded together.

        prompts: a list with one entry per image: a dict with `predict`'s prompt arguments
        (point_coords, point_labels, box, mask_input; any subset, any number of prompts, batched or
        not), or None to skip that image. -> a list with, per image, what `predict` on that image
        alone returns for that dict (same shapes and batching rules, numpy or with return_torch
        tensors on the model's device), or None for a skipped image. The flags apply to every image.

        The fused backend decodes all prompts of all images as one padded batch (one compiled call,
        CUDA graphs on the GPU, per 256 prompts; the padding is masked out, so results do not
        change). The eager backend makes one mask-decoder call per sparse-token count (the number
        of point and box tokens per prompt). Each prompt reads its own image's features. The prompts
        are validated on the host, as in `predict`; `predict_batch_torch` takes device tensors unread.
        """
        check_flags(multimask_output=multimask_output, return_logits=return_logits, hq_token_only=hq_token_only, return_torch=return_torch)
        # (warning_stacklevel: _prompts_to_torch < convert < _per_image_prompts < predict_batch < the caller)
        convert = lambda i, **prompt: self._prompts_to_torch(**prompt, original_size=self.original_sizes[i], warning_stacklevel=5)  # noqa: E731
        converted = self._per_image_prompts(prompts, PROMPT_KEYS, convert)
        decoded = self._decode_images(converted, multimask_output, hq_token_only, return_logits)
        return [None if out is None else _to_output(out, return_torch, converted[i][4]) for i, out in enumerate(decoded)]

    def predict_batch_torch(
        self, prompts, multimask_output: bool = True, return_logits: bool = False, hq_token_only: bool = False
    ) -> list[TorchOutputs | None]:
        """`predict_batch` for torch prompts already in each image's resized INPUT frame, as
        `predict_torch` takes them: one dict per image set (or None to skip it) with keys among
        point_coords [N, K, 2], point_labels [N, K], boxes [N, 4], mask_input [N, 1, 4G, 4G]
        -> per image, (masks [N, 1, H, W] bool or logits, scores [N, 1], low_res_logits
        [N, 1, 4G, 4G]) tensors on the model's device, or None. Shapes and devices are checked, not
        values: on CUDA nothing here waits for the GPU (for e.g. tracker boxes already on the GPU)."""
        check_flags(multimask_output=multimask_output, return_logits=return_logits, hq_token_only=hq_token_only)
        convert = lambda i, **prompt: (*self.model.prompt_encoder.check_prompts(**prompt), True)  # noqa: E731
        converted = self._per_image_prompts(prompts, TORCH_PROMPT_KEYS, convert)
        return self._decode_images(converted, multimask_output, hq_token_only, return_logits)

    def _per_image_prompts(self, prompts, keys: tuple[str, ...], convert) -> dict:
        """prompts: one dict with keys among `keys` (or None) per image set -> image index ->
        convert(index, **dict): (coords, labels, boxes, masks, batched) in the input frame."""
        self._require_image(single=False)
        if isinstance(prompts, dict) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of dicts, one per image, got {type(prompts).__name__}")
        if len(prompts) != self.num_images:
            raise ValueError(f"got {len(prompts)} prompt dicts for {self.num_images} images: give one per image set by set_images (None skips one)")
        converted = {}
        for i, prompt in enumerate(prompts):
            if prompt is None:
                continue
            if not isinstance(prompt, dict):
                raise TypeError(f"prompts[{i}] must be a dict of prompt arguments (or None), got {type(prompt).__name__}")
            unknown = sorted(set(prompt) - set(keys))
            if unknown:
                raise ValueError(f"prompts[{i}] has unknown keys {unknown}; allowed: {list(keys)}")
            try:
                converted[i] = convert(i, **{k: prompt.get(k) for k in keys})
            except (TypeError, ValueError) as e:
                raise type(e)(f"prompts[{i}]: {e}") from e
        return converted

    def _masks(self, low_res: torch.Tensor, input_size, original_size, return_logits: bool) -> torch.Tensor:
        """Low-res logits [N, 1, 4G, 4G] -> [N, 1, H, W] in the original frame: logits, or bool masks."""
        if return_logits:
            return self.model.postprocess_masks(low_res, input_size, original_size)
        return self.model.postprocess_binary_masks(low_res, input_size, original_size)

    def _fused_decoder(self) -> PromptDecoder:
        """The fused backend's fixed-shape compiled decoder (CUDA graphs on the GPU), built on first use."""
        if self._prompt_decoder is None:
            self._prompt_decoder = PromptDecoder(self.model)
        return self._prompt_decoder

    @torch.inference_mode()
    def _decode_images(self, converted: dict, multimask_output: bool, hq_token_only: bool, return_logits: bool) -> list:
        """image index -> input-frame prompt tensors (coords, labels, boxes, masks, batched) ==> per
        image set, (masks [P_i, 1, H_i, W_i], scores [P_i, 1], low-res logits [P_i, 1, 4G, 4G]), or
        None for an image without prompts.

        fused backend: every prompt of every image in one padded batch (one compiled call per 256
        prompts). eager: one decoder call per sparse-token count (prompts with different counts
        cannot share an unpadded batch), each prompt reading its image's features.
        """
        results = [None] * self.num_images
        for i, (low_res, scores) in self._decode_low_res(converted, multimask_output, hq_token_only).items():
            results[i] = self._masks(low_res, self.input_sizes[i], self.original_sizes[i], return_logits), scores, low_res
        return results

    def _decode_low_res(self, converted: dict, multimask_output: bool, hq_token_only: bool) -> dict:
        """_decode_images without the post-processing: image index -> (low-res logits, scores)."""
        if not converted:
            return {}
        model = self.model
        if model.backend == "fused":
            prompt_sets = [(i, *tensors[:4]) for i, tensors in converted.items()]
            decoded = self._fused_decoder().decode_images(self.features, self.hq_features, prompt_sets, multimask_output, hq_token_only)
            return dict(zip(converted, decoded))
        groups = {}  # sparse tokens per prompt -> [(image index, sparse, dense)]
        decoded = {}
        for i, (coords, labels, boxes, masks, _) in converted.items():
            if prompt_count(coords, boxes, masks) == 0:
                decoded[i] = no_prompt_outputs(self.hq_features)
                continue
            points = None if coords is None else (coords, labels)
            sparse, dense = model.prompt_encoder(points, boxes, masks)
            groups.setdefault(sparse.shape[1], []).append((i, sparse, dense))
        for members in groups.values():
            images = [i for i, _, _ in members]
            counts = [sparse.shape[0] for _, sparse, _ in members]
            if len(images) == 1:  # one image: broadcast its features over its prompts, as predict_torch
                features, hq_features = self.features[images[0]][None], self.hq_features[images[0]][None]
            else:  # per-prompt gather of each prompt's image features
                # (filled on the device: a host-built index would be a blocking copy, i.e. a stream sync)
                index = torch.cat([torch.full((n,), i, dtype=torch.long, device=self.device) for i, n in zip(images, counts)])
                features, hq_features = self.features[index], self.hq_features[index]
            sparse = torch.cat([s for _, s, _ in members])
            dense = torch.cat([d for _, _, d in members])
            low_res, scores = model.mask_decoder(features, self.dense_pe, sparse, dense, hq_features, multimask_output, hq_token_only)
            for i, low, score in zip(images, low_res.split(counts), scores.split(counts)):
                decoded[i] = (low, score)
        return decoded

    def _prompts_to_torch(self, point_coords, point_labels, box, mask_input, original_size=None, warning_stacklevel=3):
        """Validate user prompts, scale them to the input frame, and give them a prompt-batch axis.
        original_size: the (H, W) of the image they refer to (default: the single image set).
        warning_stacklevel: how far up the user's call is (3: predict's caller)."""
        original_size = self.original_size if original_size is None else original_size
        size = self.model.config.img_size
        counts = {}  # prompt count implied by each argument
        batched = False
        coords = labels = boxes = masks = None
        pixel_coords = []  # the point and box coordinates given (original frame), for the normalized-coordinate warning
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None:
            pts = as_finite_array(point_coords, "point_coords", last_dim=2)
            lbl = as_finite_array(point_labels, "point_labels")
            if pts.ndim not in (2, 3):
                raise ValueError(f"point_coords must be [K, 2] or [N, K, 2], got shape {list(pts.shape)}")
            if pts.shape[-2] == 0:
                raise ValueError(f"point_coords is empty (shape {list(pts.shape)}): give at least one point, or None for no points")
            if lbl.shape != pts.shape[:-1]:
                raise ValueError(f"point_labels must have shape {list(pts.shape[:-1])} to match point_coords, got {list(lbl.shape)}")
            if not np.isin(lbl, (-1, 0, 1)).all():
                raise ValueError(f"point_labels must be 1 (foreground), 0 (background) or -1 (ignore), got {sorted(set(lbl.ravel().tolist()))}")
            self._check_in_image(pts, "point_coords", original_size, POINT_MARGIN)
            pixel_coords.append(pts)
            batched |= pts.ndim == 3
            pts, lbl = (pts, lbl) if pts.ndim == 3 else (pts[None], lbl[None])
            counts["point_coords"] = pts.shape[0]
            coords = torch.as_tensor(scale_coords(pts, original_size, size), dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(lbl, dtype=torch.int64, device=self.device)
        if box is not None:
            bx = as_finite_array(box, "box", last_dim=4)
            if bx.ndim not in (1, 2):
                raise ValueError(f"box must be [4] or [N, 4] (x1, y1, x2, y2), got shape {list(bx.shape)}")
            bx = bx.reshape(-1, 4)
            if ((bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])).any():
                first = bx[(bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])][0]
                raise ValueError(f"box must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got an empty or inverted box {first.tolist()}")
            self._check_in_image(bx.reshape(-1, 2, 2), "box", original_size, BOX_MARGIN)
            height, width = original_size
            outside = (bx[:, 0] >= width) | (bx[:, 2] <= 0) | (bx[:, 1] >= height) | (bx[:, 3] <= 0)
            if outside.any():
                raise ValueError(f"box {bx[outside][0].tolist()} lies entirely outside the {width}x{height} (width x height) image")
            pixel_coords.append(bx)
            batched |= bx.shape[0] != 1  # [4] and [1, 4] are one unbatched box, [0, 4] no boxes
            counts["box"] = bx.shape[0]
            boxes = torch.as_tensor(scale_coords(bx.reshape(-1, 2, 2), original_size, size).reshape(-1, 4), dtype=torch.float32, device=self.device)
        if mask_input is not None:
            low_res = 4 * self.model.config.embedding_size
            if (mask_input.dtype == torch.bool) if isinstance(mask_input, torch.Tensor) else np.asarray(mask_input).dtype == np.bool_:
                raise TypeError("mask_input must be float logits (a previous predict's low_res_logits), got a bool mask")
            mk = as_finite_array(mask_input, "mask_input", keep_float=True)
            if mk.ndim not in (3, 4) or mk.shape[-3:] != (1, low_res, low_res):
                raise ValueError(f"mask_input must be [1, {low_res}, {low_res}] or [N, 1, {low_res}, {low_res}] logits, got shape {list(mk.shape)}")
            largest = float(max(mk.max(initial=0), -mk.min(initial=0)))  # max |logit|, without an abs() copy
            if largest > torch.finfo(self.model.dtype).max:  # would become inf in the model
                raise ValueError(f"mask_input has values beyond {str(self.model.dtype).removeprefix('torch.')}'s range (max |logit| {largest:.3g})")
            batched |= mk.ndim == 4
            mk = mk if mk.ndim == 4 else mk[None]
            counts["mask_input"] = mk.shape[0]
            masks = torch.as_tensor(mk, dtype=torch.float32, device=self.device)
        if len(set(counts.values())) > 1:
            raise ValueError(f"prompt counts disagree: {counts}; give the same number N of prompts in each argument")
        given = [a for a in pixel_coords if a.size]  # none when N = 0
        if given and max(original_size) >= NORMALIZED_WARNING_MIN_SIDE and all(a.min() >= 0 and a.max() <= 1 for a in given):
            warnings.warn(
                f"every prompt coordinate lies in [0, 1] on a {original_size[1]}x{original_size[0]} image: coordinates are "
                "(x, y) pixels of the original image, not normalized ones (multiply by the width and height)",
                stacklevel=warning_stacklevel,
            )
        return coords, labels, boxes, masks, batched

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> TorchOutputs:
        """Like `predict`, with torch tensors already in the resized INPUT frame (see `transforms`):
        point_coords [N, K, 2], point_labels [N, K], boxes [N, 4], mask_input [N, 1, 4G, 4G]
        -> masks [N, 1, H, W] (bool, or logits), scores [N, 1], low_res_logits [N, 1, 4G, 4G].
        Shapes, dtypes and devices are checked, values are not (that would sync with the GPU). Labels
        mean 1 foreground, 0 background, -1 not a point (`predict` allows only these); any other
        label gives a token with no label embedding, as in the original, on every backend."""
        check_flags(multimask_output=multimask_output, return_logits=return_logits, hq_token_only=hq_token_only)
        self._require_image()
        model = self.model
        model.prompt_encoder.check_prompts(point_coords, point_labels, boxes, mask_input)
        if model.backend == "fused":  # fixed-shape compiled decoder (CUDA graphs on the GPU)
            low_res, scores = self._fused_decoder()(
                self.features, self.hq_features, point_coords, point_labels, boxes, mask_input, multimask_output, hq_token_only
            )
        else:
            low_res, scores = decode_eager(
                model.prompt_encoder, model.mask_decoder, self.features, self.dense_pe, self.hq_features,
                point_coords, point_labels, boxes, mask_input, multimask_output, hq_token_only,
            )
        masks = self._masks(low_res, self.input_size, self.original_size, return_logits)
        return masks, scores, low_res
