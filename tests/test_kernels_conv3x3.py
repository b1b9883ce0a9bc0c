"""kernels/conv3x3.py: 3x3 convolutions with fused epilogues against an fp64 reference built from the
model's own modules (nn.Conv2d, LayerNorm2d, nn.GELU) and a plain einsum for the per-image projection.

CPU tests run the kernel in the Triton interpreter (conftest sets TRITON_INTERPRET=1) in fp32 and
fp16 at small odd shapes; bf16 and the decoder's real shapes run compiled in the GPU-marked tests.
"""

import pytest
import torch
from torch import nn

from samhq_fast.kernels import conv3x3 as conv3x3_module
from samhq_fast.kernels.conv3x3 import conv3x3_ln_gelu, conv3x3_ln_gelu_project, pack_weight
from samhq_fast.modeling.common import LayerNorm2d

# (dtype, atol, rtol) against fp64 from the same rounded inputs: fp32 covers the accumulation order
# over K = 9 * C_in products, 16-bit the roundings of the map and of the output (outputs are O(1)
# after the LayerNorm; the projections are scaled by their largest value).
CPU_DTYPES = [pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"), pytest.param(torch.float16, 2e-2, 1e-2, id="fp16")]
GPU_DTYPES = CPU_DTYPES + [pytest.param(torch.bfloat16, 1e-1, 2e-2, id="bf16")]
EPS = 1e-6  # LayerNorm2d's
SMALL_TILES = conv3x3_module._config(16, 16, 4, 1)  # tiles that end mid-row and split C_in in steps


def make_conv(B, C_in, C_out, H, W, dtype, device="cpu", seed=0):
    """(x [B, C_in, H, W], weight [C_out, C_in, 3, 3], bias, norm_weight, norm_bias [C_out]), scaled
    so the conv outputs are O(1) whatever C_in is."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C_in, H, W, generator=gen)
    weight = torch.randn(C_out, C_in, 3, 3, generator=gen) / (3 * C_in**0.5)
    bias, norm_weight, norm_bias = 0.3 * torch.randn(C_out, generator=gen), 1 + 0.3 * torch.randn(C_out, generator=gen), 0.3 * torch.randn(C_out, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, bias, norm_weight, norm_bias))


def conv_reference(x, weight, bias) -> torch.Tensor:
    conv = nn.Conv2d(x.shape[1], weight.shape[0], 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(weight), conv.bias.copy_(bias)
        return conv(x.double().cpu())


def ln_gelu_reference(x, weight, bias, norm_weight, norm_bias) -> torch.Tensor:
    norm = LayerNorm2d(weight.shape[0], EPS).double()
    with torch.no_grad():
        norm.weight.copy_(norm_weight), norm.bias.copy_(norm_bias)
        return nn.GELU()(norm(conv_reference(x, weight, bias)))


def project_reference(x, weight, bias, norm_weight, norm_bias, projection) -> torch.Tensor:
    return torch.einsum("btc,bchw->bthw", projection.double().cpu(), ln_gelu_reference(x, weight, bias, norm_weight, norm_bias))


def make_projection(B, T, C_out, dtype, device="cpu", seed=1) -> torch.Tensor:
    """[B, T, C_out], a strided view (every other channel of a wider tensor, as the decoder's filters
    come out of an einsum in whatever layout)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 2 * C_out, generator=gen).to(device=device, dtype=dtype)[..., ::2]


