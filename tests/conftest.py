"""Shared fixtures: random-weight SAM-HQ models of real and small architectures, and their checkpoints."""

import os
import random

# The Triton interpreter must be chosen before any kernel module is imported. On a GPU machine run
# the compiled kernels with `TRITON_INTERPRET=0 python -m pytest -m gpu`.
os.environ.setdefault("TRITON_INTERPRET", "1")
# On the GPU the kernels run their untuned default configs here: tuning would time every candidate at
# every new shape (minutes over the suite) and the choice does not change results; each candidate's
# correctness is tested on its own in test_autotune.py.
os.environ.setdefault("SAMHQ_FAST_AUTOTUNE", "0")

import numpy as np
import pytest
import torch
from original_sam_hq import import_original
from safetensors.torch import save_file

from samhq_fast.checkpoint import original_to_hf
from torch import nn

from samhq_fast.modeling import ImageEncoderViT, SamHQ, SamHQConfig, ViTConfig
from samhq_fast.modeling.common import LayerNorm2d
from samhq_fast.modeling.image_encoder import Attention as ImageAttention
from samhq_fast.modeling.tiny_vit import Attention as TinyViTAttention


# 256 input -> 16x16 grid: windowed blocks pad it to 28x28 (4 windows of 14x14); head_dim 80 as vit_h.
TINY_CONFIG = SamHQConfig(
    ViTConfig(img_size=256, patch_size=16, embed_dim=160, depth=4, num_heads=2, mlp_dim=320, global_attn_indexes=(1, 3))
)


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global RNG state (torch, numpy, random), so inputs a test draws
    without its own generator do not depend on which tests ran before it: a failure seen in the
    suite reproduces when the test runs alone."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="module")
def tf32_off():
    """fp32 comparisons on the GPU: cuBLAS matmuls and cuDNN convolutions (the decoder's upscaling and
    HQ convs, on by default) in full fp32, not TF32, whose rounding differs between the algorithms
    eager and compiled code pick."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def randomize_(model: SamHQ, seed: int = 0) -> SamHQ:
    """Give every parameter a non-trivial random value (PyTorch's init leaves pos_embed, rel-pos
    tables, TinyViT's attention biases, norms and BatchNorm statistics at 0/1, which would hide bugs
    in the parts they feed)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(p: torch.Tensor, scale: float, offset: float = 0.0) -> None:
        p.copy_(offset + scale * torch.randn(p.shape, generator=gen))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, LayerNorm2d)):
                draw(module.weight, 0.1, 1.0)
                draw(module.bias, 0.1)
            elif isinstance(module, nn.Embedding):
                draw(module.weight, 1.0)
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                # the std of PyTorch's default init, U(+-1 / sqrt(fan_in)), from the shape alone: the
                # sample std of that init would make the model depend on the global RNG (test order)
                draw(module.weight, (3 * module.weight[0].numel()) ** -0.5)
                if module.bias is not None:
                    draw(module.bias, 0.02)
            elif isinstance(module, ImageAttention):
                draw(module.rel_pos_h, 0.5)
                draw(module.rel_pos_w, 0.5)
            elif isinstance(module, nn.BatchNorm2d):  # TinyViT: eval mode normalizes with the running statistics
                draw(module.weight, 0.1, 1.0)
                draw(module.bias, 0.1)
                draw(module.running_mean, 0.1)
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
            elif isinstance(module, TinyViTAttention):
                draw(module.attention_biases, 0.5)
        if isinstance(model.image_encoder, ImageEncoderViT):
            draw(model.image_encoder.pos_embed, 0.1)
        draw(model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix, 1.0)
    return model


def make_model(config: SamHQConfig, seed: int = 0) -> SamHQ:
    model = randomize_(SamHQ(config), seed).eval()
    model.backend = "eager"
    return model


@pytest.fixture(scope="session")
def tiny_model() -> SamHQ:
    return make_model(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_model, tmp_path_factory) -> dict:
    """The tiny model saved as original .pth, original-layout and HF-layout safetensors."""
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    state_dict = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    paths = {"pth": folder / "sam_hq_tiny.pth", "original_st": folder / "original.safetensors", "hf_st": folder / "hf.safetensors"}
    torch.save(state_dict, paths["pth"])
    save_file(state_dict, paths["original_st"])
    save_file(original_to_hf(state_dict), paths["hf_st"])
    return paths


class KernelSpy:
    """Stands in for a @triton.jit kernel and still runs it; `launches` records each launch's keyword
    arguments (constexprs and config) and its "grid", so a test can tell the kernel really ran, and how."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({**kwargs, "grid": grid})
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def kernel_spies(monkeypatch) -> dict[str, KernelSpy]:
    """Spies on the three Triton kernels: "attention", "rel_pos_terms" and "linear"."""
    from samhq_fast.kernels import attention, fused_linear

    kernels = {"attention": (attention, "_rel_pos_attention_kernel"), "rel_pos_terms": (attention, "_rel_pos_terms_kernel"),
               "linear": (fused_linear, "_fused_linear_kernel")}
    spies = {}
    for name, (module, attr) in kernels.items():
        spies[name] = KernelSpy(getattr(module, attr))
        monkeypatch.setattr(module, attr, spies[name])
    return spies


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need a CUDA device and compiled kernels (TRITON_INTERPRET=0)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and TRITON_INTERPRET=0")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def original():
    """The original SAM-HQ package (segment_anything_hq), as `original_sam_hq.import_original` loads it."""
    return import_original()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 150 x 223 RGB photo-like image (smooth gradients + noise): not square, not a multiple of 16."""
    gen = np.random.default_rng(3)
    y, x = np.mgrid[0:150, 0:223]
    base = np.stack([x * 255 / 222, y * 255 / 149, (x + y) * 255 / 371], -1)
    return np.clip(base + gen.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
