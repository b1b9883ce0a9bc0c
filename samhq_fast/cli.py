"""Command-line interface: `samhq-fast segment` (prompt an image, write masks), `samhq-fast convert`
(re-save a checkpoint as safetensors in the original or HF key layout) and `samhq-fast bench`
(encoder / decoder benchmarks, results table and plot). Run `samhq-fast --help`."""

import argparse
import contextlib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import samhq_fast
from samhq_fast.automatic import MissingExtraError, SamHQAutomaticMaskGenerator
from samhq_fast.build import BACKENDS, DTYPE_NAMES, dtype_name, resolve_dtype
from samhq_fast.checkpoint import FOURIER_BASIS_KEY, hf_to_original, is_hf_layout, original_to_hf, read_state_dict
from samhq_fast.kernels import INTERPRETER_BF16_ERROR
from samhq_fast.modeling.prompt_encoder import HALF_DTYPES
from samhq_fast.predictor import SamHQPredictor
from samhq_fast.switches import triton_interpreter_on
from samhq_fast.transforms import ImageTooLargeError, load_image

# Distinct overlay colors (matplotlib's tab10), one per prompt, cycling.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
POINT_COLORS = {1: (0, 255, 0), 0: (255, 0, 0)}  # foreground green, background red
DTYPE_CHOICES = ", ".join(DTYPE_NAMES) + " (any case)"
FORMATTER = argparse.RawDescriptionHelpFormatter  # keep the line breaks of the descriptions
OVERLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# --masks-dir: the layout of the original's scripts/amg.py (one 0/255 PNG per mask, {id}.png, and this CSV)
AMG_METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
                       "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
AMG_MASK_NAME = re.compile(r"(0|[1-9][0-9]*)\.png", re.ASCII)  # the names --masks-dir writes: 0.png, 1.png, ...
TEMPORARY_MARK = ".partial"  # in the names of _write_outputs' temporary files: .{stem}.{pid}.partial{suffix}
OutputWriters = list[tuple[str, str, Callable[[Path], object]]]  # (option, path, write(to_path)) for _write_outputs
# segment --auto options; None on the command line means "not given", so they can be refused without --auto
AUTO_DEFAULTS = dict(points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88, stability_thresh=0.95, stability_offset=1.0, box_nms_thresh=0.7,
                     crop_n_layers=0, min_mask_region_area=0)

MAIN_HELP = """\
SAM-HQ (Segment Anything in High Quality) inference from the command line.

Coordinates are always (x, y) pixels of the ORIGINAL image: x to the right, y down, origin at
the top-left corner, whatever size the model resizes the image to internally.
Checkpoints: an original SAM-HQ .pth (sam_hq_vit_b.pth ...), a .safetensors file in the
original or Hugging Face key layout, an HF model folder, or a hub id; the variant
(vit_b / vit_l / vit_h, or vit_tiny for Light HQ-SAM) is inferred from the tensor shapes.
"""
MAIN_EPILOG = """\
examples:
  samhq-fast segment assets/chelsea.jpg --checkpoint sam_hq_vit_b.pth --point 220,150 --output mask.png
  samhq-fast convert sam_hq_vit_b.pth sam_hq_vit_b.safetensors --layout hf
  samhq-fast bench --variant vit_b --batch 1,8 --output results.json --plot results.png

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
--auto takes no prompts: it segments everything, as the original automatic mask
generator (a --points-per-side grid of clicks, masks filtered by predicted IoU and
stability, duplicates removed by box NMS).

Outputs:
  --output MASK.png   one prompt: a binary 8-bit PNG, 255 = object, 0 = background.
                      N > 1 prompts: an 8-bit index PNG, 0 = background, i + 1 where the
                      mask of prompt i (the i-th --box, from 0) is set; where masks overlap,
                      the later prompt wins. Always the size of the input image.
                      --auto: an index PNG, i for the i-th largest mask (painted largest
                      first, so smaller masks stay visible); 16-bit beyond 255 masks.
  --overlay FILE      the photo with each mask blended in a color (10, cycling) and the prompts
                      drawn (green dots foreground, red dots background, box outlines;
                      --auto: every mask, largest first, and its grid point).
  --masks-dir DIR     --auto: also every mask on its own, as the original's scripts/amg.py
                      writes them: DIR/{id}.png (0/255) and DIR/metadata.csv (id, area,
                      bbox (1 px short, as the original's), point, scores, crop box); id i
                      is the index PNG's value i + 1. Overlapping masks keep all their
                      pixels here.
  --json FILE         per-prompt prompts, predicted IoU score, mask area and bounding box
                      (--auto: per mask its grid point, score, stability (null when not a
                      number: an empty mask's is 0 / 0), area, box).
                      bbox_xywh: x, y of the top-left mask pixel, width and height in pixels;
                      image_size: [height, width] of the input image.
A one-line summary per prompt (--auto: the mask count) is printed to stdout.
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
  # everything, no prompts; also each mask on its own in masks/ (as the original's scripts/amg.py)
  samhq-fast segment assets/chelsea.jpg --checkpoint sam_hq_vit_b.pth --auto --output all.png --overlay all.jpg \\
      --masks-dir masks
"""

