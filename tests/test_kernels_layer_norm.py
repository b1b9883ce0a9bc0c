"""kernels/layer_norm.py: LayerNorm over the last dim against an fp64 F.layer_norm reference.

CPU tests run the kernel in the Triton interpreter (conftest sets TRITON_INTERPRET=1) in fp32 and
fp16; bf16 and the real widths run compiled in the GPU-marked tests.
"""

import pytest
import torch
import torch.nn.functional as F

from samhq_fast.kernels import layer_norm as layer_norm_module
from samhq_fast.kernels.layer_norm import layer_norm

# (dtype, atol, rtol) against fp64 from the same rounded inputs: fp32 covers the accumulation order,
# 16-bit the final rounding of O(1) outputs.
CPU_DTYPES = [pytest.param(torch.float32, 2e-5, 1e-5, id="fp32"), pytest.param(torch.float16, 1e-2, 1e-2, id="fp16")]
GPU_DTYPES = CPU_DTYPES + [pytest.param(torch.bfloat16, 5e-2, 2e-2, id="bf16")]


def reference(x, weight, bias, eps):
    return F.layer_norm(x.double(), (x.shape[-1],), weight.double(), bias.double(), eps)


def make_inputs(lead, C, dtype, device="cpu", offset=0.0, seed=0):
    """x [*lead, C] with a per-row offset and scale (rows differ in mean and variance), weight, bias [C]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, C, generator=gen) * (0.5 + torch.rand(*lead, 1, generator=gen) * 3) + offset
    weight, bias = 1 + 0.5 * torch.randn(C, generator=gen), 0.5 * torch.randn(C, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, bias))


def assert_matches(out, x, weight, bias, eps, atol, rtol):
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), reference(x, weight, bias, eps), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- interpreter (CPU)


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
@pytest.mark.parametrize("lead, C", [((1,), 80), ((37,), 200), ((2, 3, 5), 33), ((3, 7), 1), ((17,), 160)],
                         ids=["one_row", "rows37_C200", "4d_C33", "C1", "rows17_C160"])
def test_awkward_shapes(lead, C, dtype, atol, rtol):
    """Widths that are not powers of two (padded tile columns must stay out of the statistics), row
    counts that leave the last program part empty, leading dims of any rank, and C = 1 (output = bias)."""
    x, weight, bias = make_inputs(lead, C, dtype)
    assert_matches(layer_norm(x, weight, bias, 1e-6), x, weight, bias, 1e-6, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
def test_strided_inputs(dtype, atol, rtol):
    """A channels-last view of a channels-first tensor (last dim strided: copied), and a slice of
    channels (rows with gaps between them: read in place at their pitch)."""
    x, weight, bias = make_inputs((2, 5, 7), 48, dtype)
    permuted = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)[..., :48]  # same values, other strides
    wide = torch.cat([x, x.flip(-1)], dim=-1)[..., :48]  # [2, 5, 7, 48], row pitch 96
    for view in (x.transpose(-1, -2).contiguous().transpose(-1, -2), permuted, wide):
        assert_matches(layer_norm(view, weight, bias, 1e-6), view, weight, bias, 1e-6, atol, rtol)


def test_statistics_survive_a_large_mean():
    """Rows of mean 1000 and unit spread in fp32: the one-pass E[x^2] - E[x]^2 loses the variance to
    cancellation (E[x^2] ~ 1e6 holds ~0.06 of rounding: outputs off by ~1 here); the two passes over
    the row stay within the rounding of the mean (~3e-4; torch's own fp32 kernel ~1.4e-4)."""
    x, weight, bias = make_inputs((64,), 200, torch.float32, offset=1000.0)
    assert_matches(layer_norm(x, weight, bias, 1e-6), x, weight, bias, 1e-6, 1e-3, 1e-3)


def test_constant_rows_give_the_bias():
    """Zero variance: (x - mean) is exactly 0, eps keeps the scale finite, the output is the bias."""
    x = torch.full((3, 40), 2.5)
    weight, bias = torch.randn(40), torch.randn(40)
    out = layer_norm(x, weight, bias, 1e-6)
    assert torch.equal(out, bias.expand(3, 40))


@pytest.mark.parametrize("config", layer_norm_module.candidate_configs(), ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
def test_every_candidate(config, dtype, atol, rtol):
    """Every config the tuner may pick (rows per program; torch's op) computes the same function at
    a width and row count no tile fits exactly."""
    x, weight, bias = make_inputs((37,), 200, dtype)
    out = layer_norm_module._layer_norm(x, weight, bias, 1e-6, config)
    assert_matches(out, x, weight, bias, 1e-6, atol, rtol)


def test_rows_wider_than_a_tile_take_torchs_kernel(monkeypatch):
    """Past MAX_TILED_ROW a whole row no longer fits a tile's registers: torch's kernel runs it."""
    monkeypatch.setattr(layer_norm_module, "MAX_TILED_ROW", 64)
    launched = []
    monkeypatch.setattr(layer_norm_module, "_layer_norm_kernel", type("Recorder", (), {"__getitem__": lambda self, grid: lambda *args, **kwargs: launched.append(args)})())
    x, weight, bias = make_inputs((5,), 65, torch.float32)
    assert_matches(layer_norm(x, weight, bias, 1e-5), x, weight, bias, 1e-5, 2e-5, 1e-5)
    assert not launched


def test_empty_batch():
    x = torch.zeros(0, 4, 4, 32)
    out = layer_norm(x, torch.ones(32), torch.zeros(32), 1e-6)
    assert out.shape == x.shape


@pytest.mark.parametrize(
    "x, weight, bias, eps, error, match",
    [
        (torch.zeros(4, 8), torch.ones(7), torch.zeros(8), 1e-6, ValueError, r"weight must have shape \(8,\)"),
        (torch.zeros(4, 8), torch.ones(8), torch.zeros(8, 1), 1e-6, ValueError, r"bias must have shape \(8,\)"),
        (torch.zeros(4, 8), torch.ones(8, dtype=torch.float16), torch.zeros(8), 1e-6, ValueError, "weight is torch.float16"),
        (torch.zeros(4, 8, dtype=torch.int32), torch.ones(8), torch.zeros(8), 1e-6, TypeError, "dtype torch.int32"),
        (torch.zeros(4, 0), torch.ones(0), torch.zeros(0), 1e-6, ValueError, "C >= 1"),
        (torch.zeros(4, 8), torch.ones(8), torch.zeros(8), 0.0, ValueError, "eps must be a positive"),
        (torch.zeros(4, 8), [1.0] * 8, torch.zeros(8), 1e-6, TypeError, "weight must be a torch.Tensor"),
    ],
    ids=["weight_shape", "bias_shape", "weight_dtype", "int_x", "zero_width", "eps_zero", "weight_list"],
)
def test_bad_input_is_named(x, weight, bias, eps, error, match):
    with pytest.raises(error, match=match):
        layer_norm(x, weight, bias, eps)


# --------------------------------------------------------------------------- GPU (compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES)
@pytest.mark.parametrize("C", [768, 1280, 10000], ids=["vit_b", "vit_h", "wider_than_a_tile"])
def test_real_widths_gpu(C, dtype, atol, rtol):
    """Every candidate at the ViT widths (8 images' worth of rows at vit_b / vit_h), plus one width
    past MAX_TILED_ROW through the launcher."""
    x, weight, bias = make_inputs((8 * 4096,) if C < 10000 else (33,), C, dtype, device="cuda")
    if C > layer_norm_module.MAX_TILED_ROW:
        assert_matches(layer_norm(x, weight, bias, 1e-6), x, weight, bias, 1e-6, atol, rtol)
        return
    for config in layer_norm_module.candidate_configs():
        out = layer_norm_module._layer_norm(x, weight, bias, 1e-6, config)
        assert_matches(out, x, weight, bias, 1e-6, atol, rtol)
