"""The `samhq-fast` command line, run in-process on the example photo with the tiny random model;
the Python API (SamHQPredictor) is the independent reference for masks and scores."""

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import samhq_fast
from samhq_fast.build import DTYPE_NAMES, dtype_name
from samhq_fast.checkpoint import FOURIER_BASIS_KEY
from samhq_fast import cli
from samhq_fast.cli import PALETTE, POINT_COLORS, build_parser, main
from samhq_fast.predictor import SamHQPredictor
from samhq_fast.transforms import load_image
from original_sam_hq import import_original

PHOTO = Path(__file__).resolve().parents[1] / "assets" / "chelsea.jpg"


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints) -> str:
    return str(tiny_checkpoints["pth"])


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load_image(PHOTO)


@pytest.fixture(scope="module")
def predictor(ckpt, photo) -> SamHQPredictor:
    predictor = SamHQPredictor(samhq_fast.load(ckpt, device="cpu"))
    predictor.set_image(photo)
    return predictor


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def test_example_photo():
    with Image.open(PHOTO) as img:
        assert img.size[0] != img.size[1] and max(img.size) <= 640
    assert PHOTO.stat().st_size < 150_000
    assert "CC0" in (PHOTO.parent / "README.md").read_text()


# (CLI prompt options, the same prompt for SamHQPredictor.predict)
ONE_PROMPT_CASES = {
    "point": (["--point", "220,150"], dict(point_coords=[[220, 150]], point_labels=[1])),
    "point_and_negative": (["--point", "220,150", "--point", "40,30,0"], dict(point_coords=[[220, 150], [40, 30]], point_labels=[1, 0])),
    "box": (["--box", "100,50,350,280"], dict(box=[100, 50, 350, 280])),
    "multimask": (["--point", "220,150", "--multimask"], dict(point_coords=[[220, 150]], point_labels=[1], multimask_output=True)),
    # points and one box form one prompt
    "points_box_hq_only": (["--box", "100,50,350,280", "--point", "220.5,150.25,1", "--point", "120,260,0", "--hq-only"],
                           dict(point_coords=[[220.5, 150.25], [120, 260]], point_labels=[1, 0], box=[100, 50, 350, 280], hq_token_only=True)),
}