CONVERT_HELP = """\
Re-save a SAM-HQ checkpoint as one .safetensors file, in the original SAM-HQ key layout
(image_encoder.*, mask_decoder.hf_token ...) or the Hugging Face `SamHQModel` layout
(vision_encoder.*, mask_decoder.hq_token ...). IN may be anything `samhq_fast.load` reads
(.pth, .safetensors in either layout, an HF folder, a hub id). IN is checked by building the
model from it before anything is written; OUT must end in .safetensors. Light HQ-SAM (vit_tiny)
has no HF layout (transformers has no TinyViT SAM-HQ): --layout hf refuses it. OUT holds the
weights only: transformers' SamHQModel.from_pretrained also needs the model's config.json.
"""
CONVERT_EPILOG = """\
examples:
  samhq-fast convert sam_hq_vit_b.pth sam_hq_vit_b.safetensors
  samhq-fast convert sam_hq_vit_h.pth sam_hq_vit_h_hf_fp16.safetensors --layout hf --dtype fp16
"""

BENCH_VARIANTS = ("vit_b", "vit_l", "vit_h")
BENCH_BACKENDS = ("eager", "compile", "fused", "fused-graphed", "hf", "hf-eager")
BENCH_WHAT = ("encoder", "decoder", "e2e")
BENCH_RUN_OPTIONS = ("variant", "batch", "prompts", "dtype", "backends", "what", "checkpoint", "output", "plot", "interpret",
                     "smoke", "time_budget_s")  # what --table has no use for
BENCH_HELP = """\
Benchmark the image encoder, the prompt decoder and the whole predictor (end to end), backend
against backend in the same run, and write JSON + a Markdown table (+ a bar chart with --plot).

Weights: RANDOM weights of the real architecture by default (speed does not depend on weight
values; the outputs are meaningless), or --checkpoint SRC (its architecture is used, --variant
is ignored; ViT checkpoints only: vit_tiny is refused).

What is measured (--what):
  encoder   model.encode_image on --batch images per call: ms/img, img/s, achieved TFLOP/s
            (samhq_fast.flops.encoder_flops) and % of this GPU's own measured matmul rate,
            peak memory, first-call (compile / autotune) time, speedup over eager, and the
            numerics against eager (a backend that disagrees gets no speed figure).
  decoder   prompt encoder + mask decoder on --prompts N prompts against one image's cached
            features: prompts/s, single-prompt p50 / p99 latency.
  e2e       set_image + one box through SamHQPredictor (includes the encoder): eager and
            fused only.
Backends (--backends): eager (the reference), compile (torch.compile of the eager model;
decoder: PromptDecoder without CUDA graphs), fused (Triton encoder kernels, and the same encoder
replayed from a CUDA graph per batch as "fused-graphed"; decoder: PromptDecoder with torch.compile's
CUDA-graph trees, the same with the Triton 3x3 convolutions (conv_kernels=True), and with
hand-captured graphs, the fused backend's default), hf / hf-eager (transformers SamHQModel with SDPA /
eager attention, encoder only).
Several --dtype values run one after the other and land in one JSON.

On a CPU-only machine: eager and compile only (real sizes are slow there; --smoke uses a tiny
model); fused only with TRITON_INTERPRET=1 in the environment and --interpret (the Triton
interpreter; fp32 / fp16). EVERY FIGURE MEASURED ON THE CPU OR IN THE INTERPRETER IS LABELLED as
not a speed figure: "speed_figure": false and the reason in the JSON, the reason in the table's
note column under a "NOT SPEED FIGURES" line, and "NOT SPEED FIGURES" in the plot's title.

Each benchmark run also leaves its own JSON + .md next to --output (OUTPUT_STEM.WHAT-DTYPE.json),
rewritten after every configuration, so a run cut short still leaves what it finished.
"""
BENCH_EPILOG = """\
examples:
  # on a GPU: vit_b and vit_h, every backend, bf16
  samhq-fast bench --variant vit_b,vit_h --batch 1,8,32 --output bench/results/run.json --plot run.png
  # a real checkpoint, the encoder only, two dtypes
  samhq-fast bench --checkpoint sam_hq_vit_b.pth --what encoder --dtype bf16,fp16
  # check the tool on a tiny model (a minute or two on a 2-core CPU; not speed figures)
  samhq-fast bench --smoke --dtype fp32 --backends eager --output /tmp/smoke.json
  # the Markdown performance table of committed results (the README's)
  samhq-fast bench --table bench/results/*.json
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


def _comma_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
    return values


def _choices(allowed: tuple[str, ...], what: str):
    """A comma list whose items are all in `allowed`."""

    def parse(text: str) -> list[str]:
        values = _comma_list(text)
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}: choose from {','.join(allowed)}")
        return list(dict.fromkeys(values))

    return parse


def _dtype(text: str) -> str:
    """Any dtype name samhq_fast.load accepts, in any case -> its short name (fp32, fp16, bf16)."""
    try:
        return dtype_name(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text}: choose from {','.join(DTYPE_NAMES)}") from None


def _dtypes(text: str) -> list[str]:
    return list(dict.fromkeys(_dtype(v) for v in _comma_list(text)))


def _variants(text: str) -> list[str]:
    return list(BENCH_VARIANTS) if text.strip() == "all" else _choices(BENCH_VARIANTS, "variant")(text)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in _comma_list(text)]
    except ValueError:
        values = None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def _number(convert, valid, expected: str):
    """An argparse type: text -> convert(text), refused (naming `expected`) unless valid(value)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_count = _number(int, lambda v: v >= 1, "a positive integer")
