"""Every tuning candidate of the four kernel families, and the rel-pos pre-pass's fixed config, compiled
offline for Hopper (sm_90) exactly as a real vit_b / vit_h (or HQ decoder) launch specializes it, fits in shared
memory, does not fall off a register cliff and runs its 16-bit dots, and the fp32 GEMM and attention
dots as tf32x3, on Hopper's tensor cores (samhq_fast.benchmark.kernel_resources; no GPU needed, Triton's own cuobjdump reads the cubin).

A candidate over the shared-memory limit could never launch on the GPU (the tuner would only skip
it); spilled registers (stack) usually make a kernel slow. Bounds checked with Triton 3.6 and 3.9.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from samhq_fast.benchmark import kernel_resources
from samhq_fast.kernels import attention, conv3x3, fused_linear, layer_norm
from samhq_fast.modeling.sam_hq import VARIANTS

pytestmark = pytest.mark.skipif(not kernel_resources.available(), reason="Triton's cuobjdump is not installed")


@pytest.fixture(scope="module")
def usage_rows() -> list[dict]:
    # A child process: the kernels must be compiled, and this one runs them in the interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "samhq_fast.benchmark.kernel_resources", "--arch", "90", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_every_candidate_fits_in_shared_memory(usage_rows):
    too_big = [row for row in usage_rows if row["shared_bytes"] > kernel_resources.SHARED_MEMORY_LIMIT[90]]
    assert not too_big
    families = {(row["family"], row["dtype"]) for row in usage_rows}
    assert families == {(f, d) for f in ("attention", "rel_pos_terms", "fused_linear", "layer_norm", "conv3x3") for d in ("bfloat16", "float32")}


def test_no_register_cliffs(usage_rows):
    """Attention (16-bit and fp32), the rel-pos pre-pass, the GEMMs (pointer and TMA kernels; the
    128x256 tiles finish their epilogue in two halves for this), the LayerNorm and the 3x3
    convolutions never spill, except the global-only attention 128x128 tile at vit_h under Triton
    3.6 (24 bytes)."""
    def stack(family):
        return [row["stack_bytes"] for row in usage_rows if row["family"] == family]

    for row in usage_rows:
        if row["family"] == "attention":
            global_128x128 = row["shape"].endswith("global") and (row["config"]["BLOCK_M"], row["config"]["BLOCK_N"]) == (128, 128)
            assert row["stack_bytes"] <= (32 if global_128x128 else 0), row
    for family in ("rel_pos_terms", "fused_linear", "layer_norm", "conv3x3"):
        assert max(stack(family)) == 0, family


def test_dots_use_hoppers_tensor_cores_and_fp32_dots_never_round_to_tf32(usage_rows):
    """Every bf16 config of the kernels with dots compiles them to wgmma (Hopper's warpgroup MMA: an
    Ampere-style mma.sync fallback would leave much of the tensor-core rate unused). An fp32 config
    either names "tf32x3" and then runs wgmma on operands it splits (cvt.rna.tf32: a TF32 part and
    its remainder), or has no wgmma at all ("ieee" dots on the FMA units): no fp32 dot is a single
    TF32 product. The GEMM and attention candidates are the tf32x3 ones."""
    for row in usage_rows:
        tf32x3 = row["config"].get("INPUT_PRECISION", row["config"].get("DOT_PRECISION")) == "tf32x3"
        if row["family"] == "layer_norm":  # no dots
            assert row["wgmma"] == 0 and not tf32x3, row
        elif row["dtype"] == "bfloat16":
            assert row["wgmma"] > 0 and row["tf32_splits"] == 0, row
        elif tf32x3:
            assert row["wgmma"] > 0 and row["tf32_splits"] > 0, row
        else:
            assert row["wgmma"] == 0, row
    fp32_tuned = [row for row in usage_rows if row["dtype"] == "float32" and row["family"] in ("attention", "fused_linear")]
    assert fp32_tuned and all(row["tf32_splits"] > 0 for row in fp32_tuned)


def test_rows_cover_every_candidate_at_both_head_dims(usage_rows):
    """Both head_dims the kernels serve (64: vit_b / vit_l, 80: vit_h), windowed (interior and border
    windows: two kernels) and global, every attention candidate at each; the GEMM candidates at
    vit_h's four block GEMMs; the LayerNorm candidates at vit_b's and vit_h's widths; the 3x3
    convolution candidates at the HQ decoder's two convolutions."""
    assert {VARIANTS[v].head_dim for v in kernel_resources.SHAPE_VARIANTS} == {64, 80}
    shapes = {f"{v} {kind}" for v in kernel_resources.SHAPE_VARIANTS for kind in (f"window{VARIANTS[v].window_size}", "global")}
    attention_shapes = {f"{shape} {part}" for shape in shapes if "window" in shape for part in ("interior", "border")}
    attention_shapes |= {shape for shape in shapes if shape.endswith("global")}
    for dtype in ("bfloat16", "float32"):
        rows = [row for row in usage_rows if row["dtype"] == dtype]
        attention_rows = sorted((row["shape"], json.dumps(row["config"], sort_keys=True)) for row in rows if row["family"] == "attention")
        assert attention_rows == sorted((shape, json.dumps(c, sort_keys=True)) for shape in attention_shapes
                                        for c in attention.candidate_configs(getattr(torch, dtype), global_block=shape.endswith("global")))
        terms = {row["shape"] for row in rows if row["family"] == "rel_pos_terms"}
        assert terms == {f"{shape} {axis}" for shape in shapes for axis in ("rows", "columns")}
        gemms = [c for c in fused_linear.candidate_configs(getattr(torch, dtype)) if "impl" not in c]
        linear_rows = [(row["shape"], row["config"]) for row in rows if row["family"] == "fused_linear"]
        assert sorted(linear_rows, key=str) == sorted(((f"vit_h {g}", c) for g in ("qkv", "proj", "lin1", "lin2") for c in gemms), key=str)
        norms = [c for c in layer_norm.candidate_configs() if c is not layer_norm.TORCH_OP]
        norm_rows = [(row["shape"], row["config"]) for row in rows if row["family"] == "layer_norm"]
        assert sorted(norm_rows, key=str) == sorted(((f"{v} norm", c) for v in kernel_resources.SHAPE_VARIANTS for c in norms), key=str)
        convs = [c for c in conv3x3.candidate_configs(getattr(torch, dtype)) if c is not conv3x3.TORCH_OP]
        conv_rows = [(row["shape"], row["config"]) for row in rows if row["family"] == "conv3x3"]
        assert sorted(conv_rows, key=str) == sorted(((label, c) for label in ("hq conv1 ln_gelu", "hq conv1 ln_gelu_project") for c in convs), key=str)


@pytest.mark.gpu
def test_shared_memory_limit_is_the_gpus():
    """The limit the rows are checked against is what an sm_90 GPU lets one block opt into."""
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor) != (9, 0):
        pytest.skip(f"the table holds sm_90's limit; this GPU is sm_{props.major}{props.minor}")
    assert kernel_resources.SHARED_MEMORY_LIMIT[90] == props.shared_memory_per_block_optin
