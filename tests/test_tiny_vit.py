"""Light HQ-SAM (`vit_tiny`, TinyViT image encoder) against the original release's own model.

The original is built by `segment_anything_hq`'s `build_sam_vit_t` (timm stand-ins from
original_sam_hq.py where timm is not installed), given our random weights through its own
`load_state_dict(strict=True)` (BatchNorm statistics, attention biases and norms included, not
PyTorch's 0/1 inits) and saved as an original .pth that `samhq_fast.load` reads strictly: the key
layouts agree both ways. Everything runs at the real 1024 input (the original's TinyViT knows no
other), fp32 on the CPU; the bar is test_original_parity.py's.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import samhq_fast
from samhq_fast import CheckpointError, SamHQPredictor, build_sam_hq, sam_model_registry
from samhq_fast.checkpoint import hf_config_kwargs, infer_config, original_to_hf
from samhq_fast.cli import main
from samhq_fast.flops import encoder_flops
from samhq_fast.fused import FusedBlock
from samhq_fast.modeling import ImageEncoderTinyViT, SamHQConfig, TinyViTConfig
from samhq_fast.modeling.tiny_vit import window_offsets
from conftest import make_model
from test_checkpoint import assert_same_model, meta_state_dict, read_tsv, state_dict_of, variant_shapes
from test_original_parity import assert_predict_matches

VIT_TINY = SamHQConfig.from_variant("vit_tiny")
PROMPTS = {
    "point": dict(point_coords=np.array([[111.0, 70.0]]), point_labels=np.array([1])),
    "box": dict(box=np.array([30.0, 20.0, 190.0, 140.0])),
}


@pytest.fixture(scope="module")
def pair(original, tmp_path_factory):
    """(the original vit_tiny Sam, our eager model loaded from the .pth the original saved, its path)."""
    reference = original.sam_model_registry["vit_tiny"]()
    reference.load_state_dict(make_model(VIT_TINY).state_dict(), strict=True)
    # The original caches each attention's bias table (`ab`) when put in eval mode, so the weights
    # just loaded reach its forward only after eval() again.
    reference.eval()
    path = tmp_path_factory.mktemp("vit_tiny") / "sam_hq_vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    return reference, samhq_fast.load(path, device="cpu", backend="eager"), path


@pytest.fixture(scope="module")
def predictors(original, pair, photo):
    """The original SamPredictor and ours, each with the photo set."""
    reference, ours, _ = pair
    theirs = original.SamPredictor(reference)
    theirs.set_image(photo)
    predictor = SamHQPredictor(ours)
    predictor.set_image(photo)
    return theirs, predictor


def test_keys_match_the_original(pair):
    reference, ours, _ = pair
    state_dict = ours.state_dict()
    keys = list(state_dict)
    assert keys == list(reference.state_dict())
    # tests/data's key list of the real checkpoint: keys in order, shapes, dtypes (BatchNorm's counters are int64).
    assert [[k, str(list(v.shape)).replace(" ", ""), str(v.dtype).removeprefix("torch.")] for k, v in state_dict.items()] == [
        [k, shape.replace(" ", ""), dtype] for k, shape, dtype in read_tsv("keys_vit_tiny.tsv")]
    # The original's attention_bias_idxs buffer is not persistent (in no checkpoint): ours is computed.
    assert not any("attention_bias_idxs" in k for k in keys)
    for stage in (1, 2, 3):
        theirs = reference.image_encoder.layers[stage].blocks[0].attn.attention_bias_idxs
        window = ours.image_encoder.layers[stage].blocks[0].attn.window
        assert torch.equal(window_offsets(window, torch.device("cpu")), theirs)


def test_config(pair):
    _, ours, path = pair
    assert ours.variant == "vit_tiny" and ours.config == VIT_TINY
    assert isinstance(ours.image_encoder, ImageEncoderTinyViT) and ours.image_encoder.img_size == 1024
    assert (VIT_TINY.img_size, VIT_TINY.embedding_size, VIT_TINY.vit_dim) == (1024, 64, 160)
    assert VIT_TINY.to_dict() == {"variant": "vit_tiny", "encoder": {
        "img_size": 1024, "embed_dims": (64, 128, 160, 320), "depths": (2, 2, 6, 2), "num_heads": (2, 4, 5, 10),
        "window_sizes": (7, 7, 14, 7), "mlp_ratio": 4, "mbconv_expand_ratio": 4, "local_conv_size": 3, "num_classes": 1000,
        "out_chans": 256}}
    assert sam_model_registry["vit_tiny"](checkpoint=path).variant == "vit_tiny"
    assert build_sam_hq("vit_tiny").variant == "vit_tiny"


def test_encoder_matches_original(pair, photo):
    reference, ours, _ = pair
    x = reference.preprocess(torch.from_numpy(photo).permute(2, 0, 1)[None].float())
    with torch.no_grad():
        expected, expected_interm = reference.image_encoder(x)
        actual, actual_interm = ours.image_encoder(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert len(actual_interm) == 1 and actual_interm[0].shape == (1, 64, 64, 160)
    torch.testing.assert_close(actual_interm[0], expected_interm[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_predict_matches_original(predictors, prompt, multimask_output):
    assert_predict_matches(*predictors, **PROMPTS[prompt], multimask_output=multimask_output)


def test_safetensors_original_layout(pair, tmp_path):
    _, ours, _ = pair
    path = tmp_path / "vit_tiny.safetensors"
    save_file(state_dict_of(ours), path)
    assert_same_model(samhq_fast.load(path, device="cpu"), ours)


def test_hf_layout_is_refused(pair, tmp_path, capsys):
    """transformers has no TinyViT SAM-HQ: converting to its layout is an error, not a file of guesses."""
    _, ours, path = pair
    with pytest.raises(CheckpointError, match="no Hugging Face layout"):
        original_to_hf(ours.state_dict())
    with pytest.raises(ValueError, match="no Hugging Face layout"):
        hf_config_kwargs(VIT_TINY)
    out = tmp_path / "hf.safetensors"
    assert main(["convert", str(path), str(out), "--layout", "hf"]) == 2
    assert "no Hugging Face layout" in capsys.readouterr().err and not out.exists()


def _resized(shapes: dict, key: str, shape: tuple) -> dict:
    return {**shapes, key: shape}


MALFORMED = {
    "3 stages": ({k: s for k, s in variant_shapes("vit_tiny").items() if ".layers.3." not in k}, "4 stages"),
    "blocks disagree": (_resized(variant_shapes("vit_tiny"), "image_encoder.layers.1.blocks.0.attn.attention_biases", (4, 50)),
                          "different shapes across blocks"),
    "non-square windows": ({k: (s[0], 50) if k.endswith("layers.1.blocks.0.attn.attention_biases") or k.endswith(
        "layers.1.blocks.1.attn.attention_biases") else s for k, s in variant_shapes("vit_tiny").items()}, r"not \[heads, window\^2\]"),
    # A width the original merges into with stride 2: it would not keep the 64x64 grid SAM needs.
    "last merge width": (_resized(variant_shapes("vit_tiny"), "image_encoder.layers.2.downsample.conv1.c.weight", (384, 160, 1, 1)),
                         "strides"),
    # The MBConv hidden width must be a whole multiple of the stem width (the expansion ratio).
    "mbconv width": (_resized(variant_shapes("vit_tiny"), "image_encoder.layers.0.blocks.0.conv1.c.weight", (100, 64, 1, 1)),
                     "not multiples of 64 / 128"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_tiny_vit_is_a_clear_error(case):
    shapes, message = MALFORMED[case]
    with pytest.raises(CheckpointError, match=message):
        infer_config(meta_state_dict(shapes))


def test_custom_tiny_vit_config_is_inferred():
    """Another TinyViT (tiny_vit_11m's widths and heads, other windows, MLP / MBConv ratios and local
    conv, no classification head) is a "custom" vit_tiny."""
    encoder = TinyViTConfig(embed_dims=(64, 128, 256, 448), num_heads=(2, 4, 8, 14), window_sizes=(7, 8, 16, 8), num_classes=0,
                            mlp_ratio=3, mbconv_expand_ratio=2, local_conv_size=5)
    with torch.device("meta"):
        state_dict = samhq_fast.SamHQ(SamHQConfig(encoder)).state_dict()
    config = infer_config(state_dict)
    assert config.encoder == encoder and config.variant == "custom" and config.vit_dim == 256


def test_vit_only_tools_refuse_vit_tiny(pair, tmp_path, capsys):
    """FLOP counts and the benchmarks are the ViT encoder's: a clear error, not a crash inside them."""
    _, _, path = pair
    with pytest.raises(ValueError, match="ViT image encoder"):
        encoder_flops(VIT_TINY.encoder)
    out = tmp_path / "bench.json"
    assert main(["bench", "--checkpoint", str(path), "--smoke", "--what", "encoder", "--backends", "eager", "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert "the benchmarks measure ViT image encoders" in captured.err and "Light HQ-SAM" in captured.err and not out.exists()
    assert "[bench]" not in captured.out  # refused before any benchmark starts


@pytest.mark.slow
def test_fused_backend_keeps_tiny_vit_eager(pair, predictors, photo):
    """load(backend="fused"): the TinyViT encoder stays eager (the Triton kernels are ViT blocks'),
    the prompts go through the fused backend's compiled decoder; the same outputs as eager."""
    _, eager, path = pair
    model = samhq_fast.load(path, device="cpu", backend="fused")
    assert model.backend == "fused" and isinstance(model.image_encoder, ImageEncoderTinyViT)
    assert not any(isinstance(m, FusedBlock) for m in model.modules())
    assert_same_model(model, eager)
    fused = SamHQPredictor(model)
    fused.set_image(photo)
    _, predictor = predictors
    prompts = dict(point_coords=np.array([[[111.0, 70.0]], [[40.0, 30.0]]]), point_labels=np.array([[1], [1]]),
                   box=np.array([[30.0, 20.0, 190.0, 140.0], [10.0, 5.0, 150.0, 100.0]]))
    for multimask_output in (True, False):
        logits_e, scores_e, low_e = predictor.predict(**prompts, multimask_output=multimask_output, return_logits=True)
        logits_f, scores_f, low_f = fused.predict(**prompts, multimask_output=multimask_output, return_logits=True)
        np.testing.assert_allclose(scores_f, scores_e, atol=1e-5)
        for got, expected in ((logits_f, logits_e), (low_f, low_e)):
            np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    assert fused._prompt_decoder is not None  # the compiled decoder ran


@pytest.mark.gpu
def test_tiny_vit_on_cuda_gpu(pair, predictors, photo, tf32_off):
    """vit_tiny on the GPU: fp32 (TF32 off) equals the CPU eager model; bf16 with the fused backend
    (eager TinyViT encoder, graphed decoder) stays within bf16 rounding of it."""
    _, _, path = pair
    _, cpu = predictors
    prompt = dict(box=np.array([30.0, 20.0, 190.0, 140.0]), multimask_output=False, return_logits=True)
    logits_cpu, scores_cpu, _ = cpu.predict(**prompt)
    for dtype, backend, tolerance in (("fp32", "eager", 1e-4), ("bf16", "fused", 3e-2)):
        gpu = SamHQPredictor(samhq_fast.load(path, device="cuda", dtype=dtype, backend=backend))
        gpu.set_image(photo)
        logits, scores, _ = gpu.predict(**prompt)
        assert np.linalg.norm(logits - logits_cpu) / np.linalg.norm(logits_cpu) < tolerance, dtype
        np.testing.assert_allclose(scores, scores_cpu, atol=tolerance)