_finite = _number(float, math.isfinite, "a finite number")
_non_negative = _number(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
_non_negative_count = _number(int, lambda v: v >= 0, "an integer >= 0")
_seconds = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number of seconds")


class _Parser(argparse.ArgumentParser):
    """argparse reading any argument that starts with "-" and a digit as a value, as Python 3.14's
    argparse does: a box past the left border (--box -10,20,300,400) or a point above the image
    (--point 40,-3 is fine, --point -3,40 was "expected one argument"). No option looks like a number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")  # (3.11's: only "-3", "-3.5"; subcommands are _Parsers too)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="samhq-fast", description=MAIN_HELP, epilog=MAIN_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("--version", action="version", version=f"%(prog)s {samhq_fast.__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)

    seg = commands.add_parser("segment", help="segment an image from point / box prompts, write mask PNGs",
                              description=SEGMENT_HELP, epilog=SEGMENT_EPILOG, formatter_class=FORMATTER)
    seg.add_argument("image", type=os.path.expanduser, metavar="IMAGE", help="input photo (any format PIL reads; EXIF rotation is applied)")
    seg.add_argument("--checkpoint", "-c", type=os.path.expanduser, required=True, metavar="SRC",
                     help="SAM-HQ checkpoint: .pth, .safetensors (original or HF layout), HF folder or hub id")
    seg.add_argument("--point", "-p", action="append", type=parse_point, default=[], metavar="X,Y[,LABEL]",
                     help="a click at pixel (X, Y); LABEL 1 = foreground (default), 0 = background; repeatable")
    seg.add_argument("--box", "-b", action="append", type=parse_box, default=[], metavar="X1,Y1,X2,Y2",
                     help="a box prompt (corners in pixels); several boxes = several objects; repeatable")
    seg.add_argument("--multimask", action="store_true",
                     help="let SAM propose 3 masks and keep the one with the best predicted IoU (good for a single ambiguous click); "
                          "with --hq-only the mask is the HQ token's either way and only the score is that best one's, as in the original")
    seg.add_argument("--hq-only", action="store_true", help="use the HQ token's mask alone instead of SAM mask + HQ mask")
    seg.add_argument("--auto", action="store_true",
                     help="segment everything, without prompts: the automatic mask generator (a point grid, the original's filters "
                          "and NMS); writes an index PNG, larger masks painted first")
    seg.add_argument("--points-per-side", type=_count, default=None, metavar="N", help=f"--auto: N x N grid points (default {AUTO_DEFAULTS['points_per_side']})")
    seg.add_argument("--points-per-batch", type=_count, default=None, metavar="N",
                     help=f"--auto: grid points decoded together (default {AUTO_DEFAULTS['points_per_batch']}; more is faster on a large GPU, "
                          "same masks)")
    seg.add_argument("--pred-iou-thresh", type=_finite, default=None, metavar="T", help=f"--auto: keep masks whose predicted IoU > T (default {AUTO_DEFAULTS['pred_iou_thresh']})")
    seg.add_argument("--stability-thresh", type=_finite, default=None, metavar="T", help=f"--auto: keep masks whose stability >= T (default {AUTO_DEFAULTS['stability_thresh']})")
    seg.add_argument("--stability-offset", type=_non_negative, default=None, metavar="D",
                     help=f"--auto: stability = IoU of the masks at logit thresholds +D and -D (default {AUTO_DEFAULTS['stability_offset']})")
    seg.add_argument("--box-nms-thresh", type=_finite, default=None, metavar="T",
                     help=f"--auto: of two masks whose boxes overlap by IoU > T, keep the better scored (default {AUTO_DEFAULTS['box_nms_thresh']})")
    seg.add_argument("--crop-n-layers", type=_non_negative_count, default=None, metavar="N",
                     help="--auto: also run the grid on overlapping zoomed-in crops, 4 in layer 1, 16 in layer 2, ... "
                          "(finds small objects; 1 + 4 + ... + 4^N grids: 5x the work for N = 1, 21x for N = 2; default 0)")
    seg.add_argument("--min-mask-region-area", type=_non_negative_count, default=None, metavar="A",
                     help="--auto: fill holes and remove islands smaller than A pixels in every mask (needs scipy; default 0: off)")
    seg.add_argument("--output", "-o", type=os.path.expanduser, required=True, metavar="MASK.png",
                     help="mask PNG: binary 0/255 for one prompt, index 0..N for N prompts")
    seg.add_argument("--overlay", type=os.path.expanduser, metavar="OVERLAY.png",
                     help=f"also write the photo with the masks and prompts drawn on it ({', '.join(OVERLAY_SUFFIXES)})")
    seg.add_argument("--json", type=os.path.expanduser, metavar="OUT.json", help="also write prompts, scores, areas and bounding boxes as JSON")
    seg.add_argument("--masks-dir", type=os.path.expanduser, metavar="DIR",
                     help="--auto: also write each mask as DIR/{id}.png (0/255) with DIR/metadata.csv, as the original's "
                          "scripts/amg.py (created if missing; an earlier run's files there are replaced; a folder holding other files is refused)")
    seg.add_argument("--max-image-pixels", type=_non_negative_count, default=None, metavar="N",
                     help="PIL's decompression-bomb limit for the image, in pixels: it warns above N and refuses above 2N "
                          "(default: PIL's N, about 89 M pixels); 0: no limit")
    seg.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    seg.add_argument("--dtype", type=_dtype, default="fp32", metavar="fp32|fp16|bf16",
                     help=f"model precision: {DTYPE_CHOICES} (default fp32)")
    seg.add_argument("--backend", type=str.lower, choices=BACKENDS, default="auto",
                     help="eager: the reference PyTorch model; fused: Triton kernels in the image encoder and a compiled "
                          "prompt decoder (CUDA, or the Triton interpreter with TRITON_INTERPRET=1); auto: fused on CUDA "
                          "in bf16 / fp16, else eager (default auto)")
    seg.set_defaults(run=segment, parser=seg)

    conv = commands.add_parser("convert", help="re-save a checkpoint as .safetensors (original or HF key layout)",
                               description=CONVERT_HELP, epilog=CONVERT_EPILOG, formatter_class=FORMATTER)
    conv.add_argument("input", type=os.path.expanduser, metavar="IN", help="checkpoint to read (.pth, .safetensors, HF folder, hub id)")
    conv.add_argument("output", type=os.path.expanduser, metavar="OUT", help="file to write, must end in .safetensors")
    conv.add_argument("--layout", type=str.lower, choices=("original", "hf"), default="original",
                      help="key layout of OUT: original SAM-HQ names (default) or Hugging Face SamHQModel names")
    conv.add_argument("--dtype", type=_dtype, default=None, metavar="fp32|fp16|bf16",
                      help=f"cast floating-point tensors to this dtype: {DTYPE_CHOICES} (default: keep the dtypes of IN); "
                           "fp16 / bf16 leave the prompt encoder's small Fourier basis as it is (fp32 keeps point encodings exact)")
    conv.set_defaults(run=convert, parser=conv)

    ben = commands.add_parser("bench", help="benchmark encoder / decoder / end to end; JSON, Markdown table, plot",
                              description=BENCH_HELP, epilog=BENCH_EPILOG, formatter_class=FORMATTER)
    ben.add_argument("--variant", type=_variants, default="vit_b", metavar="vit_b|vit_l|vit_h|all",
                     help="architecture(s), comma list or 'all' (default vit_b; ignored with --checkpoint or --smoke)")
    ben.add_argument("--batch", type=_positive_ints, default=None, metavar="N,N,...",
                     help="encoder: images per call (default 1,8,32; --smoke: 1)")
    ben.add_argument("--prompts", type=_positive_ints, default=None, metavar="N,N,...",
                     help="decoder: box prompts per call (default 1,16,64,256,1024; --smoke: 1,4)")
    ben.add_argument("--dtype", type=_dtypes, default=["bf16"], metavar="bf16,fp16,fp32",
                     help=f"precision(s), one run each, all in one JSON (default bf16): {DTYPE_CHOICES}")
    ben.add_argument("--backends", type=_choices(BENCH_BACKENDS, "backend"), default=None, metavar="eager,compile,fused,hf",
                     help="backends to compare (default: all on a GPU, eager,compile on a CPU)")
    ben.add_argument("--what", type=_choices(BENCH_WHAT, "benchmark"), default=list(BENCH_WHAT), metavar="encoder,decoder,e2e",
                     help="what to measure (default all three)")
    ben.add_argument("--checkpoint", "-c", type=os.path.expanduser, metavar="SRC", help="benchmark this checkpoint (anything samhq_fast.load reads) "
                     "instead of random weights; its architecture replaces --variant")
    ben.add_argument("--output", "-o", type=os.path.expanduser, metavar="RESULTS.json", default=None,
                     help="merged JSON (default bench/results/bench-DATE.json; --smoke: bench/results/smoke/, git-ignored); "
                     "the Markdown table goes next to it as .md")
    ben.add_argument("--plot", type=os.path.expanduser, metavar="RESULTS.png", help="also draw a bar chart (needs matplotlib: pip install 'samhq-fast[plot]')")
    ben.add_argument("--interpret", action="store_true",
                     help="CPU only: allow the fused backend under the Triton interpreter (set TRITON_INTERPRET=1 before "
                          "starting; fp32 / fp16; checks it runs; NOT a speed figure)")
    ben.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few repeats: tests the tool, not speed")
    ben.add_argument("--time-budget-s", type=_seconds, default=None, metavar="S",
                     help="per benchmark run: start no configuration after S seconds (default: encoder 420, decoder 220)")
    ben.add_argument("--table", type=os.path.expanduser, nargs="+", metavar="RESULTS.json",
                     help="only print the Markdown performance table of these results files (runs nothing)")
    ben.set_defaults(run=bench, parser=ben)
    return parser


# ---------------------------------------------------------------------------------------------
# segment


def _check_output(path: str, option: str, suffixes: tuple[str, ...]) -> None:
    """Fail before the (slow) model runs if an output cannot be written."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{option} {path}: folder {parent} does not exist")
    if Path(path).is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file name")
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


