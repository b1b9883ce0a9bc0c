"""Command-line interface: `samhq-fast segment` (prompt an image, write masks) and `samhq-fast convert`
(re-save a checkpoint as safetensors in the original or HF key layout). Run `samhq-fast --help`."""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import samhq_fast
from samhq_fast.build import resolve_dtype
from samhq_fast.checkpoint import hf_to_original, is_hf_layout, original_to_hf, read_state_dict
from samhq_fast.predictor import SamHQPredictor
from samhq_fast.transforms import load_image

DTYPES = ("fp32", "fp16", "bf16")
# Distinct overlay colors (matplotlib's tab10), one per prompt, cycling.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
POINT_COLORS = {1: (0, 255, 0), 0: (255, 0, 0)}  # foreground green, background red
FORMATTER = argparse.RawDescriptionHelpFormatter  # keep the line breaks of the descriptions
OVERLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

MAIN_HELP = """\
SAM-HQ (Segment Anything in High Quality) inference from the command line.

Coordinates are always (x, y) pixels of the ORIGINAL image: x to the right, y down, origin at
the top-left corner, whatever size the model resizes the image to internally.
Checkpoints: an original SAM-HQ .pth (sam_hq_vit_b.pth ...), a .safetensors file in the
original or Hugging Face key layout, an HF model folder, or a hub id; the variant
(vit_b / vit_l / vit_h) is inferred from the tensor shapes.
"""
MAIN_EPILOG = """\
examples:
  samhq-fast segment assets/chelsea.jpg --checkpoint sam_hq_vit_b.pth --point 220,150 --output mask.png
  samhq-fast convert sam_hq_vit_b.pth sam_hq_vit_b.safetensors --layout hf

Run `samhq-fast COMMAND --help` for the options of each command.
"""

SEGMENT_HELP = """\
Segment objects in IMAGE from point and/or box prompts and write the mask(s) as PNG.

Prompts (pixels of the original image, x right, y down, origin top-left):
  --point X,Y[,LABEL]   a click; LABEL 1 = foreground (default), 0 = background.
  --box X1,Y1,X2,Y2     a box, top-left and bottom-right corners (X2 > X1, Y2 > Y1).
All --point options together with at most one --box form ONE prompt (one object, as in
SAM's click workflow). Several --box options give one prompt (object) per box; they
cannot be combined with --point (run the command once per object instead).

Outputs:
  --output MASK.png   one prompt: a binary 8-bit PNG, 255 = object, 0 = background.
                      N > 1 prompts: an 8-bit index PNG, 0 = background, i + 1 where the
                      mask of prompt i (the i-th --box, from 0) is set; where masks overlap,
                      the later prompt wins. Always the size of the input image.
  --overlay FILE      the photo with each mask blended in a distinct color and the prompts
                      drawn (green dots foreground, red dots background, box outlines).
  --json FILE         per-prompt prompts, predicted IoU score, mask area and bounding box.
A one-line summary per prompt is printed to stdout.
"""
SEGMENT_EPILOG = """\
examples:
  # one click on the object
  samhq-fast segment assets/chelsea.jpg --checkpoint sam_hq_vit_b.pth --point 220,150 --output mask.png
  # a click plus a background click, best of SAM's 3 candidate masks, with an overlay
  samhq-fast segment assets/chelsea.jpg --checkpoint sam_hq_vit_b.pth --point 220,150 --point 40,30,0 \\
      --multimask --output mask.png --overlay overlay.jpg --json result.json
  # two objects, one box each -> index mask (values 0, 1, 2)
  samhq-fast segment assets/chelsea.jpg --checkpoint sam_hq_vit_b.pth --box 10,20,200,280 --box 230,40,440,290 \\
      --output objects.png
Negative coordinates need the `=` form: --point=-3,40.
"""

CONVERT_HELP = """\
Re-save a SAM-HQ checkpoint as one .safetensors file, in the original SAM-HQ key layout
(image_encoder.*, mask_decoder.hf_token ...) or the Hugging Face `SamHQModel` layout
(vision_encoder.*, mask_decoder.hq_token ...). IN may be anything `samhq_fast.load` reads
(.pth, .safetensors in either layout, an HF folder, a hub id). IN is checked by building the
model from it before anything is written; OUT must end in .safetensors.
"""
CONVERT_EPILOG = """\
examples:
  samhq-fast convert sam_hq_vit_b.pth sam_hq_vit_b.safetensors
  samhq-fast convert sam_hq_vit_h.pth sam_hq_vit_h_hf_fp16.safetensors --layout hf --dtype fp16
"""


# ---------------------------------------------------------------------------------------------
# Argument parsing helpers


