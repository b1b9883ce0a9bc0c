"""kernels/fused_linear.py: act(x @ W.T + b) [+ residual] against an fp64 PyTorch reference.

CPU tests run the kernel in the Triton interpreter (conftest sets TRITON_INTERPRET=1) in fp32 and
fp16 only: the interpreter's tl.dot on bf16 returns garbage (triton issue 11584), so bf16 is
checked in the GPU-marked tests (conftest skips them without a CUDA device and TRITON_INTERPRET=0):
``TRITON_INTERPRET=0 python -m pytest -m gpu``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from samhq_fast import kernels
from samhq_fast.kernels import fused_linear as fused_linear_module
from samhq_fast.kernels.fused_linear import FusedLinear, fused_linear

# (dtype, atol, rtol). The reference is fp64 computed from the same (rounded) inputs, so the
# tolerance only covers the kernel's fp32 accumulation order and the final rounding to dtype.
CPU_DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-2, 1e-2, id="fp16"),
]
GPU_DTYPES = CPU_DTYPES + [pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16")]

# (M, K, N, activation, residual, bias): every M in {1, 37, 200}, K in {33, 80, 160} and
# N in {48, 100, 240} appears; none is a multiple of the 64x64x32 interpreter tiles except
# K=160 (so both the K-tail and the exact-fit K loop run), M=1 is a single partial block.
CASES = [
    (1, 33, 48, "none", False, True),
    (37, 80, 100, "gelu", False, True),
    (200, 160, 240, "none", True, True),
    (37, 33, 240, "gelu", True, True),
    (200, 80, 48, "gelu", False, False),
    (1, 160, 100, "none", True, False),
    (37, 160, 48, "none", False, True),
    (200, 33, 100, "gelu", True, True),
]



def reference(x, weight, bias=None, activation="none", residual=None):
    """fp64 eager reference: act(x @ W.T + b) + residual, returned in fp64."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    if activation == "gelu":
        out = F.gelu(out)  # exact erf GELU, as nn.GELU()
    if residual is not None:
        out = out + residual.double()
    return out


def make_inputs(lead, K, N, dtype, device="cpu", bias=True, residual=False, seed=0):
    """x [*lead, K], weight [N, K] at fan-in scale (outputs are O(1)), bias [N], residual [*lead, N]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=gen)
    w = torch.randn(N, K, generator=gen) / math.sqrt(K)
    b = torch.randn(N, generator=gen) * 0.5 if bias else None
    r = torch.randn(*lead, N, generator=gen) if residual else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(x), to(w), to(b), to(r)


def assert_matches(out, ref, dtype, atol, rtol):
    assert out.dtype == dtype
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- interpreter (CPU)


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
@pytest.mark.parametrize("M, K, N, activation, has_residual, has_bias", CASES)
def test_awkward_shapes(M, K, N, activation, has_residual, has_bias, dtype, atol, rtol):
    x, w, b, r = make_inputs((M,), K, N, dtype, bias=has_bias, residual=has_residual)
    out = fused_linear(x, w, b, activation=activation, residual=r)
    assert_matches(out, reference(x, w, b, activation, r), dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
def test_channels_last_4d(dtype, atol, rtol):
    # [B, H, W, C] tokens as in the ViT blocks: leading dims are flattened to M = 105 rows.
    x, w, b, r = make_inputs((3, 5, 7), 80, 100, dtype, residual=True)
    out = fused_linear(x, w, b, activation="gelu", residual=r)
    assert out.shape == (3, 5, 7, 100)
    assert_matches(out, reference(x, w, b, "gelu", r), dtype, atol, rtol)


def test_non_contiguous_inputs():
    # x: NCHW storage permuted to channels-last (stride along C != 1); weight: a transposed
    # [K, N] buffer; bias and residual: strided slices. The launcher copies x and the bias, the
    # kernel takes the other strides as they are.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 80, 6, 7, generator=gen).permute(0, 2, 3, 1)  # [2, 6, 7, 80]
    w = (torch.randn(80, 48, generator=gen) / math.sqrt(80)).T  # [48, 80], stride (1, 48)
    b = torch.randn(96, generator=gen)[::2]  # stride 2: e.g. a checkpoint's view, loaded with assign=True
    r = torch.randn(2, 6, 7, 96, generator=gen)[..., ::2]  # [2, 6, 7, 48], stride 2 along N
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous() or r.is_contiguous())
    out = fused_linear(x, w, b, activation="gelu", residual=r)
    assert_matches(out, reference(x, w, b, "gelu", r), torch.float32, 1e-5, 1e-5)


class _LaunchSpy:
    """Wraps a @triton.jit kernel: records each launch's grid, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