@pytest.mark.parametrize("case", list(ONE_PROMPT_CASES))
def test_segment_one_prompt(case, capsys, tmp_path, ckpt, photo, predictor):
    options, api_kwargs = ONE_PROMPT_CASES[case]
    mask_path, overlay_path, json_path = tmp_path / "mask.png", tmp_path / "overlay.png", tmp_path / "out.json"
    code, out, err = run(capsys, "segment", PHOTO, "--checkpoint", ckpt, *options,
                         "--output", mask_path, "--overlay", overlay_path, "--json", json_path)
    assert code == 0, err
    h, w = photo.shape[:2]

    api_kwargs = {"multimask_output": False, **api_kwargs}
    masks, scores, _ = predictor.predict(**{k: np.array(v) if isinstance(v, list) else v for k, v in api_kwargs.items()})
    assert masks.shape == (1, h, w)
    flags = {k: False for k in ("multimask_output", "hq_token_only") if api_kwargs.get(k)}
    if flags:  # the flag must matter for this prompt, or the comparison below would not test it
        other_masks, other_scores, _ = predictor.predict(**{**{k: np.array(v) if isinstance(v, list) else v for k, v in api_kwargs.items()}, **flags})
        assert not (np.array_equal(other_masks, masks) and np.array_equal(other_scores, scores))

    mask = read_png(mask_path)
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, masks[0])

    result = json.loads(json_path.read_text())
    assert result["image_size"] == [h, w] and result["variant"] == "custom"
    assert result["image"] == str(PHOTO) and result["checkpoint"] == ckpt
    (prompt,) = result["prompts"]
    assert prompt["score"] == pytest.approx(float(scores[0]), abs=1e-6)
    assert prompt["area"] == int(masks[0].sum())
    ys, xs = np.nonzero(masks[0])
    if len(xs):
        assert prompt["bbox_xywh"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    expected_points = np.array(api_kwargs.get("point_coords", np.zeros((0, 2)))).tolist()
    assert prompt["points"] == expected_points and prompt["labels"] == list(api_kwargs.get("point_labels", []))
    assert prompt["box"] == api_kwargs.get("box")

    overlay = read_png(overlay_path)
    assert overlay.shape == (h, w, 3)
    changed = np.abs(overlay.astype(int) - photo.astype(int)).sum(-1) > 0
    if masks[0].any():
        assert changed[masks[0]].mean() > 0.5  # the mask is blended in...
    if not masks[0].all():
        assert changed[~masks[0]].mean() < 0.05  # ...elsewhere only the prompts are drawn

    lines = [line for line in out.splitlines() if line.startswith("prompt ")]
    assert len(lines) == 1 and f"{scores[0]:.3f}" in lines[0]


def test_segment_several_boxes_writes_index_mask(capsys, tmp_path, ckpt, photo, predictor):
    boxes = [[10, 20, 200, 280], [230, 40, 440, 290], [150, 100, 300, 200]]
    mask_path, json_path = tmp_path / "objects.png", tmp_path / "objects.json"
    options = [opt for box in boxes for opt in ("--box", ",".join(map(str, box)))]
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, *options, "-o", mask_path, "--json", json_path, "--overlay", tmp_path / "o.jpg")
    assert code == 0, err
    h, w = photo.shape[:2]

    masks, scores, _ = predictor.predict(box=np.array(boxes), multimask_output=False)
    assert masks.shape == (3, 1, h, w)
    expected = np.zeros((h, w), np.uint8)
    for i in range(3):
        expected[masks[i, 0]] = i + 1  # later prompts over earlier ones
    index = read_png(mask_path)
    assert index.dtype == np.uint8 and set(np.unique(index)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(index, expected)

    result = json.loads(json_path.read_text())
    assert result["mask_format"] == "index" and len(result["prompts"]) == 3
    for i, prompt in enumerate(result["prompts"]):
        assert prompt["box"] == boxes[i] and prompt["points"] == []
        assert prompt["score"] == pytest.approx(float(scores[i, 0]), abs=1e-6)
        assert prompt["area"] == int(masks[i, 0].sum())
    assert read_png(tmp_path / "o.jpg").shape == (h, w, 3)
    assert len([line for line in out.splitlines() if line.startswith("prompt ")]) == 3


def test_segment_auto(capsys, tmp_path, ckpt, photo):
    """--auto: the generator's records (the tiny model's logits are small: loose filters), painted
    largest first into an index PNG, one JSON entry per mask."""
    mask_path, json_path = tmp_path / "all.png", tmp_path / "all.json"
    # (the tiny model's masks are overlapping blobs: box NMS off, or one would be left)
    filters = dict(pred_iou_thresh=0.0, stability_score_thresh=0.3, stability_score_offset=0.05, box_nms_thresh=1.0)
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--auto", "--points-per-side", 4, "--points-per-batch", 5, "--pred-iou-thresh", 0.0,
                         "--stability-thresh", 0.3, "--stability-offset", 0.05, "--box-nms-thresh", 1.0,
                         "-o", mask_path, "--json", json_path, "--overlay", tmp_path / "o.png")
    assert code == 0, err
    model = samhq_fast.load(ckpt, device="cpu")
    records = sorted(samhq_fast.SamHQAutomaticMaskGenerator(model, points_per_side=4, **filters).generate(photo), key=lambda r: -r["area"])
    assert 1 < len(records) <= 16 and f"{len(records)} masks from a 4x4 point grid" in out
    expected = np.zeros(photo.shape[:2], np.uint8)
    for i, record in enumerate(records):
        expected[record["segmentation"]] = i + 1
    np.testing.assert_array_equal(read_png(mask_path), expected)
    result = json.loads(json_path.read_text())
    assert result["mask_format"] == "index" and (result["auto"]["points_per_side"], result["auto"]["points_per_batch"]) == (4, 5)
    assert [(m["index"], m["area"]) for m in result["masks"]] == [(i + 1, r["area"]) for i, r in enumerate(records)]
    for entry, record in zip(result["masks"], records):  # the prompt mode's box convention (the original's is 1 px short)
        ys, xs = np.nonzero(record["segmentation"])
        assert entry["bbox_xywh"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert [m["score"] for m in result["masks"]] == pytest.approx([r["predicted_iou"] for r in records], abs=1e-6)
    assert read_png(tmp_path / "o.png").shape == (*photo.shape[:2], 3)


# ---------------------------------------------------------------------------------------------
# segment's outputs for masks known in advance: the tiny model's masks cover most of the photo, so
# stand-ins for the predictor and the generator give small rectangles and single rows instead


class RectanglePredictor:
    """Stands in for SamHQPredictor: prompt i's mask is RECTANGLES[i] (x0, y0, x1, y1, end exclusive)
    and its score 0.5 + i / 10, whatever the prompt."""

    RECTANGLES = [(30, 30, 110, 110), (160, 50, 290, 190), (270, 160, 410, 270)]  # the third overlaps the second

    def __init__(self, model):
        pass

    def set_image(self, image):
        self.size = image.shape[:2]

    def predict(self, box=None, point_coords=None, point_labels=None, multimask_output=False, hq_token_only=False):
        count = len(box) if box is not None and box.ndim == 2 else 1
        masks = np.zeros((count, 1, *self.size), dtype=bool)
        for i, (x0, y0, x1, y1) in enumerate(self.RECTANGLES[:count]):
            masks[i, 0, y0:y1, x0:x1] = True
        return masks, 0.5 + np.arange(count, dtype=np.float32)[:, None] / 10, None


def test_segment_outputs_of_known_masks(capsys, tmp_path, ckpt, photo, monkeypatch):
    """Index values (later prompts over earlier ones), per-prompt area and bbox, and the overlay's
    colours: mask i blended half-and-half with PALETTE[i], box i outlined in PALETTE[i]."""
    monkeypatch.setattr(cli, "SamHQPredictor", RectanglePredictor)
    boxes = [(20, 20, 120, 120), (150, 40, 300, 200), (260, 150, 420, 280)]
    options = [opt for box in boxes for opt in ("--box", ",".join(map(str, box)))]
    mask_path, json_path, overlay_path = tmp_path / "m.png", tmp_path / "m.json", tmp_path / "o.png"
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, *options, "-o", mask_path, "--json", json_path, "--overlay", overlay_path)
    assert code == 0, err
    index, overlay = read_png(mask_path), read_png(overlay_path).astype(int)
    prompts = json.loads(json_path.read_text())["prompts"]
    for i, (x0, y0, x1, y1) in enumerate(RectanglePredictor.RECTANGLES):
        assert prompts[i]["area"] == (x1 - x0) * (y1 - y0) and prompts[i]["bbox_xywh"] == [x0, y0, x1 - x0, y1 - y0]
        assert prompts[i]["score"] == pytest.approx(0.5 + i / 10)
        assert index[y0 + 5, x1 - 5] == i + 1  # (the second's bottom-right corner is under the third)
        inside = ((y0 + y1) // 2, (x0 + x1) // 2)  # the centre: in no other mask, on no outline
        np.testing.assert_array_equal(overlay[inside], np.round(0.5 * photo[inside] + 0.5 * np.array(PALETTE[i])))
        bx0, by0, _, by1 = boxes[i]
        np.testing.assert_array_equal(overlay[(by0 + by1) // 2, bx0], PALETTE[i])
    assert index[180, 280] == 3 and (index > 0).sum() == sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in RectanglePredictor.RECTANGLES) - 20 * 30


def test_segment_one_prompt_outputs_of_a_known_mask(capsys, tmp_path, ckpt, photo, monkeypatch):
    """One prompt: a 0/255 mask, "binary" in the JSON, foreground dots green and background red at (x, y)."""
    monkeypatch.setattr(cli, "SamHQPredictor", RectanglePredictor)
    mask_path, json_path, overlay_path = tmp_path / "m.png", tmp_path / "m.json", tmp_path / "o.PNG"  # any case
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "100,40", "--point", "40,100,0", "--box", "20,20,120,120",
                       "-o", mask_path, "--json", json_path, "--overlay", overlay_path)
    assert code == 0, err
    x0, y0, x1, y1 = RectanglePredictor.RECTANGLES[0]
    expected = np.zeros(photo.shape[:2], np.uint8)
    expected[y0:y1, x0:x1] = 255
    np.testing.assert_array_equal(read_png(mask_path), expected)
    result = json.loads(json_path.read_text())
    assert result["mask_format"] == "binary" and result["prompts"][0]["bbox_xywh"] == [x0, y0, x1 - x0, y1 - y0]
    overlay = read_png(overlay_path)
    np.testing.assert_array_equal(overlay[40, 100], POINT_COLORS[1])
    np.testing.assert_array_equal(overlay[100, 40], POINT_COLORS[0])


class RowGenerator:
    """Stands in for SamHQAutomaticMaskGenerator: COUNT records, record i the first i + 1 pixels of row i."""

    COUNT = 0

    def __init__(self, model, **settings):
        RowGenerator.settings = settings

    def generate(self, image, hq_token_only=False):
        RowGenerator.hq_token_only = hq_token_only
        records = []
        for i in range(self.COUNT):
            segmentation = np.zeros(image.shape[:2], dtype=bool)
            segmentation[i, : i + 1] = True
            records.append({"segmentation": segmentation, "area": i + 1, "point_coords": [[i + 0.5, 2 * i + 0.25]],
                            "predicted_iou": 0.9 - i / 1000, "stability_score": 0.8 - i / 1000,
                            "bbox": [0, i, i, 0], "crop_box": [0, 0, image.shape[1], image.shape[0]]})  # (the original's bbox: 1 px short)
        return records


@pytest.mark.parametrize("count, png_dtype", [(255, np.uint8), (256, np.uint16)])
def test_segment_auto_index_png_width(count, png_dtype, capsys, tmp_path, ckpt, monkeypatch):
    """Up to 255 masks an 8-bit index PNG, from 256 on 16-bit; largest first: row i (area i + 1) gets
    index count - i. The JSON carries each record's own point and stability."""
    monkeypatch.setattr(cli, "SamHQAutomaticMaskGenerator", RowGenerator)
    monkeypatch.setattr(RowGenerator, "COUNT", count)
    mask_path, json_path = tmp_path / "all.png", tmp_path / "all.json"
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--auto", "--hq-only", "-o", mask_path, "--json", json_path)
    assert code == 0, err
    assert RowGenerator.hq_token_only
    # no --auto option given: the generator gets the original's defaults
    defaults = inspect.signature(import_original().SamAutomaticMaskGenerator).parameters
    assert RowGenerator.settings == {name: defaults[name].default for name in RowGenerator.settings}
    assert set(RowGenerator.settings) == {"points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                                          "stability_score_offset", "box_nms_thresh", "crop_n_layers", "min_mask_region_area"}
    index = read_png(mask_path)
    assert index.dtype == png_dtype and index.max() == count
    for i in range(count):
        assert (index[i, : i + 1] == count - i).all() and not index[i, i + 1 :].any()
    masks = json.loads(json_path.read_text())["masks"]
    for entry in masks:
        i = count - entry["index"]  # the record painted with this index
        assert entry["point"] == [i + 0.5, 2 * i + 0.25] and entry["stability"] == pytest.approx(0.8 - i / 1000)
        assert entry["score"] == pytest.approx(0.9 - i / 1000) and entry["bbox_xywh"] == [0, i, i + 1, 1]


def read_amg_folder(folder: Path) -> tuple[list[str], list[list[float]], list[np.ndarray]]:
    """scripts/amg.py's layout: metadata.csv's header and rows (as numbers), and {id}.png for each row's id."""
    header, *rows = folder.joinpath("metadata.csv").read_text().split("\n")
    rows = [[float(v) for v in row.split(",")] for row in rows]
    return header.split(","), rows, [read_png(folder / f"{int(row[0])}.png") for row in rows]


def test_segment_auto_masks_dir(capsys, tmp_path, ckpt, photo):
    """--masks-dir: each of the generator's records (largest first, as in the index PNG) as its own
    0/255 PNG, and its values in metadata.csv's row, in the columns of the original's scripts/amg.py."""
    folder = tmp_path / "masks"
    filters = dict(pred_iou_thresh=0.0, stability_score_thresh=0.3, stability_score_offset=0.05, box_nms_thresh=1.0)
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--auto", "--points-per-side", 3, "--pred-iou-thresh", 0.0,
                         "--stability-thresh", 0.3, "--stability-offset", 0.05, "--box-nms-thresh", 1.0,
                         "-o", tmp_path / "all.png", "--masks-dir", folder)
    assert code == 0, err
    assert str(folder) in out.splitlines()[-1]
    records = sorted(samhq_fast.SamHQAutomaticMaskGenerator(samhq_fast.load(ckpt, device="cpu"), points_per_side=3, **filters).generate(photo),
                     key=lambda r: -r["area"])
    assert len(records) > 1
    header, rows, pngs = read_amg_folder(folder)
    assert header == ["id", "area", "bbox_x0", "bbox_y0", "bbox_w", "bbox_h", "point_input_x", "point_input_y", "predicted_iou",
                      "stability_score", "crop_box_x0", "crop_box_y0", "crop_box_w", "crop_box_h"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["metadata.csv", *(f"{i}.png" for i in range(len(records)))])
    for i, (row, png, record) in enumerate(zip(rows, pngs, records, strict=True)):
        # (Python's float text reads back to the same float: exact)
        assert row == [i, record["area"], *record["bbox"], *record["point_coords"][0], record["predicted_iou"], record["stability_score"],
                       *record["crop_box"]]
        assert png.dtype == np.uint8
        np.testing.assert_array_equal(png, record["segmentation"] * 255)
    index = read_png(tmp_path / "all.png")  # id i is the index PNG's value i + 1 (where no smaller mask was painted over it)
    assert all((png[index == i + 1] == 255).all() for i, png in enumerate(pngs))


def test_segment_auto_masks_dir_replaces_an_earlier_run(capsys, tmp_path, ckpt, monkeypatch):
    """A second run into the same folder leaves only its own masks: the earlier run's extra {id}.png
    and the temporaries of a killed run go."""
    monkeypatch.setattr(cli, "SamHQAutomaticMaskGenerator", RowGenerator)
    folder = tmp_path / "masks"
    for count in (5, 3):
        monkeypatch.setattr(RowGenerator, "COUNT", count)
        code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--auto", "-o", tmp_path / "all.png", "--masks-dir", folder)
        assert code == 0, err
        assert sorted(p.name for p in folder.iterdir()) == sorted(["metadata.csv", *(f"{i}.png" for i in range(count))])
        (folder / ".1.99999.partial.png").write_bytes(b"")  # as a killed run leaves: removed by the next one
    _, rows, pngs = read_amg_folder(folder)
    for i, (row, png) in enumerate(zip(rows, pngs)):  # largest first: row 2 - i of RowGenerator's, i.e. its first 3 - i pixels
        assert row[:6] == [i, 3 - i, 0, 2 - i, 2 - i, 0] and (png[2 - i, : 3 - i] == 255).all() and png.sum() == 255 * (3 - i)


AMG_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
              "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
# --masks-dir folders refused before the model runs: (files in it, message); None: a path that is not a folder
MASKS_DIR_REFUSED = {
    "other_files": ({"notes.txt": "mine", "metadata.csv": AMG_HEADER}, "holds other files (notes.txt): give a new or empty folder"),
    # numbered PNGs, but no earlier run's metadata.csv: a user's own (frames, say), not to be overwritten or deleted
    "own_numbered_pngs": ({"0.png": "frame", "12.png": "frame"}, "holds other files (0.png, 12.png)"),
    "own_metadata": ({"metadata.csv": "name,value", "0.png": "mask"}, "holds other files (0.png, metadata.csv)"),
    "not_a_name_it_writes": ({"metadata.csv": AMG_HEADER, "007.png": "mine", "1.PNG": "mine"}, "holds other files (007.png, 1.PNG)"),
    "a_subfolder": ({"metadata.csv": AMG_HEADER, "20.png/": None}, "holds other files (20.png)"),
    "a_file": (None, "is a file: give a folder"),
}


@pytest.mark.parametrize("case", list(MASKS_DIR_REFUSED))
def test_segment_auto_masks_dir_refused(case, capsys, tmp_path, ckpt, monkeypatch):
    """Refused before the model runs, with nothing written or removed: a folder holding anything but
    an earlier run's files (they would mix with the masks, or be replaced), or a file."""
    monkeypatch.setattr(cli, "SamHQAutomaticMaskGenerator", RowGenerator)
    monkeypatch.setattr(RowGenerator, "COUNT", 2)
    folder, mask_path = tmp_path / "masks", tmp_path / "all.png"
    files, message = MASKS_DIR_REFUSED[case]
    if files is None:
        folder.write_text("mine")
    else:
        folder.mkdir()
        for name, text in files.items():
            (folder / name).mkdir() if name.endswith("/") else (folder / name).write_text(text)
    before = sorted(folder.iterdir()) if folder.is_dir() else folder.read_text()
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--auto", "-o", mask_path, "--masks-dir", folder)
    assert (code, out) == (2, "") and message in err and "Traceback" not in err
    assert not mask_path.exists() and (sorted(folder.iterdir()) if folder.is_dir() else folder.read_text()) == before
    if files:
        assert all((folder / name).is_dir() if name.endswith("/") else (folder / name).read_text() == text for name, text in files.items())


@pytest.mark.parametrize("case", ["output_inside", "output_is_it", "without_auto"])
def test_segment_auto_masks_dir_usage_errors(case, capsys, tmp_path, ckpt):
    """--masks-dir with an output inside it or at its path (a file where the folder would go), or
    without --auto: a usage error before the model runs, nothing written."""
    folder, mask_path, json_path = tmp_path / "masks", tmp_path / "all.png", tmp_path / "all.json"
    if case == "output_inside":
        folder.mkdir()
        mask_path = folder / "all.png"
    elif case == "output_is_it":
        folder = json_path
    options = ["--point", "220,150"] if case == "without_auto" else ["--auto"]
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, *options, "-o", mask_path, "--json", json_path, "--masks-dir", folder)
    message = "--masks-dir applies only to --auto" if case == "without_auto" else "--masks-dir needs a folder of its own"
    assert (code, out) == (2, "") and message in err
    assert not mask_path.exists() and not json_path.exists() and (list(folder.iterdir()) == [] if case == "output_inside" else not folder.exists())


