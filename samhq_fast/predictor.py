"""SamHQPredictor: the original SamPredictor's API (set an image once, prompt it many times),
plus several prompts per call."""

import numpy as np
import torch

from .modeling import SamHQ
from .transforms import as_rgb_uint8, resize_longest_side, scale_coords

# Points may sit this far outside the image (as a fraction of its longest side): the original
# accepts points slightly off the border, but a point far outside is almost surely a bug
# (swapped x/y, coordinates of another image, normalized coordinates...).
POINT_MARGIN = 0.1


def _finite_array(value, name: str, last_dim: int | None = None) -> np.ndarray:
    try:
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__}") from e
    if last_dim is not None and (array.ndim == 0 or array.shape[-1] != last_dim):
        raise ValueError(f"{name} must have a last dimension of {last_dim}, got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return array


class ImageNotSetError(RuntimeError, ValueError):
    """predict / get_image_embedding was called before set_image (a RuntimeError, as in the original)."""


class SamHQPredictor:
    def __init__(self, model: SamHQ):
        if not isinstance(model, SamHQ):
            raise TypeError(f"SamHQPredictor needs a samhq_fast SamHQ model (from samhq_fast.load), got {type(model).__name__}")
        self.model = model
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its features."""
        self.is_image_set = False
        self.features = None  # [1, 256, G, G]
        self.hq_features = None  # [1, 32, 4G, 4G], computed once per image
        self.original_size = None  # (H, W)
        self.input_size = None  # (h, w) after the longest-side resize

    def set_image(self, image, image_format: str = "RGB") -> None:
        """Compute the image's embeddings once for all later `predict` calls.

        image: numpy [H, W, 3] uint8 (also [H, W] gray, [H, W, 4] with alpha, uint16, float in [0, 1])
        or a PIL image. image_format: "RGB" or "BGR" channel order of a numpy image.
        """
        rgb = as_rgb_uint8(image, image_format)
        resized = resize_longest_side(rgb, self.model.config.img_size)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None]
        self.set_torch_image(tensor, rgb.shape[:2])

    @torch.inference_mode()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """transformed_image: [1, 3, h, w] RGB on a 0..255 scale, already resized so max(h, w) equals the
        model's image size; original_image_size: (H, W) of the image prompts refer to."""
        size = self.model.config.img_size
        if not isinstance(transformed_image, torch.Tensor) or transformed_image.ndim != 4 or transformed_image.shape[:2] != (1, 3):
            shape = list(transformed_image.shape) if isinstance(transformed_image, torch.Tensor) else type(transformed_image).__name__
            raise ValueError(f"transformed_image must be a [1, 3, h, w] tensor, got {shape}")
        if max(transformed_image.shape[-2:]) != size:
            raise ValueError(f"transformed_image must have its longest side resized to {size}, got {list(transformed_image.shape[-2:])}")
        self.reset_image()
        self.original_size = tuple(int(s) for s in original_image_size)
        self.input_size = tuple(transformed_image.shape[-2:])
        images = self.model.preprocess(transformed_image.to(self.device))
        self.features, _, self.hq_features = self.model.encode_image(images)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """Image embedding [1, 256, G, G] of the current image (G = 64 for a 1024 model)."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise ImageNotSetError("no image is set: call set_image(...) before predict / get_image_embedding")

    def _check_in_image(self, coords: np.ndarray, name: str) -> None:
        h, w = self.original_size
        margin = POINT_MARGIN * max(h, w)
        x, y = coords[..., 0], coords[..., 1]
        bad = (x < -margin) | (x > w + margin) | (y < -margin) | (y > h + margin)
        if bad.any():
            first = coords[bad][0]
            raise ValueError(
                f"{name} has a coordinate ({first[0]:g}, {first[1]:g}) far outside the {w}x{h} (width x height) image; "
                "coordinates are (x, y) pixels of the original image"
            )

    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for prompts in the original image's pixel frame.

        One prompt (as the original): point_coords [K, 2] (x, y), point_labels [K] (1 foreground,
        0 background, -1 ignore), box [4] or [1, 4] (x1, y1, x2, y2), mask_input [1, 4G, 4G] (a
        previous low_res_logits) -> masks [1, H, W], scores [1], low_res_logits [1, 4G, 4G].
        N prompts at once: point_coords [N, K, 2] with labels [N, K], and/or box [N, 4], and/or
        mask_input [N, 1, 4G, 4G] -> masks [N, 1, H, W], scores [N, 1], low_res_logits [N, 1, 4G, 4G].
        multimask_output picks the best of SAM's 3 multimask outputs (by predicted IoU) before adding
        the HQ mask; hq_token_only returns the HQ mask alone. Masks are bool unless return_logits.
        """
        self._require_image()
        coords, labels, boxes, masks_in, batched = self._prompts_to_torch(point_coords, point_labels, box, mask_input)
        masks, scores, low_res = self.predict_torch(coords, labels, boxes, masks_in, multimask_output, return_logits, hq_token_only)
        outputs = tuple(t.detach().cpu().numpy() if t.dtype == torch.bool else t.detach().float().cpu().numpy() for t in (masks, scores, low_res))
        return outputs if batched else tuple(o[0] for o in outputs)

    def _prompts_to_torch(self, point_coords, point_labels, box, mask_input):
        """Validate user prompts, scale them to the input frame, and give them a prompt-batch axis."""
        size = self.model.config.img_size
        counts = {}  # prompt count implied by each argument
        batched = False
        coords = labels = boxes = masks = None
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None:
            pts = _finite_array(point_coords, "point_coords", last_dim=2)
            lbl = _finite_array(point_labels, "point_labels")
            if pts.ndim not in (2, 3):
                raise ValueError(f"point_coords must be [K, 2] or [N, K, 2], got shape {list(pts.shape)}")
            if pts.shape[-2] == 0:
                raise ValueError(f"point_coords is empty (shape {list(pts.shape)}): give at least one point, or None for no points")
            if lbl.shape != pts.shape[:-1]:
                raise ValueError(f"point_labels must have shape {list(pts.shape[:-1])} to match point_coords, got {list(lbl.shape)}")
            if not np.isin(lbl, (-1, 0, 1)).all():
                raise ValueError(f"point_labels must be 1 (foreground), 0 (background) or -1 (ignore), got {sorted(set(lbl.ravel().tolist()))}")
            self._check_in_image(pts, "point_coords")
            batched |= pts.ndim == 3
            pts, lbl = (pts, lbl) if pts.ndim == 3 else (pts[None], lbl[None])
            counts["point_coords"] = pts.shape[0]
            coords = torch.as_tensor(scale_coords(pts, self.original_size, size), dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(lbl, dtype=torch.int64, device=self.device)
        if box is not None:
            bx = _finite_array(box, "box", last_dim=4)
            if bx.ndim not in (1, 2):
                raise ValueError(f"box must be [4] or [N, 4] (x1, y1, x2, y2), got shape {list(bx.shape)}")
            bx = bx.reshape(-1, 4)
            if ((bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])).any():
                first = bx[(bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])][0]
                raise ValueError(f"box must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got an empty or inverted box {first.tolist()}")
            self._check_in_image(bx.reshape(-1, 2, 2), "box")
            batched |= bx.shape[0] > 1
            counts["box"] = bx.shape[0]
            boxes = torch.as_tensor(scale_coords(bx.reshape(-1, 2, 2), self.original_size, size).reshape(-1, 4), dtype=torch.float32, device=self.device)
        if mask_input is not None:
            low_res = 4 * self.model.config.embedding_size
            mk = _finite_array(mask_input, "mask_input")
            if mk.ndim not in (3, 4) or mk.shape[-3:] != (1, low_res, low_res):
                raise ValueError(f"mask_input must be [1, {low_res}, {low_res}] or [N, 1, {low_res}, {low_res}] logits, got shape {list(mk.shape)}")
            batched |= mk.ndim == 4
            mk = mk if mk.ndim == 4 else mk[None]
            counts["mask_input"] = mk.shape[0]
            masks = torch.as_tensor(mk, dtype=torch.float32, device=self.device)
        if len(set(counts.values())) > 1:
            raise ValueError(f"prompt counts disagree: {counts}; give the same number N of prompts in each argument")
        if counts and next(iter(counts.values())) == 0:
            raise ValueError("no prompts: the prompt arrays are empty")
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like `predict`, with torch tensors already in the resized INPUT frame (see `transforms`):
        point_coords [N, K, 2], point_labels [N, K], boxes [N, 4], mask_input [N, 1, 4G, 4G]
        -> masks [N, 1, H, W] (bool, or logits), scores [N, 1], low_res_logits [N, 1, 4G, 4G]."""
        self._require_image()
        model = self.model
        self._check_torch_prompts(point_coords, point_labels, boxes, mask_input)
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = model.prompt_encoder(points, boxes, mask_input)
        low_res, scores = model.mask_decoder(
            self.features, model.prompt_encoder.get_dense_pe(), sparse, dense, self.hq_features, multimask_output, hq_token_only
        )
        masks = model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > model.mask_threshold
        return masks, scores, low_res

    def _check_torch_prompts(self, point_coords, point_labels, boxes, mask_input) -> None:
        """Shape checks only: value checks (NaN, ranges) would sync the GPU on every call."""
        low_res = 4 * self.model.config.embedding_size
        expected = {"point_coords": "[N, K, 2]", "point_labels": "[N, K]", "boxes": "[N, 4]", "mask_input": f"[N, 1, {low_res}, {low_res}]"}
        given = {"point_coords": point_coords, "point_labels": point_labels, "boxes": boxes, "mask_input": mask_input}
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        for name, tensor in given.items():
            if tensor is not None and not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor {expected[name]}, got {type(tensor).__name__}")
        ok = {
            "point_coords": point_coords is None or (point_coords.ndim == 3 and point_coords.shape[-1] == 2),
            "point_labels": point_labels is None or point_labels.shape == point_coords.shape[:2],
            "boxes": boxes is None or (boxes.ndim == 2 and boxes.shape[-1] == 4),
            "mask_input": mask_input is None or tuple(mask_input.shape[1:]) == (1, low_res, low_res),
        }
        for name, good in ok.items():
            if not good:
                raise ValueError(f"{name} must have shape {expected[name]}, got {list(given[name].shape)}")
        counts = {name: t.shape[0] for name, t in given.items() if t is not None}
        if len(set(counts.values())) > 1:
            raise ValueError(f"prompt counts disagree: {counts}; every prompt tensor needs the same N")
