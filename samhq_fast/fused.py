"""The fused backend: ViT blocks run by the Triton kernels, sharing the eager model's parameters.

`apply_fused_backend(model)` swaps every image-encoder block for a `FusedBlock` that holds the very
same submodules under the same names, so state dicts, checkpoints and the rest of the model are
untouched. Per block (x: [B, H, W, C] channels-last, H = W = 64 at 1024 input):
  qkv  = norm1(x) @ Wqkv^T + b            Triton LayerNorm; GEMM + bias, on the 4,096 real tokens
                                          only (the original runs it on the 70x70 padded grid in
                                          windowed blocks)
  a    = rel_pos_attention(qkv)           Triton: windows, padding, rel-pos bias by index math
  x    = a @ Wproj^T + b + x              Triton GEMM, bias + residual in the epilogue
  h    = gelu(norm2(x) @ W1^T + b1)       Triton LayerNorm; Triton GEMM, bias + exact GELU in the epilogue
  x    = h @ W2^T + b2 + x                Triton GEMM, bias + residual in the epilogue
(Every GEMM is Triton or cuBLAS + torch ops, and every LayerNorm Triton or torch's, whichever the
tuner times faster for its shape on this GPU, with tiles tuned per GPU and shape:
samhq_fast.kernels.autotune.)
The kernels are written for SAM's ViT blocks: Light HQ-SAM's TinyViT encoder (vit_tiny) stays eager
under the fused backend, whose prompt decoder (samhq_fast.decoding) it still uses.
Set SAMHQ_FAST_DISABLE_FUSED=1 to fall back to the eager reference everywhere (kill switch; read
when a model is loaded or `apply_fused_backend` runs: a model already fused stays fused).
"""

import warnings

import torch
from torch import nn

from .modeling import ImageEncoderViT, SamHQ
from .modeling.image_encoder import Block
from .modeling.mask_decoder import MaskDecoderHQ
from .switches import env_flag, triton_interpreter_on

KILL_SWITCH = "SAMHQ_FAST_DISABLE_FUSED"


def fused_disabled() -> bool:
    """The kill switch: SAMHQ_FAST_DISABLE_FUSED set to "1" (or "true", "yes", ...; "0", "false",
    "no", "off" or blank leave the fused backend on)."""
    return env_flag(KILL_SWITCH, default=False)


def fused_available(device: torch.device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether the Triton kernels can run on `device` (in `dtype`, when given), and why not."""
    if fused_disabled():
        return False, f"{KILL_SWITCH} is set"
    try:
        from samhq_fast.kernels import interpreter_problem
    except ImportError:
        return False, "triton is not installed"
    problem = interpreter_problem(dtype)  # refused at load, not at the first forward
    if problem:
        return False, problem
    interpreter = triton_interpreter_on()
    if device.type == "cuda" and not interpreter:
        # Triton supports compute capability 8.0+: below it tl.dot falls back to FMA (no tensor cores,
        # slower than the eager backend's cuBLAS) and ptxas has no bf16 conversions (no bf16 kernel,
        # Triton's or Inductor's, compiles).
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            return False, (f"the Triton kernels need an NVIDIA GPU of compute capability 8.0 or newer (Ampere), but "
                           f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: use backend='eager'")
        return True, ""
    if interpreter and device.type in ("cpu", "cuda"):
        return True, ""
    return False, f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU, slowly), got {device}"


class FusedBlock(nn.Module):
    """A ViT block computed by the Triton kernels; the same function as `Block`."""

    def __init__(self, block: Block):
        super().__init__()
        self.window_size = block.window_size
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.train(block.training)  # a new Module starts in training mode; the block swapped out may be in eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from samhq_fast.kernels.attention import rel_pos_attention
        from samhq_fast.kernels.fused_linear import fused_linear
        from samhq_fast.kernels.layer_norm import layer_norm

        attn, mlp = self.attn, self.mlp
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            # the kernels have no backward: their outputs would carry no autograd history, and a
            # backward pass would silently leave the encoder out (or the part of it being fine-tuned)
            raise RuntimeError(
                "the fused backend is inference-only (its Triton kernels have no backward pass): run the model under "
                "torch.inference_mode() or torch.no_grad() (the predictors do), or load it with backend='eager' to train"
            )
        norm1, norm2 = self.norm1, self.norm2
        qkv = fused_linear(layer_norm(x, norm1.weight, norm1.bias, norm1.eps), attn.qkv.weight, attn.qkv.bias)  # [B, H, W, 3C]
        heads = rel_pos_attention(qkv, attn.qkv.bias, attn.rel_pos_h, attn.rel_pos_w, attn.num_heads, self.window_size)
        x = fused_linear(heads, attn.proj.weight, attn.proj.bias, residual=x)
        hidden = fused_linear(layer_norm(x, norm2.weight, norm2.bias, norm2.eps), mlp.lin1.weight, mlp.lin1.bias, activation="gelu")  # [B, H, W, 4C]
        return fused_linear(hidden, mlp.lin2.weight, mlp.lin2.bias, residual=x)


def apply_fused_backend(model: SamHQ) -> SamHQ:
    """Swap a ViT image encoder's blocks for fused ones in place (idempotent); returns the model.
    A TinyViT encoder (vit_tiny) is left eager: the model is still marked "fused", so that the
    predictor decodes prompts with the fused backend's compiled decoder.
    Under the kill switch the model is returned untouched, with a warning, as `load` does; where the
    kernels cannot run (no CUDA device, bf16 in the interpreter, ...) it raises ValueError."""
    if fused_disabled():
        warnings.warn(f"apply_fused_backend: {KILL_SWITCH} is set: the model stays {model.backend}", stacklevel=2)
        return model
    ok, why = fused_available(model.device, model.dtype)
    if not ok:
        raise ValueError(f"the fused backend cannot run here: {why}")
    if isinstance(model.image_encoder, ImageEncoderViT):
        blocks = model.image_encoder.blocks
        for i, block in enumerate(blocks):
            if isinstance(block, Block):
                blocks[i] = FusedBlock(block)
    model.backend = "fused"
    return model


def triton_conv_taps(decoder: MaskDecoderHQ, packed_weight: torch.Tensor, upscaled_sam: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """The HQ branch's first 3x3 convolution + LayerNorm2d + GELU (`decoder.embedding_maskfeature[:3]`),
    projected by each prompt's tap filters of the folded last convolution (`decoding.folded_hq_masks`),
    as one Triton kernel (kernels/conv3x3.py) that never writes the 64-channel map, called through a
    custom op so that torch.compile keeps it whole.

    packed_weight: the convolution's weight as `kernels.conv3x3.pack_weight` lays it out (output
    channels contiguous, for coalesced weight tiles), packed once by the caller
    (`decoding.PackedWeights`), not per call. upscaled_sam [P, 32, H, W], filters [P, 9, 64] -> [P, 9, H, W].
    """
    import samhq_fast.kernels.conv3x3  # noqa: F401  (importing it registers torch.ops.samhq_fast.conv3x3_*)

    conv, norm, _, _ = decoder.embedding_maskfeature  # conv, LayerNorm2d, GELU, conv
    return torch.ops.samhq_fast.conv3x3_ln_gelu_project(upscaled_sam, packed_weight, conv.bias, norm.weight, norm.bias, norm.eps, filters)