def test_segment_auto_masks_dir_failed_write_leaves_nothing(capsys, tmp_path, ckpt, monkeypatch):
    """A write that fails (here the last mask's) leaves no output, and no folder the run created."""
    monkeypatch.setattr(cli, "SamHQAutomaticMaskGenerator", RowGenerator)
    monkeypatch.setattr(RowGenerator, "COUNT", 3)
    real_outputs = cli._masks_dir_outputs

    def failing_last_png(folder, records):
        outputs = real_outputs(folder, records)

        def full_disk(path):
            raise OSError(28, "No space left on device", str(path))

        outputs[len(records) - 1] = (*outputs[len(records) - 1][:2], full_disk)
        return outputs

    monkeypatch.setattr(cli, "_masks_dir_outputs", failing_last_png)
    folder, mask_path = tmp_path / "new", tmp_path / "all.png"
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--auto", "-o", mask_path, "--masks-dir", folder)
    assert code == 2 and f"could not write --masks-dir {folder / '2.png'}: No space left on device" in err
    assert not mask_path.exists() and not folder.exists()


def test_segment_auto_crop_layers_and_clean_up(capsys, tmp_path, ckpt, photo, monkeypatch):
    """--crop-n-layers and --min-mask-region-area reach the generator: the index PNG is the API's
    records with those settings, painted largest first."""
    pytest.importorskip("scipy")

    class Recording(samhq_fast.SamHQAutomaticMaskGenerator):
        def __init__(self, model, **settings):
            Recording.settings = settings
            super().__init__(model, **settings)

    monkeypatch.setattr(cli, "SamHQAutomaticMaskGenerator", Recording)
    options = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05, box_nms_thresh=1.0,
                   crop_n_layers=1, min_mask_region_area=40)
    mask_path, json_path = tmp_path / "all.png", tmp_path / "all.json"
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--auto", "--points-per-side", 2, "--pred-iou-thresh", 0.0, "--stability-thresh", 0.0,
                         "--stability-offset", 0.05, "--box-nms-thresh", 1.0, "--crop-n-layers", 1, "--min-mask-region-area", 40,
                         "-o", mask_path, "--json", json_path)
    assert code == 0, err
    assert (Recording.settings["crop_n_layers"], Recording.settings["min_mask_region_area"]) == (1, 40) and "(and 1 crop layer)" in out
    records = sorted(samhq_fast.SamHQAutomaticMaskGenerator(samhq_fast.load(ckpt, device="cpu"), **options).generate(photo),
                     key=lambda r: -r["area"])
    expected = np.zeros(photo.shape[:2], np.uint8)
    for i, record in enumerate(records):
        expected[record["segmentation"]] = i + 1
    np.testing.assert_array_equal(read_png(mask_path), expected)
    settings = json.loads(json_path.read_text())["auto"]
    assert (settings["crop_n_layers"], settings["min_mask_region_area"]) == (1, 40)