def _numbers(text: str, count: int, what: str, fmt: str) -> list[float]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = None
    if values is None or len(values) != count or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {fmt} ({what}), got {text!r}")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """"X,Y" or "X,Y,LABEL" -> (x, y, label); label 1 (foreground, default) or 0 (background)."""
    fmt = "X,Y or X,Y,LABEL with LABEL 1 (foreground) or 0 (background)"
    parts = text.split(",")
    if len(parts) == 3:
        if parts[2].strip() not in ("0", "1"):
            raise argparse.ArgumentTypeError(f"LABEL must be 1 (foreground) or 0 (background), got {parts[2]!r} in {text!r}")
        x, y = _numbers(",".join(parts[:2]), 2, "pixels of the original image", fmt)
        return x, y, int(parts[2])
    x, y = _numbers(text, 2, "pixels of the original image", fmt)
    return x, y, 1


def parse_box(text: str) -> tuple[float, float, float, float]:
    """"X1,Y1,X2,Y2" -> (x1, y1, x2, y2)."""
    return tuple(_numbers(text, 4, "top-left and bottom-right corners in pixels of the original image", "X1,Y1,X2,Y2"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samhq-fast", description=MAIN_HELP, epilog=MAIN_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("--version", action="version", version=f"%(prog)s {samhq_fast.__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)

    seg = commands.add_parser("segment", help="segment an image from point / box prompts, write mask PNGs",
                              description=SEGMENT_HELP, epilog=SEGMENT_EPILOG, formatter_class=FORMATTER)
    seg.add_argument("image", metavar="IMAGE", help="input photo (any format PIL reads; EXIF rotation is applied)")
    seg.add_argument("--checkpoint", "-c", required=True, metavar="SRC",
                     help="SAM-HQ checkpoint: .pth, .safetensors (original or HF layout), HF folder or hub id")
    seg.add_argument("--point", "-p", action="append", type=parse_point, default=[], metavar="X,Y[,LABEL]",
                     help="a click at pixel (X, Y); LABEL 1 = foreground (default), 0 = background; repeatable")
    seg.add_argument("--box", "-b", action="append", type=parse_box, default=[], metavar="X1,Y1,X2,Y2",
                     help="a box prompt (corners in pixels); several boxes = several objects; repeatable")
    seg.add_argument("--multimask", action="store_true",
                     help="let SAM propose 3 masks and keep the one with the best predicted IoU (good for a single ambiguous click)")
    seg.add_argument("--hq-only", action="store_true", help="use the HQ token's mask alone instead of SAM mask + HQ mask")
    seg.add_argument("--output", "-o", required=True, metavar="MASK.png",
                     help="mask PNG: binary 0/255 for one prompt, index 0..N for N prompts")
    seg.add_argument("--overlay", metavar="OVERLAY.png", help="also write the photo with the masks and prompts drawn on it")
    seg.add_argument("--json", metavar="OUT.json", help="also write prompts, scores, areas and bounding boxes as JSON")
    seg.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    seg.add_argument("--dtype", choices=DTYPES, default="fp32", help="model precision (default fp32)")
    seg.set_defaults(run=segment, parser=seg)

    conv = commands.add_parser("convert", help="re-save a checkpoint as .safetensors (original or HF key layout)",
                               description=CONVERT_HELP, epilog=CONVERT_EPILOG, formatter_class=FORMATTER)
    conv.add_argument("input", metavar="IN", help="checkpoint to read (.pth, .safetensors, HF folder, hub id)")
    conv.add_argument("output", metavar="OUT", help="file to write, must end in .safetensors")
    conv.add_argument("--layout", choices=("original", "hf"), default="original",
                      help="key layout of OUT: original SAM-HQ names (default) or Hugging Face SamHQModel names")
    conv.add_argument("--dtype", choices=DTYPES, default=None,
                      help="cast floating-point tensors to this dtype (default: keep the dtypes of IN)")
    conv.set_defaults(run=convert, parser=conv)
    return parser


# ---------------------------------------------------------------------------------------------
# segment


def _check_output(path: str, option: str, suffixes: tuple[str, ...]) -> None:
    """Fail before the (slow) model runs if an output cannot be written."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{option} {path}: folder {parent} does not exist")
    if Path(path).suffix.lower() not in suffixes:
        raise ValueError(f"{option} must end in {' / '.join(suffixes)}, got {path}")


def _bbox_xywh(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def draw_overlay(image: np.ndarray, masks: np.ndarray, prompts: list[dict], alpha: float = 0.5) -> Image.Image:
    """The photo with mask i blended in PALETTE[i], then the prompts' boxes and points drawn."""
    out = image.astype(np.float32)
    for i, mask in enumerate(masks):
        color = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * color
    overlay = Image.fromarray(np.round(out).astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    h, w = image.shape[:2]
    radius, width = max(3, round(0.01 * max(h, w))), max(2, round(0.004 * max(h, w)))
    for i, prompt in enumerate(prompts):
        if prompt["box"] is not None:
            draw.rectangle(prompt["box"], outline=PALETTE[i % len(PALETTE)], width=width)
        for (x, y), label in zip(prompt["points"], prompt["labels"]):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=POINT_COLORS[label], outline=(255, 255, 255))
    return overlay


def _describe(prompt: dict) -> str:
    parts = []
    if prompt["points"]:
        fg = sum(prompt["labels"])
        parts.append(f"{len(prompt['labels'])} point(s) ({fg} fg, {len(prompt['labels']) - fg} bg)")
    if prompt["box"] is not None:
        parts.append("box (" + ", ".join(f"{v:g}" for v in prompt["box"]) + ")")
    return " + ".join(parts)


def segment(args) -> int:
    points, boxes = args.point, args.box
    if not points and not boxes:
        args.parser.error("give at least one prompt: --point X,Y[,LABEL] and/or --box X1,Y1,X2,Y2")
    if points and len(boxes) > 1:
        args.parser.error(
            f"--point cannot be combined with several --box ({len(boxes)} given): points and at most one box form one "
            "prompt; several boxes give one prompt each. Run once per object to combine points with a box."
        )
    if len(boxes) > 255:
        args.parser.error(f"at most 255 --box prompts fit in an 8-bit index mask, got {len(boxes)}")
    _check_output(args.output, "--output", (".png",))  # lossless, so the mask values survive
    if args.overlay:
        _check_output(args.overlay, "--overlay", OVERLAY_SUFFIXES)
    if args.json:
        _check_output(args.json, "--json", (".json",))

    image = load_image(args.image)
    model = samhq_fast.load(args.checkpoint, device=args.device, dtype=args.dtype)
    predictor = SamHQPredictor(model)
    predictor.set_image(image)

    if len(boxes) > 1:  # N prompts, one per box
        prompts = [{"points": [], "labels": [], "box": list(b)} for b in boxes]
        kwargs = {"box": np.array(boxes)}
    else:  # all points + at most one box: one prompt
        prompts = [{"points": [[x, y] for x, y, _ in points], "labels": [lab for _, _, lab in points],
                    "box": list(boxes[0]) if boxes else None}]
        kwargs = {"box": np.array(boxes[0]) if boxes else None}
        if points:
            kwargs["point_coords"] = np.array(prompts[0]["points"])
            kwargs["point_labels"] = np.array(prompts[0]["labels"])
    masks, scores, _ = predictor.predict(**kwargs, multimask_output=args.multimask, hq_token_only=args.hq_only)
    h, w = image.shape[:2]
    masks, scores = masks.reshape(-1, h, w), scores.reshape(-1)  # [N, H, W], [N] for one or N prompts

    if len(masks) == 1:
        out = masks[0].astype(np.uint8) * 255
    else:
        out = np.zeros((h, w), dtype=np.uint8)
        for i, mask in enumerate(masks):
            out[mask] = i + 1
    Image.fromarray(out).save(args.output)
    if args.overlay:
        draw_overlay(image, masks, prompts).save(args.overlay)

    for i, (prompt, mask, score) in enumerate(zip(prompts, masks, scores)):
        prompt.update(score=float(score), area=int(mask.sum()), bbox_xywh=_bbox_xywh(mask))
        bbox = "empty" if prompt["bbox_xywh"] is None else "bbox xywh " + ",".join(map(str, prompt["bbox_xywh"]))
        print(f"prompt {i}: {_describe(prompt)}: score {score:.3f}, area {prompt['area']} px "
              f"({100 * prompt['area'] / (h * w):.1f}%), {bbox}")
    if args.json:
        result = {
            "image": str(args.image), "checkpoint": str(args.checkpoint), "variant": model.variant,
            "image_size": [h, w], "mask": str(args.output), "mask_format": "binary" if len(masks) == 1 else "index",
            "multimask": args.multimask, "hq_only": args.hq_only, "device": str(model.device), "dtype": args.dtype,
            "prompts": prompts,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    written = ", ".join(p for p in (args.output, args.overlay, args.json) if p)
    print(f"wrote {written} ({'binary' if len(masks) == 1 else 'index'} mask, {w}x{h})")
    return 0


# ---------------------------------------------------------------------------------------------
# convert


def convert(args) -> int:
    if not args.output.endswith(".safetensors"):
        args.parser.error(f"OUT must end in .safetensors, got {args.output}")
    if os.path.exists(args.input) and os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        args.parser.error("OUT must differ from IN (IN is read while OUT is written)")
    _check_output(args.output, "OUT", (".safetensors",))
    model = samhq_fast.load(args.input, device="cpu")  # rejects a bad checkpoint before anything is written
    variant = model.variant
    del model

    state_dict = read_state_dict(args.input)
    if is_hf_layout(state_dict):
        state_dict = hf_to_original(state_dict)
    if args.dtype:
        dtype = resolve_dtype(args.dtype)
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    if args.layout == "hf":
        state_dict = original_to_hf(state_dict)
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}

    from safetensors.torch import save_file

    save_file(state_dict, args.output, metadata={"format": "pt", "variant": variant, "layout": args.layout})
    params = sum(v.numel() for v in state_dict.values())
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state_dict.values()})
    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: {variant}, {args.layout} layout, {len(state_dict)} tensors, "
          f"{params / 1e6:.1f}M values ({'/'.join(dtypes)}), {size / 1e6:.1f} MB")
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except SystemExit as e:  # argparse already printed --help / --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 1
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad checkpoint, image, prompt...
        print(f"samhq-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