# The persistent TMA kernel's own tile in the interpreter: 200 x 240 outputs are 16 tiles of 64 x 64,
# which its 3 interpreter programs loop over (fused_linear._persistent_programs); K = 80 ends in a
# half-filled K tile the TMA zero-fills, and the M and N edges in partial tiles.
TMA_TILE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2, TMA=True)


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
def test_tma_kernel_loops_over_tiles(dtype, atol, rtol, monkeypatch):
    tma_spy = _LaunchSpy(fused_linear_module._fused_linear_tma_kernel)
    monkeypatch.setattr(fused_linear_module, "_fused_linear_tma_kernel", tma_spy)
    x, w, b, r = make_inputs((200,), 80, 240, dtype, residual=True)
    out = fused_linear_module._linear(x, w, b, r, "gelu", TMA_TILE)
    assert tma_spy.grids == [(3,)]
    assert_matches(out, reference(x, w, b, "gelu", r), dtype, atol, rtol)


def test_tma_config_on_operands_the_tma_cannot_read_runs_the_pointer_kernel(monkeypatch):
    # x starts 4 bytes past an aligned address, and the weight's rows are 33 fp32 = 132 bytes apart:
    # neither is a TMA operand (16-byte aligned base and row pitch), so the same tile runs through
    # the pointer kernel, with the same result.
    tma_spy = _LaunchSpy(fused_linear_module._fused_linear_tma_kernel)
    pointer_spy = _LaunchSpy(fused_linear_module._fused_linear_kernel)
    monkeypatch.setattr(fused_linear_module, "_fused_linear_tma_kernel", tma_spy)
    monkeypatch.setattr(fused_linear_module, "_fused_linear_kernel", pointer_spy)
    for k, offset in ((80, 1), (33, 0)):
        x, w, b, _ = make_inputs((37,), k, 100, torch.float32)
        x = torch.cat([torch.zeros(offset), x.flatten()])[offset:].view(37, k)  # same values, shifted storage
        out = fused_linear_module._linear(x, w, b, None, "gelu", TMA_TILE)
        assert_matches(out, reference(x, w, b, "gelu"), torch.float32, 1e-5, 1e-5)
    assert tma_spy.grids == [] and len(pointer_spy.grids) == 2


def test_empty_rows():
    w = torch.randn(48, 33)
    assert fused_linear(torch.randn(0, 33), w).shape == (0, 48)
    assert fused_linear(torch.randn(2, 0, 33), w, torch.randn(48), "gelu").shape == (2, 0, 48)


