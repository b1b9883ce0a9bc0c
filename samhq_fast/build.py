"""`load` (any checkpoint source -> ready model) and the segment_anything_hq-style registry."""

import os
import warnings
from collections.abc import Callable

import torch

from .checkpoint import (
    CheckpointError, hf_to_original, infer_config, is_hf_layout, known_variant_part, load_state_dict_strict, read_state_dict,
)
from .fused import KILL_SWITCH, apply_fused_backend, fused_available, fused_disabled
from .modeling import SamHQ, SamHQConfig

BACKENDS = ("auto", "eager", "fused")
# Every dtype name `load` accepts (in any case); the first name of each is its short name.
DTYPE_ALIASES = {
    torch.float32: ("fp32", "float32"),
    torch.float16: ("fp16", "float16", "half"),
    torch.bfloat16: ("bf16", "bfloat16"),
}
_DTYPES = {name: dtype for dtype, names in DTYPE_ALIASES.items() for name in names}
DTYPE_NAMES = tuple(_DTYPES)
SHORT_DTYPE_NAMES = tuple(names[0] for names in DTYPE_ALIASES.values())  # fp32, fp16, bf16
DEVICES = "'cpu', 'cuda', 'cuda:N', or 'mps' (Apple GPUs, where torch has MPS)"


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_ALIASES:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)} (any case) or torch.float32/float16/bfloat16, got {dtype!r}")


def dtype_name(dtype: torch.dtype | str | None) -> str:
    """The short name ("fp32", "fp16" or "bf16") of any dtype `load` accepts."""
    return DTYPE_ALIASES[resolve_dtype(dtype)][0]


def resolve_device(device: torch.device | str | None) -> torch.device:
    """cpu, cuda[:N] (when torch sees that GPU) or mps (when torch has MPS; eager only, as the CPU).
    Anything else (meta, xpu, ...) is refused here rather than failing later inside torch."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device.strip().lower() if isinstance(device, str) else device)  # "CPU", "Cuda:1" as --dtype takes "BF16"
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be like {DEVICES}, got {device!r}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but torch sees no CUDA device here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {device} was asked for, but torch sees {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device} was asked for, but this torch has no usable MPS (Apple GPU) device")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported: use {DEVICES}")
    return device


# The dtypes "auto" runs fused on CUDA. The kernels passed the GPU tests on an H200 (2026-11-22), where
# bf16 ran the encoder 1.7-2.8x and one prompt's decoder 3-5x faster than eager (bench/results/).
# fp32 stays eager: there the fused encoder ran at 0.6-0.8x eager's speed.
AUTO_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """"auto" -> fused on CUDA in bf16 / fp16 (AUTO_FUSED_DTYPES) where the kernels can run, else
    eager. "fused" where the kernels cannot run raises, except under the kill switch
    (SAMHQ_FAST_DISABLE_FUSED=1), which means eager. dtype None means the default, float32."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (any case), got {backend!r}")
    backend = backend.lower()
    available, why = fused_available(device, dtype)
    if backend == "auto":
        return "fused" if available and device.type == "cuda" and dtype in AUTO_FUSED_DTYPES else "eager"
    if backend == "fused" and not available:
        if fused_disabled():
            warnings.warn(f"backend='fused' asked for, but {KILL_SWITCH} is set: using the eager reference", stacklevel=3)
            return "eager"
        raise ValueError(f"backend='fused' cannot run here: {why}")
    return backend


