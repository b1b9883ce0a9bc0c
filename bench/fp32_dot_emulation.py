"""How accurate the fused fp32 encoder's "tf32x3" dots are, emulated on the CPU (no GPU needed).

    python bench/fp32_dot_emulation.py --variant vit_b [--seed 0]

Runs the eager image encoder on one random 1024 x 1024 image with the benchmark's random weights
(`samhq_fast.benchmark.encoder.make_weights`) four ways: in fp64 (the reference), in fp32, and in
fp32 with every matmul of the ViT (the linears, the rel-pos einsums, both attention dots) computed
as Triton's tensor cores compute `tl.dot(..., input_precision=P)` on fp32 operands:
  tf32x3  a = big + small, big = a rounded to TF32 (round to nearest, ties away, as cvt.rna.tf32.f32),
          small = the remainder, which the MMA reads as TF32 (truncated); big.big + big.small + small.big
  tf32    one product of the operands truncated to TF32 (what the MMA reads of an fp32 register)
and prints each output's error (max |error| / max |reference|, and relative L2) against fp64 and
against fp32. Accumulation is fp32 in every case. It measures the arithmetic, not a kernel: the
kernels' own numerics are checked on the GPU by `pytest -m gpu`.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from samhq_fast.benchmark.encoder import build_ours, make_weights
from samhq_fast.modeling import SamHQConfig

_TF32_DROPPED_BITS = 0x1FFF  # fp32 has 23 mantissa bits, TF32 10: the low 13 go


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 values, round to nearest, ties away from zero (PTX cvt.rna.tf32.f32)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~_TF32_DROPPED_BITS).view(torch.float32)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 values by dropping the low mantissa bits (how the MMA reads an fp32 register)."""
    return (x.contiguous().view(torch.int32) & ~_TF32_DROPPED_BITS).view(torch.float32)


def matmul_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_big, b_big = tf32_round(a), tf32_round(b)
    a_small, b_small = tf32_truncate(a - a_big), tf32_truncate(b - b_big)
    return (a_small @ b_big + a_big @ b_small) + a_big @ b_big


def matmul_tf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return tf32_truncate(a) @ tf32_truncate(b)


class EmulatedDots(TorchFunctionMode):
    """Every matmul of the eager ViT (F.linear, the two rel-pos einsums, SDPA's two dots) through `matmul`."""

    def __init__(self, matmul):
        super().__init__()
        self.matmul = matmul

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[:2]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = self.matmul(x, weight.t())
            return out if bias is None else out + bias
        if func is torch.einsum:
            equation, q, table = args  # decomposed_rel_pos_bias: q [B, y, x, c], table [y or x, k, c]
            if equation == "byxc,ykc->byxk":
                return self.matmul(q, table.transpose(1, 2)[None])
            if equation == "byxc,xkc->byxk":
                return self.matmul(q.transpose(1, 2), table.transpose(1, 2)[None]).transpose(1, 2)
            raise NotImplementedError(f"einsum {equation!r}")
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            scores = self.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)) + kwargs["attn_mask"]
            return self.matmul(torch.softmax(scores, dim=-1), v)
        return func(*args, **kwargs)


def errors(got: torch.Tensor, reference: torch.Tensor) -> str:
    diff = got.double() - reference.double()
    return f"max {(diff.abs().max() / reference.abs().max()).item():.2e}, L2 {(diff.norm() / reference.norm()).item():.2e}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config = SamHQConfig.from_variant(args.variant)
    cpu = torch.device("cpu")
    weights = make_weights(config, cpu, torch.float32, args.seed)
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(args.seed))
    names = ("image embedding", "early ViT features", "HQ features")
    with torch.no_grad():
        model = build_ours(config, weights, cpu, torch.float32, "eager")
        fp32 = model.encode_image(image)
        reference = model.double().encode_image(image.double())
        model.float()
        runs = {"fp32": fp32}
        for label, matmul in (("tf32x3", matmul_tf32x3), ("tf32", matmul_tf32)):
            with EmulatedDots(matmul):
                runs[label] = model.encode_image(image)
    print(f"{args.variant}, seed {args.seed}: error against fp64 (and against fp32)")
    for label, outputs in runs.items():
        for name, got, ref, base in zip(names, outputs, reference, fp32):
            versus_fp32 = "" if label == "fp32" else f"   (vs fp32: {errors(got, base)})"
            print(f"  {label:7s} {name:19s} {errors(got, ref)}{versus_fp32}")


if __name__ == "__main__":
    main()