def _strict_json(value):
    """value with NaN / inf floats (an empty mask's stability score is 0 / 0) as None: JSON has no
    NaN, and strict parsers (JavaScript's JSON.parse) refuse Python's bare NaN token."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_writer(args, model, image_size: tuple[int, int], mask_format: str, **fields) -> Callable[[Path], object]:
    """segment --json's writer: what was run (image, checkpoint, model, device, dtype, backend), the mask file, then `fields`."""
    result = {
        "image": str(args.image), "checkpoint": str(args.checkpoint), "variant": model.variant, "image_size": list(image_size),
        "mask": str(args.output), "mask_format": mask_format, "device": str(model.device), "dtype": args.dtype, "backend": model.backend, **fields,
    }
    text = json.dumps(_strict_json(result), indent=2, allow_nan=False) + "\n"
    return lambda path: path.write_text(text)


def _written(args) -> str:
    return ", ".join(str(p) for p in (args.output, args.overlay, args.json, args.masks_dir) if p)


def _write_outputs(outputs: OutputWriters) -> None:
    """Write each (option, path, write(to_path)) to a temporary file beside its path, then move them
    all into place: a failure (an image too large for its format, a full disk, Ctrl-C) leaves no
    output behind, half-written or alone, and the error names the output."""
    temporary = []
    try:
        targets = [Path(os.path.realpath(path)) for _, path, _ in outputs]  # through symlinks, as a plain write would go
        for (option, path, write), target in zip(outputs, targets):
            tmp = target.with_name(f".{target.stem}.{os.getpid()}{TEMPORARY_MARK}{target.suffix}")  # PIL picks the format by the suffix
            temporary.append(tmp)
            try:
                write(tmp)
            except (OSError, ValueError) as e:  # (an OSError naming the temporary file: its reason alone)
                reason = e.strerror if isinstance(e, OSError) and e.filename and e.strerror else e
                raise OSError(f"could not write {option} {path}: {reason}") from None
        for target, tmp in zip(targets, temporary):
            os.replace(tmp, target)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)