def test_segment_auto_names_a_missing_extra(capsys, tmp_path, ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy fails, as without the [amg] extra
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--auto", "--min-mask-region-area", 10, "-o", tmp_path / "m.png")
    assert (code, out) == (2, "") and err == "samhq-fast: error: min_mask_region_area > 0 needs scipy: pip install 'samhq-fast[amg]' (or pip install scipy)\n"
    assert not (tmp_path / "m.png").exists()


def test_segment_auto_json_is_strict_json(capsys, tmp_path, ckpt, monkeypatch):
    """An empty mask kept with the stability filter off has a 0 / 0 stability score (NaN, in the
    original too): the JSON says null, not Python's NaN token, which strict parsers refuse."""

    class EmptyMaskGenerator(RowGenerator):
        def generate(self, image, hq_token_only=False):
            return [{**record, "stability_score": math.nan} if i == 1 else record
                    for i, record in enumerate(super().generate(image, hq_token_only))]

    monkeypatch.setattr(cli, "SamHQAutomaticMaskGenerator", EmptyMaskGenerator)
    monkeypatch.setattr(RowGenerator, "COUNT", 3)
    json_path = tmp_path / "all.json"
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--auto", "-o", tmp_path / "all.png", "--json", json_path)
    assert code == 0, err

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    masks = json.loads(json_path.read_text(), parse_constant=refuse)["masks"]
    assert [entry["stability"] is None for entry in masks] == [False, True, False]  # index 2: row 1, area 2
    assert masks[0]["stability"] == pytest.approx(0.8 - 2 / 1000)


def test_segment_refuses_more_boxes_than_an_8_bit_index_holds(capsys, tmp_path, ckpt):
    options = [opt for i in range(256) for opt in ("--box", f"{i % 400},1,{i % 400 + 10},20")]
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, *options, "-o", tmp_path / "m.png")
    assert code == 2 and "at most 255 --box prompts" in err


