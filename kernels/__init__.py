"""Triton kernels for samhq-fast, installed as ``samhq_fast.kernels``.

One module per kernel family: ``attention`` (flash attention with SAM's decomposed rel-pos bias,
windowed and global) and ``fused_linear`` (GEMM with bias / exact GELU / residual epilogues).
On the CPU they run only in the Triton interpreter (TRITON_INTERPRET=1, set before import).
"""

import os

import torch


def interpreting(x: torch.Tensor, who: str) -> bool:
    """True when the kernels run in the Triton interpreter; raises for a CPU tensor without it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if x.device.type != "cuda":
        raise RuntimeError(
            f"{who}: Triton kernels need a CUDA device, or TRITON_INTERPRET=1 (set before "
            "samhq_fast.kernels is imported) to run them on the CPU with the Triton interpreter"
        )
    return False