def _check_masks_dir(folder: str) -> None:
    """Fail before the model runs if --masks-dir cannot hold this run's masks alone: it must be a
    folder (or not exist yet) that is empty or holds only an earlier run's files (its metadata.csv,
    {id}.png, temporaries), which this run replaces: numbered PNGs of the user's own are not touched."""
    path = Path(folder)
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"--masks-dir {folder} is a broken symbolic link")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--masks-dir {folder} is a file: give a folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--masks-dir {folder}: folder {path.parent} does not exist")
    entries = sorted(path.iterdir()) if path.is_dir() else []
    others = [e.name for e in entries if not _is_earlier_run_file(e)]
    if entries and not others and not _has_amg_metadata(path):
        others = [e.name for e in entries]  # numbered PNGs, but no metadata.csv of ours: the user's own files
    if others:
        raise ValueError(f"--masks-dir {folder} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
                         "give a new or empty folder, as this run's masks would mix with them")


def _is_earlier_run_file(entry: Path) -> bool:
    """A plain file --masks-dir writes: metadata.csv, {id}.png, or a temporary of _write_outputs left by a killed run."""
    if entry.is_symlink() or not entry.is_file():
        return False
    return entry.name == "metadata.csv" or AMG_MASK_NAME.fullmatch(entry.name) is not None or _is_temporary(entry.name)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and f"{TEMPORARY_MARK}." in name


def _has_amg_metadata(folder: Path) -> bool:
    try:
        with open(folder / "metadata.csv") as f:
            return f.readline().rstrip("\n") == AMG_METADATA_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def _masks_dir_outputs(folder: str, records: list[dict]) -> OutputWriters:
    """--masks-dir's files, in scripts/amg.py's format: record i as {i}.png (0/255, 8-bit gray) and
    row i of metadata.csv (the record's values as Python prints them; no newline after the last row)."""
    rows = [AMG_METADATA_HEADER] + [
        ",".join(str(v) for v in (i, r["area"], *r["bbox"], *r["point_coords"][0], r["predicted_iou"], r["stability_score"], *r["crop_box"]))
        for i, r in enumerate(records)
    ]

    def png_writer(mask: np.ndarray) -> Callable[[Path], None]:  # converted when written: one full-size copy at a time
        return lambda path: Image.fromarray(mask.astype(np.uint8) * 255).save(path)

    text = "\n".join(rows)
    return [("--masks-dir", os.path.join(folder, f"{i}.png"), png_writer(r["segmentation"])) for i, r in enumerate(records)] + [
        ("--masks-dir", os.path.join(folder, "metadata.csv"), lambda path: path.write_text(text))]


def _write_with_masks_dir(outputs: OutputWriters, folder: str, records: list[dict]) -> None:
    """_write_outputs of `outputs` and --masks-dir's files for `records`, together. The folder is
    created if missing (and removed again if a write fails); once the new files are in place, an
    earlier run's {id}.png beyond this run's count and its leftover temporaries are removed."""
    new_folder = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        _write_outputs(outputs + _masks_dir_outputs(folder, records))
    except BaseException:
        if new_folder:
            with contextlib.suppress(OSError):  # (the temporary files are gone: it is empty)
                os.rmdir(folder)
        raise
    for entry in Path(folder).iterdir():
        stale = AMG_MASK_NAME.fullmatch(entry.name) and int(entry.stem) >= len(records)
        if (stale or _is_temporary(entry.name)) and _is_earlier_run_file(entry):
            entry.unlink()


