"""Parity with HF transformers' `SamHQModel` as an independent reference implementation.

Both models get the same random weights: ours from `make_model`, HF's through
`original_to_hf(state_dict)` loaded strictly. The tiny HF model uses attn_implementation="eager":
an explicit `softmax(q k^T * scale + rel_pos) @ v` that shares no kernel with ours (SDPA with an
additive bias), so it also pins down SDPA's mask semantics. The vit_b HF model uses "sdpa" to save
~5 s of CPU per encoder run; it still checks HF's own windowing and rel-pos code at the real size.

What HF is (and is not) an oracle for, see the project's shared/REFERENCE.md:
- encoder (neck output + global-block outputs) and IoU scores: as shipped;
- mask logits: only after fixing one line of `SamHQMaskDecoder.forward` (it drops the two-way
  transformer's updated image embedding); the fix is applied here, for the duration of a test only;
- its two-way transformer LayerNorms default to eps 1e-6, the original uses 1e-5: set in the config;
- multimask: HF returns the 3 multimask outputs sorted by score, the original (and we) the best one.

Tolerances (fp32 on CPU). The two sides sum in different orders (SDPA vs explicit softmax, einsum
layouts, broadcast vs repeated batches). Measured on random weights: encoder outputs and mask logits
differ by <= 2e-6 of the tensor's max-abs value (tiny and vit_b alike), IoU scores by ~1e-6 absolute.
- encoder: max error <= 1e-4 x max|expected| (12 blocks compound rounding: keep 50x headroom);
- mask logits: <= 3e-5 x max|expected| (~15x headroom), tight enough to catch the two-way
  transformer LayerNorm eps slipping from 1e-5 to HF's 1e-6 (measured 9e-5 of the scale);
- IoU scores: 1e-5 absolute (they are predicted IoUs, scale 1; random weights give |score| ~0.01..0.3,
  so a relative check would hinge on a near-zero score); the eps slip moves them by ~3e-5.
A half-pixel shift of a point moves the logits by ~1e-2 of their scale.
"""

import inspect
import textwrap

import pytest
import torch
from transformers import SamHQModel
from transformers.models.sam_hq import modeling_sam_hq

from conftest import make_model
from samhq_fast.benchmark.encoder import hf_config
from samhq_fast.checkpoint import original_to_hf
from samhq_fast.modeling import SamHQ, SamHQConfig