def test_module_wrapper_matches_nn_linear():
    torch.manual_seed(0)
    ref = torch.nn.Linear(80, 100)
    mod = FusedLinear(80, 100, activation="gelu")
    mod.load_state_dict(ref.state_dict())  # same parameters, same state_dict keys
    x, r = torch.randn(4, 9, 80), torch.randn(4, 9, 100)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), F.gelu(ref(x)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mod(x, residual=r), F.gelu(ref(x)) + r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight=torch.randn(48, 32)), ValueError, "weight"),  # K mismatch
        (dict(weight=torch.randn(48)), ValueError, "weight"),  # not 2-D
        (dict(bias=torch.randn(47)), ValueError, "bias"),
        (dict(residual=torch.randn(5, 47)), ValueError, "residual"),
        (dict(weight=torch.randn(48, 33, dtype=torch.float16)), TypeError, "weight.*dtype"),
        (dict(bias=torch.randn(48, dtype=torch.float64)), TypeError, "bias.*dtype"),
        (dict(residual=torch.randn(5, 48, dtype=torch.float16)), TypeError, "residual.*dtype"),
        (dict(x=torch.randn(5, 33).double(), weight=torch.randn(48, 33).double()), TypeError, "x.*dtype"),
        (dict(x=[[1.0] * 33]), TypeError, "x must be a torch.Tensor"),
        (dict(bias=[0.0] * 48), TypeError, "bias must be a torch.Tensor"),
        (dict(activation="relu"), ValueError, "activation"),
        (dict(activation="gelu_tanh"), ValueError, "activation"),
    ],
)
def test_argument_errors(kwargs, error, match):
    args = dict(x=torch.randn(5, 33), weight=torch.randn(48, 33), bias=torch.randn(48), activation="none")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fused_linear(**args)


def test_module_rejects_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        FusedLinear(8, 8, activation="silu")


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA device.*TRITON_INTERPRET=1"):
        fused_linear(torch.randn(5, 33), torch.randn(48, 33))


def test_interpreter_incompatible_with_numpy_is_a_clear_error(monkeypatch):
    """Triton < 3.7's interpreter fails deep inside with NumPy >= 2.4 (seen with triton 3.6.0)."""
    assert kernels.interpreter_incompatibility("3.6.0", "2.4.6") and kernels.interpreter_incompatibility("2.3.1", "2.5.0rc1")
    assert not kernels.interpreter_incompatibility("3.7.1", "2.4.6") and not kernels.interpreter_incompatibility("3.6.0", "2.3.5")
    monkeypatch.setattr(kernels.triton, "__version__", "3.6.0")
    monkeypatch.setattr(kernels.np, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match="fused_linear: the Triton interpreter of triton 3.6.0 cannot run with numpy 2.4.6"):
        fused_linear(torch.randn(5, 33), torch.randn(48, 33))


def test_bf16_in_the_interpreter_is_a_clear_error():
    with pytest.raises(TypeError, match="fused_linear: bfloat16 cannot run in the Triton interpreter"):
        fused_linear(torch.randn(5, 33, dtype=torch.bfloat16), torch.randn(48, 33, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- GPU (compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES)
@pytest.mark.parametrize("M, K, N, activation, has_residual, has_bias", CASES)
def test_awkward_shapes_gpu(M, K, N, activation, has_residual, has_bias, dtype, atol, rtol):
    x, w, b, r = make_inputs((M,), K, N, dtype, "cuda", bias=has_bias, residual=has_residual)
    out = fused_linear(x, w, b, activation=activation, residual=r)
    assert_matches(out, reference(x, w, b, activation, r), dtype, atol, rtol)


# Relative L2 error bounds at real size: fp32 is exact-fp32 ("ieee") accumulation; 16-bit is
# dominated by rounding the output (fp16 2^-11, bf16 2^-8 relative).
REL_L2 = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "K, N, activation, has_residual",
    [(1280, 3840, "none", False), (1280, 1280, "none", True), (1280, 5120, "gelu", False), (5120, 1280, "none", True)],
    ids=["qkv", "proj_residual", "lin1_gelu", "lin2_residual"],  # every linear of a vit_h block
)
def test_vit_h_block_linear_sizes_gpu(K, N, activation, has_residual, dtype):
    # 8 images x 64x64 tokens, channels-last [8, 64, 64, C].
    x, w, b, r = make_inputs((8, 64, 64), K, N, dtype, "cuda", residual=has_residual)
    out = fused_linear(x, w, b, activation=activation, residual=r)
    ref = reference(x, w, b, activation, r)
    assert out.dtype == dtype and out.shape == ref.shape
    rel_l2 = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel_l2 < REL_L2[dtype], rel_l2
    atol = rtol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