def segment_everything(args, image: np.ndarray, model) -> int:
    """segment --auto: the automatic mask generator's masks in one index PNG (0 background, i for the
    i-th largest mask; painted largest first so smaller masks stay visible on top; 16-bit beyond 255
    masks), the grid points in the overlay, one JSON entry per mask."""
    generator = SamHQAutomaticMaskGenerator(
        model, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch, pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh, stability_score_offset=args.stability_offset, box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers, min_mask_region_area=args.min_mask_region_area,
    )
    records = sorted(generator.generate(image, hq_token_only=args.hq_only), key=lambda r: -r["area"])
    h, w = image.shape[:2]
    index = np.zeros((h, w), dtype=np.uint8 if len(records) <= 255 else np.uint16)
    for i, record in enumerate(records):
        index[record["segmentation"]] = i + 1
    outputs: OutputWriters = [("--output", args.output, Image.fromarray(index).save)]
    if args.overlay:
        prompts = [{"points": r["point_coords"], "labels": [1], "box": None} for r in records]
        outputs.append(("--overlay", args.overlay, draw_overlay(image, [r["segmentation"] for r in records], prompts).save))
    masks = [
        {"index": i + 1, "point": r["point_coords"][0], "score": r["predicted_iou"], "stability": r["stability_score"],
         "area": r["area"], "bbox_xywh": _bbox_xywh(r["segmentation"])}  # not r["bbox"]: the original's is 1 px short
        for i, r in enumerate(records)
    ]
    if args.json:
        settings = {k: getattr(args, k) for k in (*AUTO_DEFAULTS, "hq_only")}
        outputs.append(("--json", args.json, _json_writer(args, model, (h, w), "index", auto=settings, masks=masks)))
    # before anything is printed: a closed stdout cannot cost a file
    if args.masks_dir:
        _write_with_masks_dir(outputs, args.masks_dir, records)
    else:
        _write_outputs(outputs)
    layers = f" (and {args.crop_n_layers} crop layer{'s' if args.crop_n_layers > 1 else ''})" if args.crop_n_layers else ""
    print(f"{len(records)} mask{'' if len(records) == 1 else 's'} from a {args.points_per_side}x{args.points_per_side} point grid{layers}"
          + ("" if records else " (none passed the filters: lower --pred-iou-thresh / --stability-thresh)"))
    print(f"wrote {_written(args)} (index mask, {index.dtype.itemsize * 8}-bit, {w}x{h})")
    return 0


def segment(args) -> int:
    points, boxes = args.point, args.box
    given = [name for name in AUTO_DEFAULTS if getattr(args, name) is not None]
    if given and not args.auto:  # ignoring them would hide a forgotten --auto
        args.parser.error(f"{', '.join('--' + n.replace('_', '-') for n in given)} {'applies' if len(given) == 1 else 'apply'} only to --auto")
    for name, default in AUTO_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.auto and (points or boxes):
        args.parser.error("--auto segments everything without prompts: drop --point / --box")
    if args.auto and args.multimask:  # the generator keeps all three of SAM's masks per point already
        args.parser.error("--multimask applies to prompts; --auto keeps every candidate mask of each grid point")
    if args.masks_dir and not args.auto:
        args.parser.error("--masks-dir applies only to --auto (prompts: --json has each mask's area and box)")
    if not args.auto and not points and not boxes:
        args.parser.error("give at least one prompt: --point X,Y[,LABEL] and/or --box X1,Y1,X2,Y2 (or --auto for everything)")
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
    paths = [Path(p).resolve() for p in (args.image, args.output, args.overlay, args.json) if p]
    if len(set(paths)) < len(paths):
        args.parser.error("IMAGE, --output, --overlay and --json must be different files (one would overwrite another)")
    if args.masks_dir:
        folder = Path(args.masks_dir).resolve()
        if any(folder in (path, path.parent) for path in paths):
            args.parser.error("--masks-dir needs a folder of its own: IMAGE, --output, --overlay and --json must be elsewhere")
        _check_masks_dir(args.masks_dir)

    pil_limit = Image.MAX_IMAGE_PIXELS  # PIL's global: set for this read only (main may run inside another program)
    if args.max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = args.max_image_pixels or None
    try:
        image = load_image(args.image)
    except ImageTooLargeError as e:
        raise ImageTooLargeError(f"{e} (here: --max-image-pixels N, or 0 for no limit)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    model = samhq_fast.load(args.checkpoint, device=args.device, dtype=args.dtype, backend=args.backend)
    if args.auto:
        return segment_everything(args, image, model)
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
    for prompt, mask, score in zip(prompts, masks, scores):
        prompt.update(score=float(score), area=int(mask.sum()), bbox_xywh=_bbox_xywh(mask))
    outputs: OutputWriters = [("--output", args.output, Image.fromarray(out).save)]
    if args.overlay:
        outputs.append(("--overlay", args.overlay, draw_overlay(image, masks, prompts).save))
    if args.json:
        mask_format = "binary" if len(masks) == 1 else "index"
        outputs.append(("--json", args.json, _json_writer(args, model, (h, w), mask_format, multimask=args.multimask, hq_only=args.hq_only, prompts=prompts)))
    _write_outputs(outputs)  # before anything is printed: a closed stdout cannot cost a file

    for i, prompt in enumerate(prompts):
        bbox = "empty" if prompt["bbox_xywh"] is None else "bbox xywh " + ",".join(map(str, prompt["bbox_xywh"]))
        print(f"prompt {i}: {_describe(prompt)}: score {prompt['score']:.3f}, area {prompt['area']} px "
              f"({100 * prompt['area'] / (h * w):.1f}%), {bbox}")
    print(f"wrote {_written(args)} ({'binary' if len(masks) == 1 else 'index'} mask, {w}x{h})")
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
        keep = FOURIER_BASIS_KEY if dtype in HALF_DTYPES else None  # half models keep it fp32 too
        state_dict = {k: v.to(dtype) if v.is_floating_point() and k != keep else v for k, v in state_dict.items()}
        overflowed = [k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()]
        if overflowed:  # load refuses infinite weights: refuse to write them
            raise ValueError(f"{len(overflowed)} tensors hold values beyond {args.dtype}'s range (e.g. {overflowed[0]}): "
                             "convert to bf16 (float32's range) or keep float32")
    if args.layout == "hf":
        state_dict = original_to_hf(state_dict)
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(state_dict, args.output, metadata={"format": "pt", "variant": variant, "layout": args.layout})
    except SafetensorError as e:  # its I/O errors: a full disk, a read-only folder...
        raise OSError(f"could not write {args.output}: {e}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(args.output, 0o666 & ~umask)  # as any new file; safetensors (0.8) leaves its private temp file's 0600
    params = sum(v.numel() for v in state_dict.values())
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state_dict.values()})
    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: {variant}, {args.layout} layout, {len(state_dict)} tensors, "
          f"{params / 1e6:.1f}M values ({'/'.join(dtypes)}), {size / 1e6:.1f} MB")
    return 0


