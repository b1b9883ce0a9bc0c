"""The image-encoder FLOP counter against hand counts, the project brief's figures and torch's own counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from samhq_fast.flops import encoder_flops, encoder_flops_breakdown, linear_flops
from samhq_fast.modeling import VARIANTS, ImageEncoderViT, ViTConfig

# 1024 input: 64 x 64 = 4096 real tokens; windowed blocks pad to 70 x 70 = 4900 = 25 windows x 196.
T, TP, WINDOWS, WIN_TOKENS = 4096, 4900, 25, 196


def hand_count_vit_b() -> int:
    """vit_b written out: C = 768, M = 3072, 12 blocks (4 global, 8 windowed), real tokens."""
    patch = 4096 * 768 * (3 * 16 * 16)  # 2,415,919,104 MACs
    qkv = 4096 * 768 * 2304  # per block: 7,247,757,312
    proj = 4096 * 768 * 768  # 2,415,919,104
    mlp = 4096 * 768 * 3072 * 2  # lin1 + lin2: 19,327,352,832
    global_attn = 2 * 4096 * 4096 * 768  # q@k^T + p@v over 12 heads of 64: 25,769,803,776
    window_attn = 25 * 2 * 196 * 196 * 768  # 1,475,174,400
    global_rel = 4096 * (64 + 64) * 768  # q.Rh + q.Rw: 402,653,184
    window_rel = 4900 * (14 + 14) * 768  # 105,369,600
    neck = 4096 * 768 * 256 + 4096 * 256 * 256 * 9  # 805,306,368 + 2,415,919,104
    blocks = 12 * (qkv + proj + mlp) + 4 * (global_attn + global_rel) + 8 * (window_attn + window_rel)
    return 2 * (patch + blocks + neck)


def hand_count_vit_h() -> int:
    """vit_h written out: C = 1280, M = 5120, 32 blocks (4 global, 28 windowed), head_dim 80, real tokens."""
    patch = 4096 * 1280 * (3 * 16 * 16)  # 4,026,531,840 MACs
    qkv = 4096 * 1280 * 3840  # per block: 20,132,659,200
    proj = 4096 * 1280 * 1280  # 6,710,886,400
    mlp = 4096 * 1280 * 5120 * 2  # 53,687,091,200
    global_attn = 2 * 4096 * 4096 * 1280  # 42,949,672,960
    window_attn = 25 * 2 * 196 * 196 * 1280  # 2,458,624,000
    global_rel = 4096 * (64 + 64) * 1280  # 671,088,640
    window_rel = 4900 * (14 + 14) * 1280  # 175,616,000
    neck = 4096 * 1280 * 256 + 4096 * 256 * 256 * 9  # 1,342,177,280 + 2,415,919,104
    blocks = 32 * (qkv + proj + mlp) + 4 * (global_attn + global_rel) + 28 * (window_attn + window_rel)
    return 2 * (patch + blocks + neck)


def test_matches_hand_count():
    assert encoder_flops(VARIANTS["vit_b"]) == hand_count_vit_b() == 941_727_350_784
    assert encoder_flops(VARIANTS["vit_h"]) == hand_count_vit_h() == 5_666_013_544_448


@pytest.mark.parametrize("variant, brief_tflop", [("vit_b", 0.94), ("vit_l", 2.85), ("vit_h", 5.67)])
def test_brief_magnitudes(variant, brief_tflop):
    assert encoder_flops(VARIANTS[variant]) / 1e12 == pytest.approx(brief_tflop, abs=0.005)


def test_linear_share():
    """The brief's "92% in linear layers" is vit_h's share (91.0%); vit_b's attention weighs more."""
    share = {name: linear_flops(cfg) / encoder_flops(cfg) for name, cfg in VARIANTS.items()}
    assert share["vit_h"] == pytest.approx(0.92, abs=0.015)
    # the GEMMs by hand: blocks x tokens x C x (qkv 3C + proj C + MLP 2M) multiply-adds
    assert linear_flops(VARIANTS["vit_b"]) == 2 * 12 * 4096 * 768 * (3 * 768 + 768 + 2 * 3072)
    assert linear_flops(VARIANTS["vit_h"]) == 2 * 32 * 4096 * 1280 * (3 * 1280 + 1280 + 2 * 5120)
    assert share["vit_b"] < share["vit_l"] < share["vit_h"]


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_padded_windows_adds_exactly_the_padded_qkv_proj_rows(variant):
    cfg = VARIANTS[variant]
    n_windowed = cfg.depth - len(cfg.global_attn_indexes)
    extra_rows = n_windowed * (TP - T)  # 804 padding tokens per windowed block
    extra = 2 * extra_rows * (3 * cfg.embed_dim**2 + cfg.embed_dim**2)  # qkv + proj only
    for batch in (1, 3):
        assert encoder_flops(cfg, batch, padded_windows=True) - encoder_flops(cfg, batch) == batch * extra
        padded, real = encoder_flops_breakdown(cfg, batch, True), encoder_flops_breakdown(cfg, batch, False)
        assert padded["mlp"] == real["mlp"]  # the MLP always runs on the 64x64 grid


@pytest.mark.parametrize("variant", ["vit_b", "vit_h"])
def test_linear_in_batch(variant):
    cfg = VARIANTS[variant]
    for padded in (False, True):
        one = encoder_flops(cfg, 1, padded)
        assert [encoder_flops(cfg, b, padded) for b in (2, 8, 32)] == [2 * one, 8 * one, 32 * one]


@pytest.mark.parametrize(
    "config",
    [
        VARIANTS["vit_b"],
        # 256 input: a 16x16 grid padded to 28x28 (4 windows), head_dim 80.
        ViTConfig(img_size=256, embed_dim=160, depth=4, num_heads=2, mlp_dim=320, global_attn_indexes=(1, 3)),
    ],
    ids=["vit_b", "tiny"],
)
def test_matches_torch_flop_counter_on_eager_model(config):
    """torch's FlopCounterMode over the eager encoder (on the meta device: shapes only, no compute)
    counts what the original actually runs: qkv/proj on the padded grid, i.e. padded_windows=True."""
    with torch.device("meta"):
        encoder = ImageEncoderViT(config)
        images = torch.empty(2, 3, config.img_size, config.img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(images)
    assert counter.get_total_flops() == encoder_flops(config, 2, padded_windows=True)