def load(
    source: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    backend: str = "auto",
) -> SamHQ:
    """Load a SAM-HQ model in eval mode.

    source: original SAM-HQ .pth (flat state dict), .safetensors in the original or HF
    `SamHQModel` key layout, a folder holding model.safetensors (or a sharded
    model.safetensors.index.json, or pytorch_model.bin; config.json is not read), or a hub id
    (needs huggingface_hub). The architecture is inferred from tensor shapes; `model.variant`
    says which ("vit_b", "vit_l", "vit_h", "vit_tiny" (Light HQ-SAM) or "custom") and `model.config`
    holds the rest.
    Training checkpoints ({"model": state_dict, "optimizer": ...}) and keys under a shared prefix
    ("module." from DDP) are unwrapped; the file format is read from the content, not the name.
    device: default CUDA when available, else CPU; "mps" where torch has it (eager only). Anything
    else (meta, xpu...) raises ValueError. dtype: default float32; any name in DTYPE_NAMES, any case.
    backend (any case): "eager" (the reference), "fused" (Triton kernels in the ViT image encoder,
    a compiled prompt decoder; vit_tiny's TinyViT encoder stays eager; on the CPU only under
    TRITON_INTERPRET=1), or "auto" (fused on CUDA in bf16 / fp16, else eager).
    Raises CheckpointError (a ValueError) listing every missing, unexpected, mis-shaped or
    non-floating-point tensor; then, for a checkpoint that has the right tensors, one naming those
    holding NaN / inf.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    backend = resolve_backend(backend, device, dtype)
    state_dict = read_state_dict(source)
    if is_hf_layout(state_dict):
        state_dict = hf_to_original(state_dict)
    with torch.device("meta"):
        model = SamHQ(infer_config(state_dict))
    load_state_dict_strict(model, state_dict)
    part = known_variant_part(state_dict) if model.variant == "custom" else None
    if part:
        name, missing = part
        warnings.warn(
            f"{source}: loaded as a custom model, but it is {name} with {len(missing)} tensors missing "
            f"(e.g. {', '.join(missing[:3])}): a truncated or partial export? Its outputs are not {name}'s",
            stacklevel=2,
        )
    model.backend = "eager"
    model = model.to(device=device, dtype=dtype).eval()
    _check_finite(model, source, dtype)
    return apply_fused_backend(model) if backend == "fused" else model


def _check_finite(model: SamHQ, source, dtype: torch.dtype) -> None:
    """NaN / inf weights (a corrupt file, or values beyond a half dtype's range) would give NaN masks
    silently. One fp32 sum per tensor on the model's device, read back with a single sync."""
    named = [(k, t) for k, t in model.state_dict().items() if t.is_floating_point() and t.numel()]
    finite = torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for _, t in named])).tolist()
    bad = [k for (k, _), ok in zip(named, finite) if not ok]
    if bad:
        hint = " (or values beyond float16's range: try dtype='fp32' or 'bf16')" if dtype == torch.float16 else ""
        raise CheckpointError(f"{source}: NaN or infinite values in {len(bad)} of {len(named)} tensors{hint}: {', '.join(bad[:8])}"
                              + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))


def build_sam_hq(config: SamHQConfig | str, *, device=None, dtype=None, backend: str = "eager") -> SamHQ:
    """A randomly initialised model of a variant name or config (for tests and benchmarks)."""
    config = SamHQConfig.from_variant(config) if isinstance(config, str) else config
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    backend = resolve_backend(backend, device, dtype)
    model = SamHQ(config)
    model.backend = "eager"
    model = model.to(device=device, dtype=dtype).eval()
    return apply_fused_backend(model) if backend == "fused" else model


def _registry_builder(variant: str):
    def build(checkpoint: str | os.PathLike | None = None) -> SamHQ:
        if checkpoint is None:
            return build_sam_hq(variant, device="cpu")
        model = load(checkpoint, device="cpu", backend="eager")
        if model.variant != variant:
            raise CheckpointError(f"sam_model_registry[{variant!r}] was given a {model.variant} checkpoint: {checkpoint}")
        return model

    return build


# Drop-in for segment_anything_hq.sam_model_registry: builds on the CPU like the original;
# move it with .to(device) or use `load` directly.
class _Registry(dict[str, Callable[..., SamHQ]]):
    def __missing__(self, key):
        raise KeyError(f"no SAM-HQ variant {key!r} in sam_model_registry: choose from {', '.join(self)}")


sam_model_registry = _Registry({name: _registry_builder(name) for name in ("vit_b", "vit_l", "vit_h", "vit_tiny")})
sam_model_registry["default"] = sam_model_registry["vit_h"]