# ---------------------------------------------------------------------------------------------
# bench


def _bench_plan(args) -> tuple[str, list[str]]:
    """(device name, backends) after checking the options against this machine."""
    import torch

    parser = args.parser
    on_gpu = torch.cuda.is_available() and not args.smoke
    if args.interpret and on_gpu:
        parser.error("--interpret is for CPU-only machines (or --smoke): on a GPU the fused backend runs compiled")
    backends = args.backends or (list(BENCH_BACKENDS) if on_gpu else ["eager", "compile"] + (["fused"] if args.interpret else []))
    if "fused" in backends and not on_gpu and not args.interpret:
        parser.error("the fused backend needs a CUDA device; on the CPU pass --interpret to run it in the Triton "
                     "interpreter (checks it runs, not a speed figure)")
    if "fused" in backends and not on_gpu and "bf16" in args.dtype:
        parser.error(f"--interpret with --dtype bf16: {INTERPRETER_BF16_ERROR}")
    if "fused-graphed" in backends and not on_gpu:
        parser.error("the fused-graphed backend replays CUDA graphs: it needs a CUDA device")
    if args.interpret and not triton_interpreter_on():
        # Triton picks interpreted or compiled functions (its own tl.cdiv too) when it is imported,
        # which `import samhq_fast` already did (through torch._dynamo): too late to switch here.
        parser.error("--interpret needs TRITON_INTERPRET=1 in the environment before Python starts: "
                     "TRITON_INTERPRET=1 samhq-fast bench --interpret ...")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'samhq-fast[plot]' (or pip install matplotlib)") from None
    return ("cuda" if on_gpu else "cpu"), backends


def _bench_runs(args, backends: list[str], device: str) -> list[tuple[str, list[str]]]:
    """(benchmark, its command line) per dtype: the encoder and the decoder benchmark (which also
    runs end to end)."""
    common = ["--smoke"] if args.smoke else ["--variants", ",".join(args.variant)]
    if args.time_budget_s is not None:
        common += ["--time-budget-s", str(args.time_budget_s)]
    runs = []
    for dtype in args.dtype:
        if "encoder" in args.what and [b for b in backends if b in BENCH_BACKENDS]:
            argv = [*common, "--dtype", dtype, "--backends", ",".join(backends)]
            if device == "cpu":
                argv += ["--compile-mode", "default"]  # max-autotune has nothing to tune on the CPU
            if args.batch:
                argv += ["--batch", ",".join(map(str, args.batch))]
            runs.append(("encoder", argv))
        # what each backend runs in the decoder (fused: both kinds of CUDA graphs, and the Triton
        # convolutions, to see which is faster)
        modes = {"eager": ["eager"], "compile": ["compiled"], "fused": ["graphed", "graphed-conv", "graphed-manual"]}
        mode_list = [m for b in backends if b in modes and "decoder" in args.what and (b != "fused" or device == "cuda") for m in modes[b]]
        e2e = [b for b in backends if b in ("eager", "fused") and "e2e" in args.what]
        if mode_list or e2e:
            argv = [*common, "--dtype", dtype, "--modes", ",".join(mode_list), "--e2e", ",".join(e2e)]
            if args.prompts:
                argv += ["--prompts", ",".join(map(str, args.prompts))]
            if "decoder" not in args.what:
                argv += ["--point-prompts", ""]
            runs.append(("decoder", argv))
    return runs


