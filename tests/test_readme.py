"""The README's Python API block runs as written and gives the shapes its comments state.

Only what cannot run here is swapped: the checkpoint files are stand-ins (the tiny random-weight
model as "sam_hq_vit_h.pth", a real-size vit_b of zeros for the registry line, which only loads it),
the device is the CPU, "photo.jpg" is a synthetic 640x480 photo, and the automatic generator keeps
every mask of a 6 x 6 grid (random weights pass none of its default filters).
"""

import re
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from samhq_fast import SamHQ, SamHQConfig
from samhq_fast.modeling.sam_hq import ALL_VARIANTS
from test_predictor import make_photo

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python API block"
    return blocks[0]


def test_readme_python_api_runs(tiny_checkpoints, tmp_path, monkeypatch):
    code = readme_python_block()
    swaps = {'device="cuda"': 'device="cpu"',
             "SamHQAutomaticMaskGenerator(model)": "SamHQAutomaticMaskGenerator(model, points_per_side=6, pred_iou_thresh=0, "
                                                   "stability_score_thresh=0)"}
    for written, here in swaps.items():
        assert written in code
        code = code.replace(written, here)
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_checkpoints["pth"], "sam_hq_vit_h.pth")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SamHQ(SamHQConfig(encoder=ALL_VARIANTS["vit_b"])).state_dict().items()}
    zero = torch.zeros(())
    torch.save({k: zero.expand(s) for k, s in shapes.items()}, "sam_hq_vit_b.pth")  # one shared scalar: a few KB
    Image.fromarray(make_photo(480, 640, seed=5)).save("photo.jpg")

    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)

    height, width = 480, 640
    assert namespace["sam"].variant == "vit_b"
    # the first predict call's low-res logits: [1, 256, 256] for a 1024-input model, [1, 64, 64] for the tiny 256 one
    assert namespace["low_res"].shape == (1, 64, 64)
    # the last predict call: two boxes -> masks [N, 1, H, W] bool, scores [N, 1]
    masks, scores = namespace["masks"], namespace["scores"]
    assert masks.shape == (2, 1, height, width) and masks.dtype == np.bool_ and scores.shape == (2, 1)
    records = namespace["records"]
    assert records, "the automatic generator found no mask"
    for record in records:
        assert record["segmentation"].shape == (height, width) and record["segmentation"].dtype == np.bool_
        assert {"area", "bbox", "predicted_iou", "stability_score"} <= record.keys() and len(record["bbox"]) == 4