# ---------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("source", ["pth", "hf_st"])
def test_convert(layout, source, capsys, tmp_path, tiny_checkpoints, tiny_model):
    out_path = tmp_path / "converted.safetensors"
    code, out, err = run(capsys, "convert", tiny_checkpoints[source], out_path, "--layout", layout)
    assert code == 0, err
    assert "custom" in out and f"{layout} layout" in out
    keys = load_file(out_path).keys()
    prefix = "vision_encoder." if layout == "hf" else "image_encoder."
    assert any(k.startswith(prefix) for k in keys)
    loaded = samhq_fast.load(out_path, device="cpu")
    reference = tiny_model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, reference[k]), k


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_convert_output_permissions_follow_the_umask(capsys, tmp_path, tiny_checkpoints, umask):
    """As any new file: readable by others under umask 022 (safetensors alone leaves 0600)."""
    old_umask = os.umask(umask)
    try:
        code, _, err = run(capsys, "convert", tiny_checkpoints["pth"], tmp_path / "out.safetensors", "--layout", "HF")
    finally:
        os.umask(old_umask)
    assert code == 0, err
    assert (tmp_path / "out.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_paths_may_start_at_the_home_folder(capsys, tmp_path, monkeypatch, ckpt, predictor):
    """"~/..." (quoted, or --opt=~/... in shells that leave it) is the home folder, for every path argument."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photo.jpg").write_bytes(PHOTO.read_bytes())
    (tmp_path / "model.pth").write_bytes(Path(ckpt).read_bytes())
    code, _, err = run(capsys, "segment", "~/photo.jpg", "--checkpoint=~/model.pth", "--box", "10,20,200,280",
                       "-o", "~/mask.png", "--overlay", "~/overlay.png", "--json", "~/result.json")
    assert code == 0, err
    expected, _, _ = predictor.predict(box=np.array([10, 20, 200, 280]), multimask_output=False)
    np.testing.assert_array_equal(read_png(tmp_path / "mask.png"), expected[0].astype(np.uint8) * 255)
    assert (tmp_path / "overlay.png").is_file() and json.loads((tmp_path / "result.json").read_text())["prompts"]
    code, _, err = run(capsys, "convert", "~/model.pth", "~/model.safetensors")
    assert code == 0, err
    assert samhq_fast.load(tmp_path / "model.safetensors", device="cpu").state_dict().keys() == predictor.model.state_dict().keys()


class _OverlayTooLarge:
    """An overlay whose save writes part of a file, then fails as PIL does for an image beyond its format's limits."""

    def save(self, path):
        Path(path).write_bytes(b"RIFF half a file")
        raise OSError("encoding error 5: Image size exceeds WebP limit of 16383 pixels")


@pytest.mark.parametrize("prompt", [["--point", "220,150"], ["--auto", "--points-per-side", "2"]], ids=["point", "auto"])
def test_a_failed_output_leaves_no_output_behind(capsys, tmp_path, ckpt, monkeypatch, prompt):
    """Outputs are written to temporary files and moved into place together: one that cannot be written
    leaves neither a half-written file nor the others, and the error names it."""
    monkeypatch.setattr(cli, "draw_overlay", lambda *args, **kwargs: _OverlayTooLarge())
    overlay = tmp_path / "overlay.webp"
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, *prompt, "-o", tmp_path / "m.png", "--overlay", overlay, "--json", tmp_path / "r.json")
    assert code == 2 and out == ""
    assert err == f"samhq-fast: error: could not write --overlay {overlay}: encoding error 5: Image size exceeds WebP limit of 16383 pixels\n"
    assert list(tmp_path.iterdir()) == []


