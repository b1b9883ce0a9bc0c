"""Half-precision eager models run end to end (the original SAM-HQ fails on bf16 prompts) and stay
close to fp32."""

import copy

import numpy as np
import pytest
import torch

import samhq_fast
from samhq_fast import SamHQPredictor
from samhq_fast.modeling.prompt_encoder import PromptEncoder


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_predictor_matches_fp32(tiny_checkpoints, dtype):
    photo = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    prompts = dict(point_coords=np.array([[[40, 50], [200, 120]], [[150, 100], [10, 10]]]),
                   point_labels=np.array([[1, 0], [1, 1]]), box=np.array([[20, 30, 180, 160], [100, 50, 290, 190]]))
    results = {}
    for name in ("fp32", dtype):
        model = samhq_fast.load(tiny_checkpoints["pth"], device="cpu", dtype=name)
        assert next(model.parameters()).dtype == samhq_fast.build.resolve_dtype(name)
        predictor = SamHQPredictor(model)
        predictor.set_image(photo)
        results[name] = predictor.predict(**prompts, multimask_output=True)
        # a previous low-res mask as the next prompt (the fp32 model's, for both): the half model's mask path
        results[name + "+mask"] = predictor.predict(**prompts, mask_input=results["fp32"][2], multimask_output=True)
    for name in ("", "+mask"):
        check_close_to_fp32(results["fp32" + name], results[dtype + name], dtype)


# (rel L2 of the logits, |score difference|, share of equal mask pixels) per half dtype. Measured
# on the tiny model: bf16 1.5e-2, 1.9e-3, 0.996 (8 mantissa bits: ~4e-3 per rounding, a few dozen
# layers deep); fp16 1.9e-3, 1.3e-4, 0.9995 (11 bits). Bounds 2-5x away.
HALF_TOL = {"bf16": (3e-2, 1e-2, 0.98), "fp16": (6e-3, 5e-4, 0.995)}


def check_close_to_fp32(fp32_results, half_results, dtype: str) -> None:
    (masks32, scores32, logits32), (masks16, scores16, logits16) = fp32_results, half_results
    assert logits16.dtype == np.float32 and scores16.dtype == np.float32
    logit_tol, score_tol, equal_pixels = HALF_TOL[dtype]
    rel_l2 = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
    assert rel_l2 < logit_tol, rel_l2
    np.testing.assert_allclose(scores16, scores32, atol=score_tol)
    assert (masks16 == masks32).mean() > equal_pixels


def test_fp16_model_refuses_mask_logits_beyond_its_range(tiny_model):
    """1e5 is a finite float64 logit but inf in fp16: the scores would come out NaN."""
    predictor = SamHQPredictor(copy.deepcopy(tiny_model).half())
    predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    low = 4 * tiny_model.config.embedding_size
    with pytest.raises(ValueError, match=r"mask_input has values beyond float16's range \(max \|logit\| 1e\+05\)"):
        predictor.predict(box=np.array([5, 5, 40, 30]), mask_input=np.full((1, low, low), 1e5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_model_normalizes_pixels_in_fp32(tiny_model, dtype):
    """preprocess normalizes in fp32 and rounds once to the model dtype, not (x - mean) / std in half
    precision (two more roundings: about 2x the input error in bf16)."""
    images = torch.rand(2, 3, 200, 256, generator=torch.Generator().manual_seed(0)) * 255  # padded to 256 x 256
    half = copy.deepcopy(tiny_model).to(dtype)
    assert torch.equal(half.preprocess(images), tiny_model.preprocess(images).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_model_return_torch_is_the_numpy_output(tiny_model, dtype):
    """return_torch gives the numpy outputs' values and dtypes as tensors (bool masks, float32 scores
    and logits), also from a half model, whose decoder computes scores and low-res logits in 16 bits."""
    predictor = SamHQPredictor(copy.deepcopy(tiny_model).to(dtype))
    photo = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    predictor.set_images([photo])
    boxes = np.array([[20, 30, 180, 160], [100, 50, 290, 190]])
    for return_logits in (False, True):
        numpy_out = predictor.predict(box=boxes, return_logits=return_logits)
        assert [a.dtype for a in numpy_out] == [np.float32 if return_logits else np.bool_, np.float32, np.float32]
        for torch_out in (predictor.predict(box=boxes, return_logits=return_logits, return_torch=True),
                          predictor.predict_batch([dict(box=boxes)], return_logits=return_logits, return_torch=True)[0]):
            for t, a in zip(torch_out, numpy_out):
                assert t.dtype == (torch.bool if a.dtype == np.bool_ else torch.float32)
                assert torch.equal(t, torch.from_numpy(a))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_model_upsamples_masks_in_fp32(tiny_model, dtype):
    """postprocess_masks upsamples in fp32 whatever the model's dtype: the same logits as the fp32
    model's from the same low-res input (a 16-bit upsample would round every output pixel)."""
    half = copy.deepcopy(tiny_model).to(dtype)
    low = torch.randn(2, 1, 64, 64).to(dtype)
    got = half.postprocess_masks(low, (171, 256), (200, 300))
    assert got.dtype == torch.float32
    assert torch.equal(got, tiny_model.postprocess_masks(low.float(), (171, 256), (200, 300)))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_checkpoint_keeps_its_fourier_basis_values(tiny_model, tmp_path, dtype):
    """A checkpoint saved from a half model holds G in fp16; loading it as bf16 must not round G again
    (fp16 -> bf16 drops 3 mantissa bits): the loaded model holds G in fp32, equal to the file's fp16 values."""
    state_dict = {k: v.half() for k, v in tiny_model.state_dict().items()}
    torch.save(state_dict, tmp_path / "fp16.pth")
    model = samhq_fast.load(tmp_path / "fp16.pth", device="cpu", dtype=dtype)
    basis = model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    stored = state_dict["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert basis.dtype == torch.float32 and torch.equal(basis, stored.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prompt_positional_encoding_stays_fp32_in_half_models(dtype):
    """Casting the model keeps the random Fourier basis G fp32 (its phases reach ~25 rad: a bf16 G
    puts point encodings up to 0.05 off, bf16 arithmetic 0.13). So a half model's prompt tokens are
    the fp32 function of its own rounded learned embeddings, and its dense encoding is the fp32 one
    rounded once."""
    full = PromptEncoder(256, (64, 64), (1024, 1024))
    half = copy.deepcopy(full).to(dtype)
    basis = half.pe_layer.positional_encoding_gaussian_matrix
    assert basis.dtype == torch.float32 and torch.equal(basis, full.pe_layer.positional_encoding_gaussian_matrix)
    assert copy.deepcopy(half).half().float().pe_layer.positional_encoding_gaussian_matrix.equal(basis)  # no rounding on the way
    rounded = copy.deepcopy(full)  # fp32 arithmetic, learned embeddings rounded to the half dtype
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.copy_(module.weight.to(dtype))
    gen = torch.Generator().manual_seed(0)
    coords = torch.rand(3, 5, 2, generator=gen) * 1024
    labels = torch.randint(-1, 2, (3, 5), generator=gen)
    boxes = torch.sort(torch.rand(4, 2, 2, generator=gen) * 1024, dim=1).values.reshape(4, 4)
    with torch.no_grad():
        torch.testing.assert_close(half.embed_points(coords, labels), rounded.embed_points(coords, labels), atol=1e-6, rtol=0)
        torch.testing.assert_close(half.embed_boxes(boxes), rounded.embed_boxes(boxes), atol=1e-6, rtol=0)
        torch.testing.assert_close(half.get_dense_pe(), full.get_dense_pe().to(dtype), atol=0, rtol=0)