ENCODER_REL_TOL = 1e-4
MASK_REL_TOL = 3e-5
IOU_ATOL = 1e-5


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Max abs error <= rel * max|expected|: random-weight tensors hold values near 0 (where an
    elementwise relative check would hinge on rounding) and the scale differs per tensor."""
    torch.testing.assert_close(actual, expected, atol=rel * expected.abs().max().item(), rtol=0)


def assert_iou_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=IOU_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Building the HF reference


def build_hf(model: SamHQ, attn_implementation: str = "eager") -> SamHQModel:
    hf = SamHQModel(hf_config(model.config, attn_implementation)).eval()
    attention_class = {"eager": "SamHQVisionAttention", "sdpa": "SamHQVisionSdpaAttention"}[attn_implementation]
    assert type(hf.vision_encoder.layers[0].attn).__name__ == attention_class
    state_dict = original_to_hf(model.state_dict())
    expected = hf.state_dict().keys()
    # Exact key sets (not just "strict load passed"): a clear diff if either side drifts.
    assert sorted(set(expected) - set(state_dict)) == [], "HF keys missing from original_to_hf output"
    assert sorted(set(state_dict) - set(expected)) == [], "original_to_hf keys HF does not have"
    hf.load_state_dict(state_dict, strict=True)
    # HF ties prompt_encoder.shared_embedding to shared_image_embedding (one Parameter, two
    # state-dict keys); original_to_hf writes both copies. The tie must survive the load, with our values.
    tied = hf.prompt_encoder.shared_embedding.positional_embedding
    assert tied is hf.shared_image_embedding.positional_embedding
    torch.testing.assert_close(tied, model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix, atol=0, rtol=0)
    return hf


def random_image(model: SamHQ, seed: int) -> torch.Tensor:
    """A preprocessed random image that does not fill the square input, so the zero padding
    (bottom/right) flows through the encoder as it does for real images."""
    size = model.config.img_size
    gen = torch.Generator().manual_seed(seed)
    return model.preprocess(255 * torch.rand(1, 3, size, size * 3 // 4, generator=gen))


class Encoded:
    """One image through both encoders (computed once, shared by the tests of a model)."""

    def __init__(self, model: SamHQ, hf: SamHQModel, seed: int):
        self.model, self.hf = model, hf
        self.image = image = random_image(model, seed)
        with torch.inference_mode():
            # image_encoder + hq_features is exactly encode_image's body; called apart so that
            # the (slow, for vit_b) encoder runs once and its global-block outputs are kept.
            self.embeddings, self.global_outputs = model.image_encoder(image)
            self.hq_features = model.mask_decoder.hq_features(self.embeddings, self.global_outputs[0])
            hf_out = hf.vision_encoder(pixel_values=image)
        self.hf_embeddings = hf_out.last_hidden_state
        self.hf_intermediate = list(hf_out.intermediate_embeddings)


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Encoded:
    return Encoded(tiny_model, build_hf(tiny_model), seed=1)


@pytest.fixture(scope="module")
def vit_b() -> Encoded:
    model = make_model(SamHQConfig.from_variant("vit_b"), seed=2)
    return Encoded(model, build_hf(model, attn_implementation="sdpa"), seed=3)


# ---------------------------------------------------------------------------------------------
# Prompts: P prompts per image, in the input-pixel frame of an S x S model.

NUM_PROMPTS = 3


def make_prompt(kind: str, model: SamHQ, seed: int = 0) -> dict:
    size, mask_side = model.config.img_size, 4 * model.config.embedding_size
    gen = torch.Generator().manual_seed(seed)
    prompt = {"points": None, "labels": None, "boxes": None, "masks": None}
    if "points" in kind:
        prompt["points"] = size * torch.rand(NUM_PROMPTS, 3, 2, generator=gen)
        # 1 = foreground, 0 = background, -1 = "not a point" (replaces the embedding)
        prompt["labels"] = torch.tensor([[1, 0, -1], [1, 1, 0], [0, 1, -1]])
    if "box" in kind:
        corners = size * torch.rand(NUM_PROMPTS, 2, 2, generator=gen)
        prompt["boxes"] = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)  # x1 y1 x2 y2
    if "mask" in kind:
        prompt["masks"] = 8 * torch.randn(NUM_PROMPTS, 1, mask_side, mask_side, generator=gen)  # low-res logits
    return prompt


# points: with labels 1/0/-1 and the padding token; box: no padding token; mask_only: no sparse token at all.
PROMPT_KINDS = ["points", "box", "box+points", "mask+points", "mask_only"]


def run_ours(enc: Encoded, prompt: dict, multimask: bool = False, hq_token_only: bool = False, all_tokens: bool = False):
    """Our prompt encoder + decoder -> (mask [P, 1, 4G, 4G], iou [P, 1]), or with all_tokens
    predict_masks' (all 5 masks [P, 5, 4G, 4G], 4 scores [P, 4])."""
    model = enc.model
    points = None if prompt["points"] is None else (prompt["points"], prompt["labels"])
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=points, boxes=prompt["boxes"], masks=prompt["masks"])
        args = (enc.embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense, enc.hq_features)
        if all_tokens:
            return model.mask_decoder.predict_masks(*args)
        return model.mask_decoder(*args, multimask_output=multimask, hq_token_only=hq_token_only)