def test_an_output_through_a_symlink_is_written_where_it_points(capsys, tmp_path, ckpt):
    (tmp_path / "store").mkdir()
    (tmp_path / "mask.png").symlink_to(tmp_path / "store" / "mask.png")
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "220,150", "-o", tmp_path / "mask.png")
    assert code == 0, err
    assert (tmp_path / "mask.png").is_symlink() and read_png(tmp_path / "store" / "mask.png").shape == load_image(PHOTO).shape[:2]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["mask.png"]


def test_max_image_pixels(capsys, tmp_path, ckpt, monkeypatch):
    """An image over PIL's decompression-bomb limit: the error names the CLI's way out, which reads it
    (and leaves PIL's limit as it was)."""
    with Image.open(PHOTO) as photo:
        photo.resize((60, 40)).save(tmp_path / "big.png")  # 2,400 pixels > 2 x 1,000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    prompt = ["--point", "30,20", "-o", tmp_path / "m.png"]
    code, _, err = run(capsys, "segment", tmp_path / "big.png", "-c", ckpt, *prompt)
    assert code == 2 and "is too large to read safely" in err and "(here: --max-image-pixels N, or 0 for no limit)" in err
    for limit in (0, 1200):  # 1,200: PIL warns above it, refuses above twice it
        code, _, err = run(capsys, "segment", tmp_path / "big.png", "-c", ckpt, *prompt, "--max-image-pixels", limit)
        assert code == 0, err
        assert Image.MAX_IMAGE_PIXELS == 1000
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # to read the mask here
        assert read_png(tmp_path / "m.png").shape == (40, 60)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


def test_ctrl_c_is_one_line_and_writes_nothing(capsys, tmp_path, ckpt, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.SamHQPredictor, "predict", interrupted)
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "220,150", "-o", tmp_path / "m.png")
    assert (code, out, err) == (130, "", "samhq-fast: interrupted\n")
    assert list(tmp_path.iterdir()) == []


def test_a_closed_stdout_costs_no_file(tmp_path, ckpt):
    """`samhq-fast segment ... | head -0`: every file is written before the summary is printed; the
    closed pipe ends the run quietly with the shell's SIGPIPE status, without a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's stdout is block-buffered, as in a shell
    process = subprocess.Popen([sys.executable, "-m", "samhq_fast", "segment", str(PHOTO), "-c", ckpt, "--point", "220,150",
                                "-o", str(tmp_path / "m.png"), "--json", str(tmp_path / "r.json")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    process.stdout.close()  # the reader is gone before anything is printed
    err = process.stderr.read()
    assert process.wait(timeout=300) == 141 and err == "", err[-2000:]
    assert read_png(tmp_path / "m.png").shape == load_image(PHOTO).shape[:2]
    assert json.loads((tmp_path / "r.json").read_text())["prompts"]


def test_python_dash_m_runs_the_cli_and_warnings_are_one_line(tmp_path, ckpt):
    """`python -m samhq_fast` is the CLI; a library warning (here: the kill switch overriding --backend
    fused) prints as one "samhq-fast: warning:" line, not Python's file:line and source line."""
    env = {**os.environ, "SAMHQ_FAST_DISABLE_FUSED": "1"}
    result = subprocess.run([sys.executable, "-m", "samhq_fast", "segment", str(PHOTO), "-c", ckpt, "--point", "220,150",
                             "--backend", "fused", "-o", str(tmp_path / "m.png")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    warning = [line for line in result.stderr.splitlines() if line.strip()]
    assert warning == ["samhq-fast: warning: backend='fused' asked for, but SAMHQ_FAST_DISABLE_FUSED is set: using the eager reference"]
    assert (tmp_path / "m.png").is_file()


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("half", torch.float16), ("FLOAT16", torch.float16),
                                               ("bf16", torch.bfloat16)])
