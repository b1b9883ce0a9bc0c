"""Triton kernels for samhq-fast, installed as ``samhq_fast.kernels``.

One module per kernel family: ``attention`` (flash attention with SAM's decomposed rel-pos bias,
windowed and global), ``fused_linear`` (GEMM with bias / exact GELU / residual epilogues),
``layer_norm`` (the blocks' LayerNorms, a row per tile) and ``conv3x3`` (the HQ decoder's 3x3
convolutions with LayerNorm / GELU / dot epilogues).
On the CPU they run only in the Triton interpreter (TRITON_INTERPRET=1, set before import).
"""

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from samhq_fast.switches import triton_interpreter_on


INTERPRETER_BF16_ERROR = (
    "bfloat16 cannot run in the Triton interpreter: its tl.dot returns garbage for bf16 operands "
    "(triton-lang/triton#11584); use float32 or float16 there, bfloat16 on a CUDA device"
)


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why this Triton's interpreter cannot run the kernels with this NumPy, or None.

    Before Triton 3.7 the interpreter passes scalar kernel arguments as 1-element arrays and turns
    them into loop bounds with int(), which NumPy >= 2.4 refuses (a TypeError deep in the interpreter).
    """
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} cannot run with numpy {numpy_version} "
                "(fixed in triton 3.7): pip install 'triton>=3.7' or 'numpy<2.4'")
    return None


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype` where a config does not name one: fp32 in full
    IEEE precision on the FMA units (the fused fp32 path must match the eager reference to ~1e-4,
    which TF32's 10-bit mantissa would not); for 16-bit operands the setting changes nothing."""
    return "ieee" if dtype == torch.float32 else "tf32"


# The fp32 GEMM and attention candidates' tl.dot input_precision: each operand split into a TF32
# part and a TF32 remainder, three tensor-core products (the remainders' product dropped), fp32
# accumulation. fp32's accuracy at tensor-core rates: the vit_b / vit_h encoders (1024 x 1024,
# random weights) with every linear, rel-pos and attention dot emulated so on the CPU
# (bench/fp32_dot_emulation.py) are 1.2e-6 / 1.8e-6 (max error / max) from fp64, as the fp32 ones
# (1.1e-6 / 1.8e-6); with plain "tf32" (one product) 2.6e-3 / 3.8e-3, never used for fp32.
FP32_PRECISION = "tf32x3"


def interpreter_set_too_late() -> str | None:
    """Why TRITON_INTERPRET=1 cannot take effect in this process, or None.

    Triton builds its own @triton.jit helpers (tl.cdiv ...) compiled or interpreted when it is
    imported, which `import samhq_fast` already did (torch imports Triton): set later, the variable
    leaves the kernels half interpreted, failing deep inside Triton. (Cleared later, the kernels
    stay interpreted: slow, still right.)
    """
    if triton_interpreter_on() and not isinstance(tl.standard.cdiv, InterpretedFunction):
        return "TRITON_INTERPRET=1 was set after Triton was imported: set it before Python starts (TRITON_INTERPRET=1 python ...)"
    return None


def interpreter_problem(dtype: torch.dtype | None = None) -> str | None:
    """Why the kernels cannot run right in this process's Triton mode (with `dtype`, when given), or
    None: a TRITON_INTERPRET=1 set after Triton was imported, bf16 in the interpreter (a wrong
    answer otherwise), an interpreter that cannot run with this NumPy."""
    too_late = interpreter_set_too_late()
    if too_late:
        return too_late
    if triton_interpreter_on():
        if dtype == torch.bfloat16:
            return INTERPRETER_BF16_ERROR
        return interpreter_incompatibility(triton.__version__, np.__version__)
    return None


def interpreting(x: torch.Tensor, who: str) -> bool:
    """True when the kernels run in the Triton interpreter; raises for an `interpreter_problem`
    (TypeError for bf16, RuntimeError otherwise) and for a CPU tensor without the interpreter."""
    problem = interpreter_problem(x.dtype)
    if problem:
        raise (TypeError if problem == INTERPRETER_BF16_ERROR else RuntimeError)(f"{who}: {problem}")
    if triton_interpreter_on():
        return True
    if x.device.type != "cuda":
        raise RuntimeError(
            f"{who}: Triton kernels need a CUDA device, or TRITON_INTERPRET=1 (set before "
            "samhq_fast.kernels is imported) to run them on the CPU with the Triton interpreter"
        )
    return False


def on_device(x: torch.Tensor):
    """A context making x's CUDA device the current one: Triton launches its kernels (and
    triton.testing times them) on the current device, whatever device the tensors are on, so a model
    on cuda:1 would otherwise run its kernels on cuda:0 with cuda:1 pointers."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
