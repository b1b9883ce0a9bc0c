"""Automatic mask generation, as the original SamAutomaticMaskGenerator: a grid of one-point prompts
over the image (and, optionally, over overlapping zoomed-in crops of it), each decoded to one mask,
filtered by predicted IoU and stability, de-duplicated by box NMS, one record per mask.

Everything in a record is in the original image's pixels: "bbox" and "crop_box" are XYWH,
"point_coords" (x, y). Masks are kept as run-length encodings (COCO's uncompressed RLE: column-major
runs, the first one of zeros) between the steps, as the original does, to bound memory.
"""

import itertools
import math
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from .modeling import SamHQ
from .predictor import SamHQPredictor, as_finite_array
from .transforms import as_rgb_uint8, as_rgb_uint8_torch, check_flags

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
CROP_EDGE_TOLERANCE = 20.0  # pixels: a box this close to a crop's inner edge was cut by the crop
NMS_BLOCK_ELEMENTS = 1 << 17  # box pairs per array operation in box_nms (0.5 MB float32 temporaries: cache-sized, fastest of 2^15-2^22 here)
DECODE_PIXELS = 1 << 26  # binary masks decoded together in generate (64 M pixels: ~0.3 GB in flight; one larger mask: ~4 B a pixel)


def point_grid(n_per_side: int) -> np.ndarray:
    """[n * n, 2] (x, y) centres of the cells of an n x n grid over [0, 1]^2, x varying fastest."""
    offset = 1 / (2 * n_per_side)
    centres = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(centres, centres)
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """The whole image, then for layer i = 1..n_layers a 2^i x 2^i set of overlapping crops
    -> (boxes [x0, y0, x1, y1] in pixels, the layer of each)."""
    boxes, layers = [[0, 0, width, height]], [0]
    short_side = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + height) / per_side)
        starts_x = [int((crop_w - overlap) * i) for i in range(per_side)]
        starts_y = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in itertools.product(starts_x, starts_y):
            boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
            layers.append(layer)
    return boxes, layers


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """logits [N, H, W] -> [N]: IoU of the mask at threshold + offset with the one at threshold - offset
    (the first lies inside the second, so it is a ratio of pixel counts)."""
    inner = (logits > threshold + offset).flatten(1).sum(1, dtype=torch.int64)
    outer = (logits > threshold - offset).flatten(1).sum(1, dtype=torch.int64)
    return inner / outer


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """bool [N, H, W] -> [N, 4] int64 (x0, y0, x1, y1) of the set pixels, corners inclusive; 0s for an empty mask."""
    height, width = masks.shape[-2:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [N, H], [N, W]
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    boxes = torch.stack(
        [
            torch.where(cols, xs, width).amin(1),
            torch.where(rows, ys, height).amin(1),
            torch.where(cols, xs, -1).amax(1),
            torch.where(rows, ys, -1).amax(1),
        ],
        dim=1,
    )
    return boxes.masked_fill(~rows.any(1, keepdim=True), 0)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: boxes [N, 4] (x0, y0, x1, y1), scores [N] -> indices of the
    boxes kept, best score first; a box is dropped when its IoU with a kept, better one exceeds
    iou_threshold (areas (x1 - x0) * (y1 - y0), as torchvision's nms). On the host, NMS_BLOCK_ELEMENTS
    IoUs at a time: a block of boxes against every later one in a few array operations, then the
    greedy pass over the block's rows (N reaches ~20,000 with two crop layers: no N x N matrix)."""
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    boxes = boxes.cpu()[order].to(torch.float32).numpy()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    count = len(boxes)
    alive = np.ones(count, dtype=bool)
    keep = []
    rows_per_block = max(1, NMS_BLOCK_ELEMENTS // max(count, 1))
    for start in range(0, count, rows_per_block):
        stop = min(start + rows_per_block, count)
        block, later = boxes[start:stop, None], boxes[start:]  # [b, 1, 4] against [count - start, 4]
        width = np.minimum(block[..., 2], later[:, 2]) - np.maximum(block[..., 0], later[:, 0])
        height = np.minimum(block[..., 3], later[:, 3]) - np.maximum(block[..., 1], later[:, 1])
        inter = np.clip(width, 0, None) * np.clip(height, 0, None)  # [b, count - start]
        with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: 0 / 0 (NaN), no overlap
            spares = ~(inter / (area[start:stop, None] + area[start:] - inter) > iou_threshold)
        for i in range(start, stop):
            if alive[i]:
                keep.append(i)
                alive[i + 1 :] &= spares[i - start, i + 1 - start :]
    return order[torch.as_tensor(keep, dtype=torch.int64)]


def masks_to_rle(masks: torch.Tensor) -> list[dict]:
    """bool [N, H, W] -> per mask {"size": [H, W], "counts": integer numpy array of run lengths}: COCO's
    uncompressed RLE (column-major, starting with a run of zeros, which is 0 long when the first pixel
    is set); the records' "uncompressed_rle" gives counts as a list, as the original.

    The counts are laid out on the masks' device and copied to the host once (int32 below 2^31
    pixels): a mask of noise has ~10^5 runs, and building them on the host, one Python int per run
    (the original's lists), took more time than the generator's GPU work."""
    masks = masks.bool()  # 0 / 1 integer masks too (the sentinel below negates the last pixel)
    n, height, width = masks.shape
    if n == 0:
        return []
    pixels = height * width
    # Each mask's pixels in column-major order between two sentinels: an unset one before the first
    # (a set first pixel then ends a 0-long run of zeros) and the last pixel's opposite after the
    # last (so every run, the last one too, ends in a change of value).
    padded = torch.empty(n, pixels + 2, dtype=torch.bool, device=masks.device)
    padded[:, 1:-1].view(n, width, height).copy_(masks.transpose(1, 2))
    padded[:, 0] = False
    padded[:, -1] = ~masks[:, -1, -1]
    changes = padded[:, 1:] != padded[:, :-1]  # [N, H * W + 1]: True where a run ends
    # [M] each, by mask then position: a run of mask `mask_of_end` ends `end` pixels in
    mask_of_end, end = changes.nonzero().unbind(1)
    end = end.to(torch.int32 if pixels < 2**31 else torch.int64)
    first_of_mask = torch.ones_like(mask_of_end, dtype=torch.bool)
    first_of_mask[1:] = mask_of_end[1:] != mask_of_end[:-1]
    counts = end - torch.where(first_of_mask, 0, end.roll(1))  # [M] run lengths, mask after mask
    runs_per_mask = changes.sum(1, dtype=counts.dtype)
    host = torch.cat([runs_per_mask, counts]).cpu().numpy()  # one copy to the host
    # copies: a view would keep the whole batch's counts alive as long as any one mask's
    return [{"size": [height, width], "counts": c.copy()} for c in np.split(host[n:], np.cumsum(host[: n - 1], dtype=np.int64))]


def rles_to_masks(rles: list[dict], device: torch.device | str = "cpu") -> torch.Tensor:
    """One or more uncompressed RLEs of one size [H, W] -> bool [N, H, W] on `device`, decoded together.

    Each run but the last ends in a flip of the pixel value, so the running count of flips, mod 2,
    is the mask in column-major order; transposing it to [H, W] is one batched copy (on the GPU, not
    the host's one-mask-at-a-time strided copy, which is most of the host time of a numpy decode)."""
    height, width = size = [int(s) for s in rles[0]["size"]]
    counts_per_mask = [np.asarray(rle["counts"], dtype=np.int64) for rle in rles]  # lists or arrays
    if any([int(s) for s in rle["size"]] != size or counts.sum() != height * width for rle, counts in zip(rles, counts_per_mask)):
        raise ValueError(f"RLEs to decode together must all have size {size} and counts summing to {height * width}")
    ends_per_mask = [np.cumsum(counts[:-1]) for counts in counts_per_mask]  # [runs - 1] each
    rows = np.repeat(np.arange(len(rles)), [len(e) for e in ends_per_mask])
    ends = np.concatenate(ends_per_mask)
    inside = ends < height * width  # a run of 0 at the end ends at H * W: no pixel flips there
    flips = torch.zeros(len(rles), height * width, dtype=torch.uint8, device=device)
    # accumulated: two runs ending at one pixel (a 0-long run between them) flip it twice, i.e. not at all
    flips.index_put_((torch.as_tensor(rows[inside], device=device), torch.as_tensor(ends[inside], device=device)),
                     torch.ones((), dtype=torch.uint8, device=device), accumulate=True)
    column_major = flips.cumsum(dim=1, dtype=torch.uint8).bitwise_and_(1)  # 0 / 1; the uint8 sum wraps at 256: parity holds
    return column_major.view(torch.bool).view(len(rles), width, height).transpose(1, 2).contiguous()


def decode_in_chunks(rles: list[dict], device: torch.device | str = "cpu") -> Iterator[np.ndarray]:
    """`rles_to_masks` over DECODE_PIXELS at a time (a few bytes of working memory per pixel) ->
    bool [H, W] numpy masks, one by one."""
    chunk = max(1, DECODE_PIXELS // math.prod(rles[0]["size"])) if rles else 1
    for start in range(0, len(rles), chunk):
        yield from rles_to_masks(rles[start : start + chunk], device).cpu().numpy()


def rle_to_mask(rle: dict) -> np.ndarray:
    """Uncompressed RLE -> bool [H, W] (numpy, C order)."""
    return rles_to_masks([rle])[0].numpy()


def rle_area(rle: dict) -> int:
    return int(np.sum(rle["counts"][1::2]))


def remove_small_regions(mask: np.ndarray, min_area: int, mode: str) -> tuple[np.ndarray, bool]:
    """Fill the holes ("holes") or drop the islands ("islands") of fewer than min_area pixels
    (8-connected) -> (mask, whether it changed). Islands mode keeps the largest if all are small."""
    from scipy import ndimage

    fill_holes = mode == "holes"
    regions, count = ndimage.label(mask != fill_holes, structure=np.ones((3, 3), dtype=bool))  # holes: background regions
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    small = np.flatnonzero(sizes < min_area) + 1
    if small.size == 0:
        return mask, False
    if fill_holes:
        return mask | np.isin(regions, small), True
    large = np.setdiff1d(np.arange(1, count + 1), small)
    return np.isin(regions, large if large.size else [int(np.argmax(sizes)) + 1]), True


def _select(data: dict, keep: torch.Tensor) -> dict:
    """Rows `keep` (bool mask or indices) of every tensor and list in data."""
    if keep.dtype == torch.bool:
        keep = keep.nonzero()[:, 0]
    keep = keep.cpu()
    return {k: [v[i] for i in keep.tolist()] if isinstance(v, list) else v[keep] for k, v in data.items()}


def _concat(parts: list[dict]) -> dict:
    return {k: sum((p[k] for p in parts), []) if isinstance(parts[0][k], list) else torch.cat([p[k] for p in parts]) for k in parts[0]}


class SamHQAutomaticMaskGenerator:
    def __init__(
        self,
        model: SamHQ,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ):
        """The original generator's arguments and defaults. points_per_side: the grid is n x n
        points per crop layer 0 (n / downscale_factor^i in layer i), or give point_grids (one [P, 2]
        array of (x, y) in [0, 1] per layer) instead. points_per_batch: prompts decoded together.
        pred_iou_thresh / stability_score_thresh: keep masks above them (0 turns a filter off).
        crop_n_layers > 0 adds 4, 16, ... overlapping crops, each set as its own image.
        min_mask_region_area > 0 fills small holes and removes small islands (needs scipy).
        output_mode: "binary_mask" (bool [H, W] numpy), "uncompressed_rle" or "coco_rle" (needs pycocotools).
        """
        if not isinstance(model, SamHQ):
            raise TypeError(f"model must be a samhq_fast SamHQ (from samhq_fast.load), got {type(model).__name__}")
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        counts = dict(
            points_per_side=(points_per_side, 1), points_per_batch=(points_per_batch, 1),
            crop_n_points_downscale_factor=(crop_n_points_downscale_factor, 1), crop_n_layers=(crop_n_layers, 0),
        )
        for name, (value, least) in counts.items():
            if not (value is None and name == "points_per_side") and (not isinstance(value, numbers.Integral) or value < least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        thresholds = dict(
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh, stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh, crop_nms_thresh=crop_nms_thresh, crop_overlap_ratio=crop_overlap_ratio,
            min_mask_region_area=min_mask_region_area,
        )
        for name, value in thresholds.items():
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if stability_score_offset < 0:  # the +offset mask must be the inner one, or every "stability" is >= 1
            raise ValueError(f"stability_score_offset must be >= 0 (stability compares the masks at logit thresholds "
                             f"+offset and -offset), got {stability_score_offset!r}")
        for name in ("box_nms_thresh", "crop_nms_thresh"):  # an IoU bound: below 0, every overlap-free box suppresses the next
            if not 0 <= thresholds[name] <= 1:
                raise ValueError(f"{name} must be an IoU in [0, 1] (1 keeps every mask), got {thresholds[name]!r}")
        if not 0 <= crop_overlap_ratio <= 1:  # crops wider than the image beyond 1: negative offsets
            raise ValueError(f"crop_overlap_ratio must be in [0, 1] (a fraction of the crop size), got {crop_overlap_ratio!r}")
        if output_mode == "coco_rle":
            _require("pycocotools", "output_mode='coco_rle'")
        if min_mask_region_area > 0:
            _require("scipy", "min_mask_region_area > 0")
        if point_grids is None:
            sides = [int(points_per_side / crop_n_points_downscale_factor**i) for i in range(crop_n_layers + 1)]
            if sides[-1] < 1:
                raise ValueError(f"points_per_side {points_per_side} / crop_n_points_downscale_factor^{crop_n_layers} leaves crop layer {crop_n_layers} no points")
            point_grids = [point_grid(side) for side in sides]
        elif len(point_grids) != crop_n_layers + 1:
            raise ValueError(f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), got {len(point_grids)}")
        self.point_grids = [_checked_grid(grid, i) for i, grid in enumerate(point_grids)]
        self.predictor = SamHQPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    @torch.inference_mode()
    def generate(self, image, multimask_output: bool = True, hq_token_only: bool = False) -> list[dict[str, Any]]:
        """image: what `SamHQPredictor.set_image` takes (numpy [H, W, 3] uint8 RGB, PIL, or a torch
        tensor) -> one record per mask: "segmentation" (per output_mode), "area" (pixels), "bbox"
        [x, y, w, h] (w = x_last - x_first: one short of the mask's width, as the original's),
        "predicted_iou", "point_coords" [[x, y]], "stability_score", "crop_box" [x, y, w, h].
        multimask_output / hq_token_only: as in `SamHQPredictor.predict` (one mask per point either way).
        """
        check_flags(multimask_output=multimask_output, hq_token_only=hq_token_only)
        if isinstance(image, torch.Tensor):
            rgb = as_rgb_uint8_torch(image, device=self.predictor.device, batched=image.ndim == 4)  # crops stay on the device
            if len(rgb) != 1:
                raise ValueError(f"generate takes one image, got a batch of shape {list(image.shape)}")
            # HWC: a crop one to four pixels wide is still read as HWC by set_image (CHW would be ambiguous)
            rgb = rgb[0].permute(1, 2, 0)
        elif isinstance(image, (np.ndarray, Image.Image)):
            rgb = as_rgb_uint8(image)  # crops take the original's PIL resize
        else:
            raise TypeError(f"image must be a numpy array, PIL image or torch tensor, got {type(image).__name__}")
        height, width = rgb.shape[:2]  # rgb: [H, W, 3]
        boxes, layers = crop_boxes(height, width, self.crop_n_layers, self.crop_overlap_ratio)
        # On a very small image, deep crop layers have crops 0 pixels wide or high: nothing to segment there.
        crops = [(box, layer) for box, layer in zip(boxes, layers) if box[2] > box[0] and box[3] > box[1]]
        parts = [self._process_crop(rgb, box, layer, (height, width), multimask_output, hq_token_only) for box, layer in crops]
        data = _concat(parts)
        if len(crops) > 1:  # the same object from several crops: prefer the smaller crop (more zoomed in)
            crop_area = (data["crop_boxes"][:, 2] - data["crop_boxes"][:, 0]) * (data["crop_boxes"][:, 3] - data["crop_boxes"][:, 1])
            data = _select(data, box_nms(data["boxes"], 1 / crop_area.double(), self.crop_nms_thresh))
        if self.min_mask_region_area > 0:
            data = self._remove_small_regions(data, max(self.box_nms_thresh, self.crop_nms_thresh))
        return self._records(data)

    def _process_crop(self, rgb, crop_box, layer, image_size, multimask_output, hq_token_only) -> dict:
        x0, y0, x1, y1 = crop_box
        self.predictor.set_image(rgb[y0:y1, x0:x1])
        points = self.point_grids[layer] * [x1 - x0, y1 - y0]  # crop pixels (x, y)
        parts = [
            self._process_batch(points[i : i + self.points_per_batch], crop_box, image_size, multimask_output, hq_token_only)
            for i in range(0, len(points), self.points_per_batch)
        ]
        self.predictor.reset_image()
        data = _concat(parts)
        data = _select(data, box_nms(data["boxes"], data["iou"], self.box_nms_thresh))
        data["boxes"] = data["boxes"] + torch.tensor([x0, y0, x0, y0])
        data["points"] = data["points"] + torch.tensor([x0, y0])
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]), dtype=torch.int64).reshape(-1, 4)
        return data

    def _process_batch(self, points: np.ndarray, crop_box, image_size, multimask_output, hq_token_only) -> dict:
        """points [B, 2] in crop pixels -> the masks that pass the filters, as RLEs in the full image.

        One decoder call for the B points. Masks under pred_iou_thresh are dropped before they are
        upsampled; the other filters see the full-size logits a few prompts at a time
        (`SamHQ.prompts_per_mask_chunk`), so a large points_per_batch on a large image does not hold
        B full-size fp32 logit maps at once (the original upsamples all B together)."""
        predictor = self.predictor
        x0, y0, x1, y1 = crop_box
        coords = predictor.transform.apply_coords(points, (y1 - y0, x1 - x0))
        coords = torch.as_tensor(coords, dtype=torch.float32, device=predictor.device)[:, None, :]  # [B, 1, 2]
        labels = torch.ones(len(points), 1, dtype=torch.int64, device=predictor.device)
        # predict_torch without its upsampling: [B, 1, 4G, 4G] low-res logits, [B, 1] scores
        low_res, iou = predictor._decode_low_res({0: (coords, labels, None, None, True)}, multimask_output, hq_token_only)[0]
        iou = iou[:, 0]
        if self.pred_iou_thresh > 0:
            passed = (iou > self.pred_iou_thresh).nonzero()[:, 0]
            low_res, iou, points = low_res[passed], iou[passed], points[passed.cpu().numpy()]
        chunk = predictor.model.prompts_per_mask_chunk(1, predictor.original_size)
        starts = range(0, max(len(points), 1), chunk)  # one empty part when every mask fell under the IoU threshold
        return _concat([self._filter_masks(low_res[i : i + chunk], iou[i : i + chunk], points[i : i + chunk], crop_box, image_size)
                        for i in starts])

    def _filter_masks(self, low_res: torch.Tensor, iou: torch.Tensor, points: np.ndarray, crop_box, image_size) -> dict:
        """low_res [b, 1, 4G, 4G] logits of b points of the crop set in the predictor, their iou [b]
        -> the masks that pass the stability and crop-edge filters, as RLEs in the full image."""
        predictor = self.predictor
        x0, y0, x1, y1 = crop_box
        logits = predictor._masks(low_res, predictor.input_size, predictor.original_size, return_logits=True)[:, 0]  # [b, h, w] crop pixels
        threshold = predictor.model.mask_threshold
        stability = stability_score(logits, threshold, self.stability_score_offset)
        keep = torch.ones_like(iou, dtype=torch.bool)
        if self.stability_score_thresh > 0:
            keep &= stability >= self.stability_score_thresh
        masks = logits > threshold
        boxes = mask_boxes(masks)
        keep &= ~self._cut_by_crop(boxes, crop_box, image_size)
        keep = keep.nonzero()[:, 0]
        masks, boxes = masks[keep], boxes[keep]
        height, width = image_size
        masks = torch.nn.functional.pad(masks, (x0, width - x1, y0, height - y1))  # back into the full image
        return {
            "rles": masks_to_rle(masks),
            "boxes": boxes.cpu(),
            "iou": iou[keep].float().cpu(),
            "stability": stability[keep].float().cpu(),
            "points": torch.as_tensor(points)[keep.cpu()],
        }

    @staticmethod
    def _cut_by_crop(boxes: torch.Tensor, crop_box, image_size) -> torch.Tensor:
        """boxes [N, 4] in crop pixels -> [N] bool: a side lies on an edge of the crop that is not an
        edge of the image (the object probably goes on outside the crop)."""
        x0, y0, x1, y1 = crop_box
        height, width = image_size
        # (side in image pixels, the crop's edge, the image's edge) with Python-number edges: no upload,
        # no sync; offset, then cast to float32, as the original
        sides = [((boxes[:, k] + offset).float(), crop_edge, image_edge)
                 for k, (offset, crop_edge, image_edge) in enumerate(((x0, x0, 0), (y0, y0, 0), (x0, x1, width), (y0, y1, height)))]
        cut = [((side - crop_edge).abs() <= CROP_EDGE_TOLERANCE) & ~((side - image_edge).abs() <= CROP_EDGE_TOLERANCE)
               for side, crop_edge, image_edge in sides]
        return torch.stack(cut, dim=1).any(dim=1)

    def _remove_small_regions(self, data: dict, nms_thresh: float) -> dict:
        """Fill small holes and drop small islands in every mask; where that changed masks that now
        overlap an unchanged one, NMS keeps the unchanged one."""
        if not data["rles"]:
            return data
        masks, unchanged = [], []
        for mask in decode_in_chunks(data["rles"]):  # on the host: scipy takes numpy masks
            mask, holes_changed = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, islands_changed = remove_small_regions(mask, self.min_mask_region_area, "islands")
            masks.append(torch.from_numpy(mask))
            unchanged.append(not (holes_changed or islands_changed))
        masks = torch.stack(masks)
        boxes = mask_boxes(masks)
        keep = box_nms(boxes, torch.tensor(unchanged, dtype=torch.float32), nms_thresh)
        data = dict(data, rles=list(data["rles"]), boxes=data["boxes"].clone())
        for i in keep.tolist():
            if not unchanged[i]:
                data["rles"][i] = masks_to_rle(masks[i : i + 1])[0]
                data["boxes"][i] = boxes[i]
        return _select(data, keep)

    def _segmentations(self, rles: list[dict]) -> list:
        """The records' "segmentation", per output_mode (binary masks decoded on the model's device)."""
        if self.output_mode == "uncompressed_rle":
            return [dict(rle, counts=rle["counts"].tolist()) for rle in rles]
        if self.output_mode == "coco_rle":
            from pycocotools import mask as coco_mask

            encoded = [coco_mask.frPyObjects(rle, *rle["size"]) for rle in rles]
            return [dict(rle, counts=rle["counts"].decode("utf-8")) for rle in encoded]
        return list(decode_in_chunks(rles, self.predictor.device))

    def _records(self, data: dict) -> list[dict]:
        """One record per mask, of plain Python values (each column leaves its tensor in one .tolist())."""
        columns = zip(data["rles"], self._segmentations(data["rles"]), data["boxes"].tolist(), data["crop_boxes"].tolist(),
                      data["iou"].tolist(), data["points"].tolist(), data["stability"].tolist())
        return [
            {
                "segmentation": segmentation,
                "area": rle_area(rle),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "predicted_iou": iou,
                "point_coords": [point],
                "stability_score": stability,
                "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
            }
            for rle, segmentation, (x0, y0, x1, y1), (cx0, cy0, cx1, cy1), iou, point, stability in columns
        ]


def _checked_grid(grid, layer: int) -> np.ndarray:
    """A user's point grid -> float64 [P, 2] (x, y) in [0, 1], or a ValueError naming the problem."""
    array = as_finite_array(grid, f"point_grids[{layer}]")  # (refuses ragged lists, strings, NaN, with the name)
    if array.ndim != 2 or array.shape[1] != 2 or len(array) == 0:
        raise ValueError(f"point_grids[{layer}] must be a [P, 2] array of (x, y) with P >= 1, got shape {list(array.shape)}")
    if array.min() < 0 or array.max() > 1:
        raise ValueError(f"point_grids[{layer}] must hold (x, y) fractions of the crop's size, in [0, 1], not pixels")
    return array


class MissingExtraError(ImportError):
    """An option that needs an optional dependency (the [amg] extra) that is not installed."""


def _require(module: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError as e:
        raise MissingExtraError(f"{what} needs {module}: pip install 'samhq-fast[amg]' (or pip install {module})") from e