def test_convert_dtype(capsys, tmp_path, tiny_checkpoints, tiny_model, dtype, torch_dtype):
    out_path = tmp_path / "half.safetensors"
    code, _, err = run(capsys, "convert", tiny_checkpoints["pth"], out_path, "--dtype", dtype)
    assert code == 0, err
    tensors = load_file(out_path)
    for k, v in tiny_model.state_dict().items():
        if k == FOURIER_BASIS_KEY:  # kept fp32, as half models keep it
            assert tensors[k].dtype == torch.float32 and torch.equal(tensors[k], v), k
        else:
            assert tensors[k].dtype == torch_dtype and torch.equal(tensors[k], v.to(torch_dtype)), k


def test_convert_refuses_weights_beyond_fp16s_range(capsys, tmp_path, tiny_model):
    """fp16 tops out at 65504: a larger weight would be written as inf, which load then refuses."""
    state_dict = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state_dict["mask_decoder.iou_token.weight"][0, 0] = 1e5
    source, out_path = tmp_path / "large.pth", tmp_path / "half.safetensors"
    torch.save(state_dict, source)
    code, _, err = run(capsys, "convert", source, out_path, "--dtype", "fp16")
    assert code == 2 and "1 tensors hold values beyond fp16's range (e.g. mask_decoder.iou_token.weight)" in err
    assert not out_path.exists()


def test_convert_rejects_bad_input_before_writing(capsys, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(3)}, bad)
    out_path = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "convert", bad, out_path)
    assert code == 2 and "samhq-fast: error:" in err and "Traceback" not in err
    assert not out_path.exists()


def test_convert_write_failure_is_one_line(capsys, tmp_path, tiny_checkpoints, monkeypatch):
    # safetensors reports a full disk or a read-only folder as its own SafetensorError.
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code, _, err = run(capsys, "convert", tiny_checkpoints["pth"], tmp_path / "out.safetensors")
    assert code == 2 and "could not write" in err and "No space left on device" in err and "Traceback" not in err


def test_convert_needs_safetensors_output(capsys, tmp_path, tiny_checkpoints):
    code, _, err = run(capsys, "convert", tiny_checkpoints["pth"], tmp_path / "out.pth")
    assert code == 2 and ".safetensors" in err
    assert not (tmp_path / "out.pth").exists()


# ---------------------------------------------------------------------------------------------
# errors: exit status 2, one message naming the problem, no traceback, no output file