def run_hf(enc: Encoded, prompt: dict, multimask: bool, hq_token_only: bool):
    """HF forward from HF's own encoder outputs -> (masks [P, C, 4G, 4G], iou [P, C]).

    Each prompt is its own "image" (batch P, point batch 1): HF adds a mask prompt's dense
    embedding per image, so P masks need P images; the embeddings are just repeated."""
    p = NUM_PROMPTS
    kwargs = {
        "image_embeddings": enc.hf_embeddings.repeat(p, 1, 1, 1),
        "intermediate_embeddings": [t.repeat(p, 1, 1, 1) for t in enc.hf_intermediate],
        "multimask_output": multimask,
        "hq_token_only": hq_token_only,
    }
    if prompt["points"] is not None:
        kwargs["input_points"] = prompt["points"][:, None]
        kwargs["input_labels"] = prompt["labels"][:, None]
    if prompt["boxes"] is not None:
        kwargs["input_boxes"] = prompt["boxes"][:, None]
    if prompt["masks"] is not None:
        kwargs["input_masks"] = prompt["masks"]
    with torch.inference_mode():
        out = enc.hf(**kwargs)
    return out.pred_masks[:, 0], out.iou_scores[:, 0]


# HF's bug and its fix (REFERENCE.md): the transformer returns (tokens, updated image embedding);
# HF binds the latter to a variable it overwrites on the next line and then upsamples the
# pre-transformer (and spatially transposed) embedding.
_BUGGY_LINE = "point_embedding, iou_token_out = self.transformer("
_FIXED_LINE = "point_embedding, image_embeddings = self.transformer("


@pytest.fixture
def fixed_hf_decoder(monkeypatch):
    source = textwrap.dedent(inspect.getsource(modeling_sam_hq.SamHQMaskDecoder.forward))
    # Fails loudly if a transformers upgrade changes (or fixes) the line: revisit this test then.
    assert source.count(_BUGGY_LINE) == 1, "HF SamHQMaskDecoder.forward changed: the known bug's line is not there once"
    namespace: dict = {}
    # Its own filename, so tracebacks do not point at the wrong lines of the real file; the module's
    # globals (copied) resolve the names the method uses.
    code = compile(source.replace(_BUGGY_LINE, _FIXED_LINE), "<SamHQMaskDecoder.forward, fixed in test_hf_parity>", "exec")
    exec(code, dict(vars(modeling_sam_hq)), namespace)
    monkeypatch.setattr(modeling_sam_hq.SamHQMaskDecoder, "forward", namespace["forward"])


# ---------------------------------------------------------------------------------------------
# Encoder


def check_encoder(enc: Encoded) -> None:
    assert enc.embeddings.shape == enc.hf_embeddings.shape
    assert_close_scaled(enc.embeddings, enc.hf_embeddings, ENCODER_REL_TOL)
    # every global block's output (the HQ decoder reads the first), channels-last [B, G, G, C]
    assert len(enc.global_outputs) == len(enc.hf_intermediate) == len(enc.model.config.encoder.global_attn_indexes)
    for ours, theirs in zip(enc.global_outputs, enc.hf_intermediate):
        assert_close_scaled(ours, theirs, ENCODER_REL_TOL)


def test_tiny_encoder_matches_hf(tiny):
    check_encoder(tiny)
    # encode_image is the public entry point: same tensors as the pieces used in these tests
    with torch.inference_mode():
        embeddings, early, hq_features = tiny.model.encode_image(tiny.image)
    torch.testing.assert_close(embeddings, tiny.embeddings, atol=0, rtol=0)
    torch.testing.assert_close(early, tiny.global_outputs[0], atol=0, rtol=0)
    torch.testing.assert_close(hq_features, tiny.hq_features, atol=0, rtol=0)


@pytest.mark.slow
def test_vit_b_encoder_matches_hf(vit_b):
    check_encoder(vit_b)


# ---------------------------------------------------------------------------------------------
# IoU scores: right in HF as shipped (the bug only touches the mask path).


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_tiny_iou_matches_hf(tiny, kind):
    """All four IoU scores against HF as shipped, which reports token 0's score (single mask) or
    tokens 1..3's scores sorted descending (multimask)."""
    prompt = make_prompt(kind, tiny.model)
    _, hf_single = run_hf(tiny, prompt, multimask=False, hq_token_only=False)
    _, hf_multi = run_hf(tiny, prompt, multimask=True, hq_token_only=False)
    assert hf_single.shape == (NUM_PROMPTS, 1) and hf_multi.shape == (NUM_PROMPTS, 3)
    _, iou = run_ours(tiny, prompt, all_tokens=True)
    assert_iou_close(iou[:, :1], hf_single)
    assert_iou_close(iou[:, 1:4].sort(dim=1, descending=True).values, hf_multi)