def bench(args) -> int:
    import importlib

    from samhq_fast.benchmark import common, report

    if args.table:
        defaults = args.parser.parse_args([])  # (argparse passes a string default through the option's type)
        ignored = [name for name in BENCH_RUN_OPTIONS if getattr(args, name) != getattr(defaults, name)]
        if ignored:  # silently dropping them would hide a mistake (a --plot that is never drawn)
            args.parser.error(f"--table only prints the table of results files and runs nothing: drop "
                              f"{', '.join('--' + name.replace('_', '-') for name in ignored)}")
        files = {}
        for path in args.table:  # a file named twice (a.json a.json, or a glob overlapping it) gives one table
            files.setdefault(os.path.realpath(path), path)
        print(report.table_from_files(list(files.values())), end="")
        return 0
    device, backends = _bench_plan(args)
    runs = _bench_runs(args, backends, device)
    if not runs:
        args.parser.error(f"nothing to run: --what {','.join(args.what)} with --backends {','.join(backends)} (the encoder runs "
                          "every backend, the decoder eager, compile and fused (on a GPU), e2e eager and fused)")
    output = Path(args.output) if args.output else common.default_output("bench", args.smoke)
    if output.suffix != ".json":
        args.parser.error(f"--output must end in .json, got {output}")
    for path, option, suffixes in ((output, "--output", (".json",)), (args.plot, "--plot", (".png",))):
        if path:  # folders are made as needed, like --output's default bench/results/
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _check_output(str(path), option, suffixes)
    overrides = {"allow_cpu": True, "checkpoint": args.checkpoint}
    if args.checkpoint:
        model = samhq_fast.load(args.checkpoint, device="cpu")
        overrides["configs"] = {model.variant: model.config}
        common.check_vit_only(overrides["configs"])  # before any run starts
        del model
    weights = common.weights_note(args.checkpoint, args.smoke)
    print(f"[bench] weights: {weights}", flush=True)
    if device == "cpu":
        print(f"[bench] CPU only: {report.NOT_SPEED_FIGURES} (the figures check that the benchmark runs)", flush=True)

    merged = {"tool": "samhq-fast bench", "schema_version": 1, "weights": weights,
              "settings": {"dtypes": args.dtype, "backends": backends, "what": args.what,
                           "batch": args.batch, "prompts": args.prompts, "checkpoint": args.checkpoint,
                           "interpret": args.interpret, "smoke": args.smoke, "device": device},
              "runs": []}
    modules = {"encoder": "samhq_fast.benchmark.encoder", "decoder": "samhq_fast.benchmark.decoder"}
    for what, argv in runs:
        part = output.with_name(f"{output.stem}.{what}-{argv[argv.index('--dtype') + 1]}.json")
        print(f"[bench] {what}: {' '.join(argv)} -> {part}", flush=True)
        part.unlink(missing_ok=True)  # an earlier run's part must not pass for this run's, if this one is cut short
        try:
            run = importlib.import_module(modules[what]).main([*argv, "--output", str(part)], **overrides)
        except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: merge what the runs saved so far
            merged["interrupted"] = f"interrupted during the {what} run {' '.join(argv)}"
            if part.is_file():  # rewritten after every configuration
                merged["runs"].append({"what": what, **json.loads(part.read_text()), "interrupted": True})
            if not merged["runs"]:
                print(f"[bench] {merged['interrupted']}, before any configuration finished: nothing written", file=sys.stderr)
                return 130
            print(f"[bench] {merged['interrupted']}: writing the configurations finished so far", flush=True)
            break
        merged["runs"].append({"what": what, **run})
    # what the runs ran (the smoke model's name, a checkpoint's variant), not --variant's names
    merged["settings"] = {"variants": merged["runs"][0]["settings"]["variants"], **merged["settings"]}
    merged["machine"] = merged["runs"][0]["machine"]
    merged["rows"] = report.load_rows(merged)
    merged["speed_figures"] = bool(merged["rows"]) and all(r["speed_figure"] for r in merged["rows"])
    if not merged["speed_figures"]:
        merged["note"] = (f"Rows with speed_figure false are {report.NOT_SPEED_FIGURES} (CPU, smoke run, Triton interpreter "
                          "or numerics that disagree with eager): their notes say why.")
    output.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    table = report.markdown_table(merged)
    output.with_suffix(".md").write_text(table)
    print(table, end="")
    if args.plot:
        report.plot(merged, args.plot)
    print(f"wrote {', '.join(str(p) for p in (output, output.with_suffix('.md'), args.plot) if p)}")
    return 130 if "interrupted" in merged else 0  # 130: the shell's status for SIGINT


# ---------------------------------------------------------------------------------------------


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one CLI line, without the library's source file and line."""
    return f"samhq-fast: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 usage or input error)."""
    parser = build_parser()
    library_format, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        args = parser.parse_args(argv)
        status = args.run(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe must meet the BrokenPipeError handler below
        return status
    except SystemExit as e:  # argparse already printed --help / --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (outputs are moved into place only once all are written)
        print("samhq-fast: interrupted", file=sys.stderr)
        return 130  # the shell's status for SIGINT
    except BrokenPipeError:  # stdout closed early (| head): the files are written before anything is printed
        with contextlib.suppress(OSError, ValueError):  # (a stdout without a file descriptor: nothing to flush at exit)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 141  # the shell's status for SIGPIPE
    except (ValueError, TypeError, OSError, MissingExtraError) as e:  # bad checkpoint, image, prompt, an unwritable output, a missing extra...
        print(f"samhq-fast: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = library_format


if __name__ == "__main__":
    sys.exit(main())
