"""Encoder, decoder and end-to-end cases for pytest-benchmark, at the CLI bench's sizes on a GPU (batch 1,
8, 32; 1 to 1,024 prompts) and tiny ones on the CPU. One benchmark group per case, so that
`pytest bench/ --benchmark-only --benchmark-compare` shows eager / compile / fused (and their CUDA-graph
variants) side by side, with HF transformers' SamHQModel (SDPA and eager attention) in the encoder
groups when it is installed.

    pytest bench/ --benchmark-only                       # GPU: vit_b, vit_h; CPU: tiny model
    TRITON_INTERPRET=1 pytest bench/ --benchmark-only    # CPU: fused too, in the interpreter (slow)
"""

import os

import pytest
import torch

from samhq_fast.automatic import SamHQAutomaticMaskGenerator
from samhq_fast.benchmark import decoder as dec
from samhq_fast.benchmark import encoder as enc
from samhq_fast.benchmark.common import SMOKE_CONFIG
from samhq_fast.fused import apply_fused_backend
from samhq_fast.modeling import SamHQConfig

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
CONFIGS = {v: SamHQConfig.from_variant(v) for v in ("vit_b", "vit_h")} if ON_GPU else {"smoke": SMOKE_CONFIG}
BATCHES = (1, 8, 32) if ON_GPU else (1,)
PROMPTS = (1, 16, 64, 256, 1024) if ON_GPU else (4,)


def _skip_fused():
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("fused on the CPU only with TRITON_INTERPRET=1 (the Triton interpreter)")


def _sync(fn):
    def call(*args):
        out = fn(*args)
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    return call


@pytest.mark.parametrize("backend", enc.ALL_BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_encoder(benchmark, variant, batch, backend):
    if backend == "fused":
        _skip_fused()
    if backend in enc.HF_ATTENTION:
        pytest.importorskip("transformers")
    if backend == "fused-graphed" and not ON_GPU:
        pytest.skip("CUDA graphs need a GPU")
    config = CONFIGS[variant]
    weights = enc.make_weights(config, DEVICE, DTYPE, seed=0)
    model = enc.Backend(backend, config, weights, DEVICE, DTYPE, "max-autotune" if ON_GPU else "default")
    model.for_batch(batch)
    x = enc.make_inputs(config, batch, DEVICE, DTYPE, seed=batch)[0]
    benchmark.group = f"encoder {variant} batch {batch} {str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(speed_figure=ON_GPU and os.environ.get("TRITON_INTERPRET") != "1")
    fn = _sync(model.fn)
    with torch.inference_mode():
        fn(x)  # first call: compiles / autotunes outside the timing
        benchmark.pedantic(fn, args=(x,), rounds=10 if ON_GPU else 3, warmup_rounds=1)
    model.after_batch()


@pytest.mark.parametrize("mode", ("eager", "compiled", "graphed", "graphed-conv", "graphed-manual"))
@pytest.mark.parametrize("prompts", PROMPTS)
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_decoder(benchmark, variant, prompts, mode):
    if mode.startswith("graphed") and not ON_GPU:
        pytest.skip("CUDA graphs need a GPU")
    config = CONFIGS[variant]
    image = dec.Image(config, DEVICE, DTYPE, seed=0)
    fn = _sync(dec.decoder_fn(mode, image))
    args = dec.make_prompts("box", prompts, config, DEVICE, seed=0)[0]
    benchmark.group = f"decoder {variant} {prompts} box {str(DTYPE).removeprefix('torch.')}"
    with torch.inference_mode():
        fn(*args)
        benchmark.pedantic(fn, args=args, rounds=20 if ON_GPU else 3, warmup_rounds=1)


@pytest.mark.parametrize("backend", ("eager", "fused"))
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_e2e(benchmark, variant, backend):
    """set_image of a uint8 frame + one box through SamHQPredictor (includes the image encoder)."""
    if backend == "fused":
        _skip_fused()
    config = CONFIGS[variant]
    fn, arg_sets = dec.e2e_call(backend, dec.Image(config, DEVICE, DTYPE, seed=0), config, DEVICE, seed=0)
    fn = _sync(fn)
    benchmark.group = f"e2e {variant} set_image + 1 box {str(DTYPE).removeprefix('torch.')}"
    with torch.inference_mode():
        fn(*arg_sets[0])
        benchmark.pedantic(fn, args=arg_sets[0], rounds=10 if ON_GPU else 3, warmup_rounds=1)


@pytest.mark.parametrize("backend", ("eager", "fused"))
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_automatic_masks(benchmark, variant, backend):
    """SamHQAutomaticMaskGenerator on one uint8 frame: the original's 32 x 32 point grid, 64 points per
    decoder call (4 x 4 on the CPU). The IoU and stability filters are off (random weights would
    reject every mask), so every mask goes through RLE encoding and box NMS: an upper bound."""
    if backend == "fused":
        _skip_fused()
    config = CONFIGS[variant]
    image = dec.Image(config, DEVICE, DTYPE, seed=0)
    model = apply_fused_backend(image.model) if backend == "fused" else image.model
    generator = SamHQAutomaticMaskGenerator(model, points_per_side=32 if ON_GPU else 4, pred_iou_thresh=0, stability_score_thresh=0)
    frame = torch.randint(0, 256, (*dec.frame_size(config), 3), generator=torch.Generator(device=DEVICE).manual_seed(3), device=DEVICE, dtype=torch.uint8)
    fn = _sync(generator.generate)
    benchmark.group = f"automatic masks {variant} {str(DTYPE).removeprefix('torch.')}"
    fn(frame)
    benchmark.pedantic(fn, args=(frame,), rounds=5 if ON_GPU else 2, warmup_rounds=1)