# ---------------------------------------------------------------------------------------------
# Mask logits: against HF with its decoder fixed.


def check_masks(enc: Encoded, kind: str, multimask: bool, hq_token_only: bool) -> None:
    """Our single output mask and score against HF's first (for multimask: top-scoring) ones."""
    prompt = make_prompt(kind, enc.model)
    masks, iou = run_ours(enc, prompt, multimask, hq_token_only)
    hf_masks, hf_iou = run_hf(enc, prompt, multimask, hq_token_only)
    side = 4 * enc.model.config.embedding_size
    assert masks.shape == (NUM_PROMPTS, 1, side, side) and iou.shape == (NUM_PROMPTS, 1)
    # HF returns 3 masks (sorted by score) for multimask unless hq_token_only.
    assert hf_masks.shape == (NUM_PROMPTS, 3 if multimask and not hq_token_only else 1, side, side)
    assert_close_scaled(masks, hf_masks[:, :1], MASK_REL_TOL)
    assert_iou_close(iou, hf_iou[:, :1])


# Every prompt kind in the default mode, and the output modes (independent of the prompt kind) on two kinds.
MASK_CASES = [(kind, False, False) for kind in PROMPT_KINDS] + [
    ("box+points", True, False),
    ("box+points", False, True),
    ("box+points", True, True),
    ("mask_only", True, False),
]


@pytest.mark.parametrize("kind,multimask,hq_token_only", MASK_CASES)
def test_tiny_mask_logits_match_fixed_hf(tiny, fixed_hf_decoder, kind, multimask, hq_token_only):
    check_masks(tiny, kind, multimask, hq_token_only)


@pytest.mark.parametrize("kind", ["points", "box+points", "mask+points"])
def test_tiny_all_mask_tokens_match_fixed_hf(tiny, fixed_hf_decoder, kind):
    """Every mask token, not only the selected one: HF's 3 sorted multimask outputs are our
    tokens 1..3 in descending-score order, each plus the HQ mask."""
    prompt = make_prompt(kind, tiny.model)
    masks, iou = run_ours(tiny, prompt, all_tokens=True)
    hf_masks, _ = run_hf(tiny, prompt, multimask=True, hq_token_only=False)
    order = iou[:, 1:4].argsort(dim=1, descending=True)
    sam_sorted = masks[:, 1:4].gather(1, order[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))
    assert_close_scaled(sam_sorted + masks[:, 4:5], hf_masks, MASK_REL_TOL)


def test_unfixed_hf_masks_differ(tiny):
    """Why the fix is needed: HF as shipped gives the same IoU scores but different mask logits,
    off by a large fraction of the logit scale, not by rounding."""
    assert modeling_sam_hq.SamHQMaskDecoder.forward.__code__.co_filename == modeling_sam_hq.__file__  # not patched
    prompt = make_prompt("box+points", tiny.model)
    masks, iou = run_ours(tiny, prompt, multimask=False, hq_token_only=False)
    hf_masks, hf_iou = run_hf(tiny, prompt, multimask=False, hq_token_only=False)
    assert_iou_close(iou, hf_iou)
    error = ((masks - hf_masks).abs().max() / masks.abs().max()).item()
    assert error > 0.1, f"HF's unfixed masks agree with ours (max error {error:.2e} of the scale): was HF's decoder fixed upstream?"


# ---------------------------------------------------------------------------------------------
# vit_b: the real architecture (64x64 grid, 256x256 masks, 12 heads, vit_dim 768) through the
# decoder, reusing the fixture's encoder outputs. One case (each costs seconds at this size):
# mask input + points with all labels, multimask selection, SAM + HQ sum.


@pytest.mark.slow
def test_vit_b_iou_and_masks_match_fixed_hf(vit_b, fixed_hf_decoder):
    check_masks(vit_b, "mask+points", multimask=True, hq_token_only=False)