def assert_close(out, expected, atol, rtol):
    torch.testing.assert_close(out.double().cpu(), expected, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- interpreter (CPU)


SHAPES = [(1, 5, 12, 7, 9), (3, 33, 20, 5, 11), (2, 32, 64, 6, 13)]  # (B, C_in, C_out, H, W)
SHAPE_IDS = ["one_image_C5to12", "C33to20", "decoder_channels"]


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
@pytest.mark.parametrize("B, C_in, C_out, H, W", SHAPES, ids=SHAPE_IDS)
def test_ln_gelu_awkward_shapes(B, C_in, C_out, H, W, dtype, atol, rtol):
    """Channel counts that are not powers of two (padded output columns must stay out of the
    LayerNorm), C_in not a multiple of the channel step, images not a multiple of the tile, tiles
    ending mid-row (the taps' zero padding by index math), with the launcher's tile and small ones."""
    x, weight, bias, norm_weight, norm_bias = make_conv(B, C_in, C_out, H, W, dtype)
    expected = ln_gelu_reference(x, weight, bias, norm_weight, norm_bias)
    out = conv3x3_ln_gelu(x, weight, bias, norm_weight, norm_bias, EPS)
    assert out.shape == (B, C_out, H, W) and out.dtype == dtype
    assert out.permute(0, 2, 3, 1).is_contiguous()  # channels-last, as documented
    assert_close(out, expected, atol, rtol)
    small = conv3x3_module._conv3x3(x, weight, bias, norm_weight, norm_bias, EPS, None, SMALL_TILES)
    assert_close(small, expected, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
@pytest.mark.parametrize("B, C_in, C_out, H, W", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("T", [1, 9, 16])
def test_project_awkward_shapes(B, C_in, C_out, H, W, T, dtype, atol, rtol):
    """The projected epilogue: one row, the decoder's 9 tap filters, the most rows a launch takes
    (padded projection rows and output channels must stay out of the sums), a strided projection."""
    x, weight, bias, norm_weight, norm_bias = make_conv(B, C_in, C_out, H, W, dtype)
    projection = make_projection(B, T, C_out, dtype)
    expected = project_reference(x, weight, bias, norm_weight, norm_bias, projection)
    scale = expected.abs().max().item()
    out = conv3x3_ln_gelu_project(x, weight, bias, norm_weight, norm_bias, EPS, projection)
    assert out.shape == (B, T, H, W) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, expected, atol * scale, rtol)
    small = conv3x3_module._conv3x3(x, weight, bias, norm_weight, norm_bias, EPS, projection, SMALL_TILES)
    assert_close(small, expected, atol * scale, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
def test_any_input_and_weight_layout(dtype, atol, rtol):
    """Channels-last and channels-first inputs, nn.Conv2d's weight layout and `pack_weight`'s (same
    values, other strides), a transposed projection: all read through their strides."""
    x, weight, bias, norm_weight, norm_bias = make_conv(2, 12, 20, 9, 7, dtype)
    expected = ln_gelu_reference(x, weight, bias, norm_weight, norm_bias)
    packed = pack_weight(weight)
    assert torch.equal(packed, weight) and packed.stride(0) == 1
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for xs in (x, channels_last):
        for w in (weight, packed):
            assert_close(conv3x3_ln_gelu(xs, w, bias, norm_weight, norm_bias, EPS), expected, atol, rtol)
    projection = torch.randn(2, 20, 9).to(dtype).transpose(1, 2)  # [2, 9, 20], channels at stride 9
    expected = project_reference(x, weight, bias, norm_weight, norm_bias, projection)
    got = conv3x3_ln_gelu_project(channels_last, packed, bias, norm_weight, norm_bias, EPS, projection)
    assert_close(got, expected, atol * expected.abs().max().item(), rtol)


def test_constant_outputs_normalize_to_the_bias():
    """A zero weight: every output channel of a pixel is its bias, which the LayerNorm maps to
    exactly norm_bias (zero variance), then GELU."""
    x, weight, bias, norm_weight, norm_bias = make_conv(1, 6, 10, 5, 5, torch.float32)
    bias = torch.full_like(bias, 0.7)
    out = conv3x3_ln_gelu(x, torch.zeros_like(weight), bias, norm_weight, norm_bias, EPS)
    torch.testing.assert_close(out, nn.GELU()(norm_bias)[None, :, None, None].expand_as(out), atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", conv3x3_module.candidate_configs(torch.float32) + conv3x3_module.candidate_configs(torch.float16), ids=str)
def test_every_candidate(config):
    """Every config the tuner may pick (tiles of 32 to 256 pixels; torch's conv) computes the same
    functions, both epilogues, at an image no tile fits exactly."""
    x, weight, bias, norm_weight, norm_bias = make_conv(2, 33, 20, 9, 17, torch.float32)
    projection = make_projection(2, 9, 20, torch.float32)
    out = conv3x3_module._conv3x3(x, weight, bias, norm_weight, norm_bias, EPS, None, config)
    assert out.permute(0, 2, 3, 1).is_contiguous()  # the torch candidate too: the custom op's declared layout
    assert_close(out, ln_gelu_reference(x, weight, bias, norm_weight, norm_bias), 1e-4, 1e-4)
    expected = project_reference(x, weight, bias, norm_weight, norm_bias, projection)
    out = conv3x3_module._conv3x3(x, weight, bias, norm_weight, norm_bias, EPS, projection, config)
    assert out.shape == (2, 9, 9, 17) and out.is_contiguous()
    assert_close(out, expected, 1e-4 * expected.abs().max().item(), 1e-4)


def test_custom_ops_declare_what_they_return():
    """torch.compile plans around the custom ops' fake outputs (shape, dtype, strides): opcheck runs
    each op and its fake and compares them, and checks the schema (no input mutated)."""
    x, weight, bias, norm_weight, norm_bias = make_conv(2, 6, 10, 5, 7, torch.float32)
    opcheck_tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.samhq_fast.conv3x3_ln_gelu, (x, pack_weight(weight), bias, norm_weight, norm_bias, EPS), test_utils=opcheck_tests)
    torch.library.opcheck(torch.ops.samhq_fast.conv3x3_ln_gelu_project, (x, weight, bias, norm_weight, norm_bias, EPS, make_projection(2, 9, 10, torch.float32)),
                          test_utils=opcheck_tests)


def test_compiled_with_the_custom_ops():
    """torch.compile(fullgraph=True) traces through both ops (no graph break), with the weight packing
    and the ops' inputs computed in the graph, to the same results."""
    x, weight, bias, norm_weight, norm_bias = make_conv(2, 6, 10, 5, 7, torch.float32)
    projection = make_projection(2, 9, 10, torch.float32)

    def branch(x):
        args = (x * 2, pack_weight(weight), bias, norm_weight, norm_bias, EPS)
        return torch.ops.samhq_fast.conv3x3_ln_gelu(*args), torch.ops.samhq_fast.conv3x3_ln_gelu_project(*args, projection * 0.5)

    features, projected = torch.compile(branch, fullgraph=True, backend="inductor")(x)
    assert_close(features, ln_gelu_reference(x * 2, weight, bias, norm_weight, norm_bias), 1e-4, 1e-4)
    expected = project_reference(x * 2, weight, bias, norm_weight, norm_bias, projection * 0.5)
    assert_close(projected, expected, 1e-4 * expected.abs().max().item(), 1e-4)


def test_empty_batch():
    """No prompts (or an empty image): empty outputs of the documented shapes and layout."""
    x, weight, bias, norm_weight, norm_bias = make_conv(0, 6, 10, 5, 7, torch.float32)
    out = conv3x3_ln_gelu(x, weight, bias, norm_weight, norm_bias, EPS)
    assert out.shape == (0, 10, 5, 7) and out.permute(0, 2, 3, 1).is_contiguous()
    assert conv3x3_ln_gelu_project(x, weight, bias, norm_weight, norm_bias, EPS, torch.zeros(0, 9, 10)).shape == (0, 9, 5, 7)
    assert conv3x3_ln_gelu(torch.zeros(2, 6, 0, 7), weight, bias, norm_weight, norm_bias, EPS).shape == (2, 10, 0, 7)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w, b, n: conv3x3_ln_gelu(x[0], w, b, n, n, EPS), ValueError, r"x must be \[B, C_in, H, W\]"),
        (lambda x, w, b, n: conv3x3_ln_gelu(x, w[:, :5], b, n, n, EPS), ValueError, r"weight must be \[C_out, 6, 3, 3\]"),
        (lambda x, w, b, n: conv3x3_ln_gelu(x, w[..., :2], b, n, n, EPS), ValueError, r"weight must be \[C_out, 6, 3, 3\]"),
        (lambda x, w, b, n: conv3x3_ln_gelu(x, w, b[:9], n, n, EPS), ValueError, r"bias must have shape \[10\]"),
        (lambda x, w, b, n: conv3x3_ln_gelu(x, w, b, n.half(), n, EPS), ValueError, "norm_weight is torch.float16"),
        (lambda x, w, b, n: conv3x3_ln_gelu(x.int(), w, b, n, n, EPS), TypeError, "dtype torch.int32"),
        (lambda x, w, b, n: conv3x3_ln_gelu(x, w, b, n, n, 0.0), ValueError, "eps must be a positive"),
        (lambda x, w, b, n: conv3x3_ln_gelu(x, w.tolist(), b, n, n, EPS), TypeError, "weight must be a torch.Tensor"),
        (lambda x, w, b, n: conv3x3_ln_gelu_project(x, w, b, n, n, EPS, torch.zeros(2, 9, 10)), ValueError, r"projection must be \[3, T, 10\]"),
        (lambda x, w, b, n: conv3x3_ln_gelu_project(x, w, b, n, n, EPS, torch.zeros(3, 9, 11)), ValueError, r"projection must be \[3, T, 10\]"),
        (lambda x, w, b, n: conv3x3_ln_gelu_project(x, w, b, n, n, EPS, torch.zeros(3, 17, 10)), ValueError, r"1 <= T <= 16, got \[3, 17, 10\]"),
        (lambda x, w, b, n: conv3x3_ln_gelu_project(x, w, b, n, n, EPS, torch.zeros(3, 0, 10)), ValueError, r"1 <= T <= 16, got \[3, 0, 10\]"),
        (lambda x, w, b, n: conv3x3_ln_gelu_project(x, w, b, n, n, EPS, torch.zeros(3, 9, 10).half()), ValueError, "projection is torch.float16"),
        (lambda x, w, b, n: conv3x3_ln_gelu_project(x, w, b, n, n, EPS, None), TypeError, "projection must be a torch.Tensor"),
        (lambda x, w, b, n: conv3x3_ln_gelu_project(x, w, b, n, n, -1.0, torch.zeros(3, 9, 10)), ValueError, "eps must be a positive"),
    ],
    ids=["x_3d", "weight_channels", "weight_kernel", "bias_shape", "norm_dtype", "int_x", "eps_zero", "weight_list",
         "projection_batch", "projection_channels", "projection_too_many_rows", "projection_no_rows", "projection_dtype",
         "projection_none", "project_eps"],
)
def test_bad_input_is_named(call, error, match):
    x, weight, bias, norm_weight, _ = make_conv(3, 6, 10, 5, 7, torch.float32)
    with pytest.raises(error, match=match):
        call(x, weight, bias, norm_weight)


# --------------------------------------------------------------------------- GPU (compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES)
def test_decoder_shapes_gpu(dtype, atol, rtol, tf32_off):
    """Every candidate at the HQ decoder's shapes (4 prompts, 256 x 256, 32 -> 64 channels, 9 tap
    filters per prompt) in fp32 / fp16 / bf16."""
    x, weight, bias, norm_weight, norm_bias = make_conv(4, 32, 64, 256, 256, dtype, device="cuda")
    features = ln_gelu_reference(x, weight, bias, norm_weight, norm_bias)
    projection = make_projection(4, 9, 64, dtype, device="cuda")
    taps = project_reference(x, weight, bias, norm_weight, norm_bias, projection)
    for config in conv3x3_module.candidate_configs(dtype):
        out = conv3x3_module._conv3x3(x, pack_weight(weight), bias, norm_weight, norm_bias, EPS, None, config)
        assert_close(out, features, atol, rtol)
        out = conv3x3_module._conv3x3(x, pack_weight(weight), bias, norm_weight, norm_bias, EPS, projection, config)
        assert_close(out, taps, atol * taps.abs().max().item(), rtol)
