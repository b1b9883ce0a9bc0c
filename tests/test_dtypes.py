"""Half-precision eager models run end to end (the original SAM-HQ fails on bf16 prompts) and stay
close to fp32."""

import numpy as np
import pytest
import torch

import samhq_fast
from samhq_fast import SamHQPredictor


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
    (masks32, scores32, logits32), (masks16, scores16, logits16) = results["fp32"], results[dtype]
    assert logits16.dtype == np.float32 and scores16.dtype == np.float32
    rel_l2 = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
    assert rel_l2 < 3e-2, rel_l2  # bf16 keeps 8 mantissa bits: ~4e-3 per rounding, a few dozen layers deep
    np.testing.assert_allclose(scores16, scores32, atol=1e-2)
    assert (masks16 == masks32).mean() > 0.98