ERROR_CASES = {
    "no_prompt": ([], "at least one prompt"),
    "point_syntax": (["--point", "12"], "argument --point/-p: expected X,Y"),
    "point_not_number": (["--point", "a,b"], "argument --point/-p: expected X,Y"),
    "point_label": (["--point", "10,10,5"], "LABEL must be 1 (foreground) or 0 (background)"),
    "box_syntax": (["--box", "1,2,3"], "argument --box/-b: expected X1,Y1,X2,Y2"),
    "box_inverted": (["--box", "300,50,100,200"], "x2 > x1"),
    "point_outside": (["--point", "5000,100"], "far outside the 451x300"),
    "bad_device": (["--point", "220,150", "--device", "gpu0"], "device must be like"),
    # meta used to fail inside predict, xpu inside torch: both with a traceback
    "meta_device": (["--point", "220,150", "--device", "meta"], "device 'meta' is not supported: use 'cpu'"),
    "xpu_device": (["--point", "220,150", "--device", "xpu"], "device 'xpu' is not supported: use 'cpu'"),
    "bad_dtype": (["--point", "220,150", "--dtype", "fp8"], "unknown dtype fp8: choose from fp32,float32,fp16"),
    "bad_backend": (["--point", "220,150", "--backend", "turbo"], "argument --backend: invalid choice: 'turbo'"),
    "points_with_several_boxes": (["--point", "220,150", "--box", "10,20,200,280", "--box", "230,40,440,290"], "--point cannot be combined with several --box"),
    "auto_with_a_prompt": (["--auto", "--box", "10,20,200,280"], "--auto segments everything without prompts: drop --point / --box"),
    # ignoring them would hide a forgotten --auto
    "auto_options_without_auto": (["--point", "220,150", "--stability-offset", "0.5", "--points-per-side", "8"],
                                  "--points-per-side, --stability-offset apply only to --auto"),
    "auto_option_without_auto": (["--point", "220,150", "--box-nms-thresh", "0.5"], "--box-nms-thresh applies only to --auto"),
    "auto_with_multimask": (["--auto", "--multimask"], "--multimask applies to prompts; --auto keeps every candidate mask"),
    # refused while parsing, before a (vit_h: 2.5 GB) checkpoint is loaded
    "auto_no_grid": (["--auto", "--points-per-side", "0"], "argument --points-per-side: expected a positive integer, got '0'"),
    "auto_nan_thresh": (["--auto", "--pred-iou-thresh", "nan"], "argument --pred-iou-thresh: expected a finite number, got 'nan'"),
    "auto_negative_offset": (["--auto", "--stability-offset", "-1"], "argument --stability-offset: expected a number >= 0, got '-1'"),
    "auto_negative_crop_layers": (["--auto", "--crop-n-layers", "-1"], "argument --crop-n-layers: expected an integer >= 0, got '-1'"),
    "crop_layers_without_auto": (["--point", "220,150", "--crop-n-layers", "1"], "--crop-n-layers applies only to --auto"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_segment_prompt_errors(case, capsys, tmp_path, ckpt):
    options, message = ERROR_CASES[case]
    code, out, err = run(capsys, "segment", PHOTO, "-c", ckpt, *options, "-o", tmp_path / "m.png")
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m.png").exists()


def test_segment_auto_options_checked_before_the_checkpoint(capsys, tmp_path):
    # a missing checkpoint would be named if the model were loaded first
    code, _, err = run(capsys, "segment", PHOTO, "-c", tmp_path / "missing.pth", "--auto", "--stability-offset", "-0.5",
                       "-o", tmp_path / "m.png")
    assert code == 2 and "--stability-offset: expected a number >= 0" in err and "missing.pth" not in err


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a torch without MPS")
def test_segment_mps_device_without_mps(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "220,150", "--device", "mps", "-o", tmp_path / "m.png")
    assert code == 2 and err.startswith("samhq-fast: error:") and "MPS" in err and "Traceback" not in err
    assert not (tmp_path / "m.png").exists()


def test_negative_coordinates_are_values():
    """A box past the left border and points above or left of the image, written plainly: argparse
    before Python 3.14 read "-10,20,200,280" as an unknown option ("expected one argument")."""
    args = build_parser().parse_args(["segment", "x.jpg", "-c", "c.pth", "--box", "-10,20,200,280", "--point", "40,-3",
                                      "-p", "-3.5,40,0", "-o", "m.png"])
    assert args.box == [(-10, 20, 200, 280)] and args.point == [(40, -3, 1), (-3.5, 40, 0)]
    with pytest.raises(SystemExit):  # an option name where a value belongs is still an error
        build_parser().parse_args(["segment", "x.jpg", "-c", "c.pth", "--box", "-o", "m.png"])


@pytest.mark.parametrize("command", [["segment", "x.jpg", "-c", "c.pth", "-o", "m.png"], ["convert", "a.pth", "b.safetensors"]])
def test_dtype_names_are_those_load_accepts(command):
    # The CLI takes every name samhq_fast.load takes, in any case, and passes on its short name.
    parser = build_parser()
    for name in DTYPE_NAMES:
        for given in (name, name.upper()):
            expected = dtype_name(name)
            assert parser.parse_args([*command, "--dtype", given]).dtype == expected, given
    assert {dtype_name(n) for n in DTYPE_NAMES} == {"fp32", "fp16", "bf16"}
    assert "half" in DTYPE_NAMES and "float16" in DTYPE_NAMES


def test_segment_dtype_alias(capsys, tmp_path, ckpt):
    json_path = tmp_path / "out.json"
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "220,150", "--dtype", "half", "-o", tmp_path / "m.png",
                       "--json", json_path)
    assert code == 0, err
    assert json.loads(json_path.read_text())["dtype"] == "fp16"


def test_segment_fused_backend_gives_the_eager_mask(capsys, tmp_path, ckpt, kernel_spies):
    """--backend reaches load: fused (here under the Triton interpreter) runs the Triton kernels and gives
    eager's mask and score; the JSON says which backend ran."""
    results = {}
    for backend in ("EAGER", "fused"):
        mask_path, json_path = tmp_path / f"{backend}.png", tmp_path / f"{backend}.json"
        code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--box", "100,50,350,280", "--backend", backend,
                           "-o", mask_path, "--json", json_path)
        assert code == 0, err
        attention_ran = bool(kernel_spies["attention"].launches)
        assert attention_ran == (backend == "fused")
        results[backend] = read_png(mask_path), json.loads(json_path.read_text())
    (eager_mask, eager_json), (fused_mask, fused_json) = results["EAGER"], results["fused"]
    assert (eager_json["backend"], fused_json["backend"]) == ("eager", "fused")
    assert (eager_mask != fused_mask).mean() < 1e-3  # fp32 logits agree to ~1e-5: a pixel may flip at the threshold
    assert fused_json["prompts"][0]["score"] == pytest.approx(eager_json["prompts"][0]["score"], abs=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fused backend runs on a CUDA machine")
def test_segment_fused_backend_where_it_cannot_run(capsys, tmp_path, ckpt, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "220,150", "--backend", "fused", "-o", tmp_path / "m.png")
    assert code == 2 and "backend='fused' cannot run here: Triton kernels need a CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "m.png").exists()


def test_segment_input_errors(capsys, tmp_path, ckpt):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a photo")
    cases = [
        ([tmp_path / "missing.jpg", "-c", ckpt], "image file not found"),
        ([not_an_image, "-c", ckpt], "could not read image"),
        ([PHOTO, "-c", tmp_path / "missing.pth"], "checkpoint not found"),
        ([PHOTO, "-c", not_an_image], "could not read checkpoint"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, "segment", *args, "--point", "10,10", "-o", tmp_path / "m.png")
        assert code == 2 and err.startswith("samhq-fast: error:") and message in err, (args, err)
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "10,10", "-o", tmp_path / "m.jpg")
    assert code == 2 and "--output must end in .png" in err
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "10,10", "-o", tmp_path / "no_dir" / "m.png")
    assert code == 2 and "does not exist" in err
    (tmp_path / "folder.png").mkdir()
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "10,10", "-o", tmp_path / "folder.png")
    assert code == 2 and "folder.png is a folder: give a file name" in err and "Traceback" not in err
    code, _, err = run(capsys, "segment", PHOTO, "-c", ckpt, "--point", "10,10", "-o", tmp_path / "m.png", "--overlay", tmp_path / "m.png")
    assert code == 2 and "must be different files" in err
    assert not list(tmp_path.glob("m.*"))


# ---------------------------------------------------------------------------------------------
# help


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "segment" in out and "convert" in out and "(x, y)" in out
    code, out, _ = run(capsys, "segment", "--help")
    assert code == 0
    for word in ("--checkpoint", "--point", "--box", "--multimask", "--hq-only", "--output", "--overlay", "--json",
                 "--device", "--dtype", "X,Y[,LABEL]", "index", "example"):
        assert word in out, word
    code, out, _ = run(capsys, "convert", "--help")
    assert code == 0 and "--layout" in out and "--dtype" in out and ".safetensors" in out and "example" in out
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "samhq_fast.cli", "segment", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--point" in result.stdout
