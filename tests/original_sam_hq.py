"""The original SAM-HQ release (PyPI `segment-anything-hq` 0.3, SysCV's own package) as a test oracle.

It is installed without its dependencies (`pip install --no-deps segment-anything-hq==0.3`, as
`.ci/run` does): it requires torchvision and timm, and the only torchvision wheels on PyPI are built
against CUDA torch (they fail to import next to the CPU wheel). The original imports four torchvision
functions and two timm names at module level; where the real packages do not import, minimal
stand-ins take their place while the original is imported (and only then). None touches the model math:
- `to_pil_image` / `resize` (ResizeLongestSide.apply_image): torchvision on a PIL image is PIL's
  bilinear `Image.resize`, the same call REFERENCE.md describes;
- `box_area` / `batched_nms` (automatic masks): a dense greedy NMS with torchvision's IoU rule
  (drop when IoU > threshold, areas (x1 - x0) * (y1 - y0)), best score first;
- timm's DropPath / to_2tuple / trunc_normal_ / register_model: used by TinyViT only (Light HQ-SAM,
  tests/test_tiny_vit.py), in eval mode: DropPath is the identity there (and `build_sam_vit_t` uses
  none: its drop-path rate is 0), trunc_normal_ only draws the initial weights the tests overwrite.
"""

import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

INSTALL_HINT = "pip install --no-deps segment-anything-hq==0.3"


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    def to_pil_image(image: np.ndarray) -> Image.Image:
        return Image.fromarray(image)

    def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:  # size (h, w), as torchvision
        return image.resize((size[1], size[0]), Image.BILINEAR)

    def box_area(boxes: torch.Tensor) -> torch.Tensor:
        return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        order = torch.sort(scores, descending=True, stable=True).indices
        boxes, idxs = boxes[order].double(), idxs[order]
        top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
        bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # [N, N]
        area = box_area(boxes)
        iou = inter / (area[:, None] + area[None, :] - inter)
        suppresses = (iou > iou_threshold) & (idxs[:, None] == idxs[None, :])
        alive = torch.ones(len(order), dtype=torch.bool)
        for i in range(len(order)):
            if alive[i]:
                alive[i + 1 :] &= ~suppresses[i, i + 1 :]
        return order[alive]

    modules = {name: types.ModuleType(name) for name in (
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops", "torchvision.ops.boxes")}
    modules["torchvision.transforms.functional"].__dict__.update(to_pil_image=to_pil_image, resize=resize)
    modules["torchvision.ops.boxes"].__dict__.update(box_area=box_area, batched_nms=batched_nms)
    return modules


def _timm_stand_in() -> dict[str, types.ModuleType]:
    class DropPath(torch.nn.Module):  # subclassed by the original at import time
        """Stochastic depth: the identity in eval mode, the only mode the tests run."""

        def __init__(self, drop_prob: float | None = None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and self.drop_prob:
                raise NotImplementedError("timm stand-in: DropPath runs in eval mode only")
            return x

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)

    modules = {name: types.ModuleType(name) for name in ("timm", "timm.models", "timm.models.layers", "timm.models.registry")}
    modules["timm.models.layers"].__dict__.update(DropPath=DropPath, to_2tuple=to_2tuple, trunc_normal_=trunc_normal_)
    modules["timm.models.registry"].__dict__.update(register_model=lambda fn: fn)
    return modules


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # torchvision's CUDA build next to CPU torch raises RuntimeError, not ImportError
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]
        return False


def import_original() -> types.ModuleType:
    """The `segment_anything_hq` package; skips the calling test where it is not installed, except
    under CI (CI=true), where a missing oracle is an error rather than a silent skip."""
    if importlib.util.find_spec("segment_anything_hq") is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"the original SAM-HQ package is missing: {INSTALL_HINT} (.ci/run installs it)")
        pytest.skip(f"original SAM-HQ not installed ({INSTALL_HINT})")
    if "segment_anything_hq" in sys.modules:
        return sys.modules["segment_anything_hq"]
    stand_ins = {}
    for name, make in (("torchvision", _torchvision_stand_in), ("timm", _timm_stand_in)):
        if not _importable(name):
            stand_ins.update(make())
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("segment_anything_hq")
    finally:  # the original holds the names it imported; nothing else in the session should see the stand-ins
        for name in stand_ins:
            del sys.modules[name]
