"""Reading SAM-HQ checkpoints (original .pth, safetensors in either key layout, HF folders, hub ids),
inferring the architecture from tensor shapes, and strict loading."""

import argparse
import collections
import functools
import importlib
import json
import math
import os
import re
import zipfile
from pathlib import Path

import torch

from .modeling import SamHQ, SamHQConfig, TinyViTConfig, ViTConfig
from .modeling.sam_hq import ALL_VARIANTS
from .modeling.tiny_vit import MERGE_STRIDES


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or does not describe a SAM-HQ model."""


# The prompt encoder's random Fourier basis [2, 128]: kept fp32 when the rest is cast (see PositionEmbeddingRandom).
FOURIER_BASIS_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

# (original prefix, HF SamHQModel prefix); "{}" stands for a block / layer index. First match wins.
_KEY_PREFIXES = [
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.{}.norm1.", "vision_encoder.layers.{}.layer_norm1."),
    ("image_encoder.blocks.{}.norm2.", "vision_encoder.layers.{}.layer_norm2."),
    ("image_encoder.blocks.{}.", "vision_encoder.layers.{}."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("image_encoder.", "vision_encoder."),
    (FOURIER_BASIS_KEY, "shared_image_embedding.positional_embedding"),
    ("prompt_encoder.point_embeddings.", "prompt_encoder.point_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.{}.norm", "mask_decoder.transformer.layers.{}.layer_norm"),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("mask_decoder.hf_token.", "mask_decoder.hq_token."),
    ("mask_decoder.hf_mlp.", "mask_decoder.hq_mask_mlp."),
    ("mask_decoder.compress_vit_feat.0.", "mask_decoder.compress_vit_conv1."),
    ("mask_decoder.compress_vit_feat.1.", "mask_decoder.compress_vit_norm."),
    ("mask_decoder.compress_vit_feat.3.", "mask_decoder.compress_vit_conv2."),
    ("mask_decoder.embedding_encoder.0.", "mask_decoder.encoder_conv1."),
    ("mask_decoder.embedding_encoder.1.", "mask_decoder.encoder_norm."),
    ("mask_decoder.embedding_encoder.3.", "mask_decoder.encoder_conv2."),
    ("mask_decoder.embedding_maskfeature.0.", "mask_decoder.mask_conv1."),
    ("mask_decoder.embedding_maskfeature.1.", "mask_decoder.mask_norm."),
    ("mask_decoder.embedding_maskfeature.3.", "mask_decoder.mask_conv2."),
]
# The 3-layer MLPs (hypernetworks, HQ MLP, IoU head) are `layers.0/1/2` in the original and
# `proj_in`, `layers.0`, `proj_out` in HF.
_MLP_LAYERS = [("layers.0.", "proj_in."), ("layers.1.", "layers.0."), ("layers.2.", "proj_out.")]
_MLP_PREFIX = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|hf_mlp|hq_mask_mlp)\.)(.*)$")
# HF keeps a tied copy of the gaussian matrix inside its prompt encoder.
_HF_TIED_COPY = "prompt_encoder.shared_embedding.positional_embedding"


def _compile(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(r"\{\}", r"(\d+)"))


_TO_HF = [(_compile(a), b) for a, b in _KEY_PREFIXES]
_TO_ORIGINAL = [(_compile(b), a) for a, b in _KEY_PREFIXES]


def _rename(key: str, rules: list[tuple[re.Pattern, str]], mlp_from: int) -> str:
    match = _MLP_PREFIX.match(key)
    if match:
        head, rest = match.groups()
        for pair in _MLP_LAYERS:
            if rest.startswith(pair[mlp_from]):
                rest = pair[1 - mlp_from] + rest[len(pair[mlp_from]) :]
                break
        key = head + rest
    for pattern, template in rules:
        m = pattern.match(key)
        if m:
            return template.format(*m.groups()) + key[m.end() :]
    return key


def is_hf_layout(state_dict: dict) -> bool:
    return any(k.startswith(("vision_encoder.", "shared_image_embedding.")) for k in state_dict)


_TINY_VIT_KEY = "image_encoder.patch_embed.seq.0.c.weight"  # the TinyViT stem's first conv
NO_HF_TINY_VIT = (
    "Light HQ-SAM (vit_tiny, TinyViT image encoder) has no Hugging Face layout: transformers' SamHQModel "
    "has a ViT image encoder only; keep vit_tiny checkpoints in the original layout"
)


def is_tiny_vit(state_dict: dict) -> bool:
    """Whether an original-layout state dict has a TinyViT image encoder (Light HQ-SAM)."""
    return _TINY_VIT_KEY in state_dict


def original_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original SAM-HQ keys -> HF `SamHQModel` keys (both copies of the tied gaussian matrix).
    Raises CheckpointError for a vit_tiny state dict, which HF has no layout for."""
    if is_tiny_vit(state_dict):
        raise CheckpointError(NO_HF_TINY_VIT)
    out = {_rename(k, _TO_HF, mlp_from=0): v for k, v in state_dict.items()}
    gaussian = out.get("shared_image_embedding.positional_embedding")
    if gaussian is not None:
        out[_HF_TIED_COPY] = gaussian.clone()
    return out


def hf_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF `SamHQModel` keys -> original keys; accepts either copy of the tied gaussian matrix."""
    state_dict = dict(state_dict)
    tied = state_dict.pop(_HF_TIED_COPY, None)
    if tied is not None:
        shared = state_dict.setdefault("shared_image_embedding.positional_embedding", tied)
        if not torch.equal(shared, tied):
            raise CheckpointError(f"{_HF_TIED_COPY} and shared_image_embedding.positional_embedding differ")
    original_keys = sorted(k for k in state_dict if k.startswith("image_encoder."))
    if original_keys:
        raise CheckpointError(
            f"checkpoint mixes the HF layout (vision_encoder.*) with the original one ({len(original_keys)} keys such as "
            f"{original_keys[0]}): keep the weights of one layout"
        )
    renamed = {_rename(k, _TO_ORIGINAL, mlp_from=1): k for k in state_dict}
    if len(renamed) < len(state_dict):  # two keys would become one: one tensor would be dropped silently
        clashes = sorted(set(state_dict) - set(renamed.values()))
        raise CheckpointError(f"checkpoint names {len(clashes)} weights twice (HF names mapped to the original's clash), e.g. {clashes[0]}")
    return {new: state_dict[old] for new, old in renamed.items()}


# ---------------------------------------------------------------------------------------------
# Reading files


_TORCH_ZIP, _PICKLE, _SAFETENSORS = "torch zip", "pickle", "safetensors"


def _sniff(path: Path) -> str | None:
    """The file format from its first bytes, whatever its name: torch's zip format (torch >= 1.6),
    a pickle (torch's legacy format), or safetensors (8-byte little-endian header length, then a
    JSON header). None when it is none of these."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return _TORCH_ZIP
    if head[8:9] == b"{":
        return _SAFETENSORS
    if head.startswith(b"\x80"):
        return _PICKLE
    return None


# Torch's weights_only failures invite the reader to load with weights_only=False, which runs any
# code the pickle holds: that advice never reaches the user, only the reason after it.
_WEIGHTS_ONLY_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n\s*Check the documentation|$)", re.S)
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _names_a_real_global(name: str) -> bool:
    """Whether "module.attr..." resolves here (a file cut inside a pickle's GLOBAL opcode names a
    fragment such as torch._utils._rebuild_ten: truncation, not code that could run)."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _torch_load_error(path: Path, e: Exception) -> CheckpointError:
    text = str(e)
    unsafe = _UNSAFE_GLOBAL.search(text)
    detail = _WEIGHTS_ONLY_DETAIL.search(text)
    if unsafe and _names_a_real_global(unsafe.group(1)):
        return CheckpointError(
            f"{path} holds non-tensor Python objects ({unsafe.group(1)}), which could run code when unpickled: "
            "it is not loaded, for safety (samhq-fast reads tensors only). If you trust the file, re-save just its "
            "state dict of tensors with torch.save"
        )
    if unsafe:
        reason = (f"its pickle names {unsafe.group(1)}, which does not exist here (a file cut short inside a record, "
                  "or an object of a package that is not installed)")
    elif detail:
        reason = detail.group(1).strip()
    else:
        sentences = re.split(r"(?<=\.)\s+", text)
        reason = f"{type(e).__name__}: " + " ".join(s for s in sentences if "weights_only" not in s and "trusted source" not in s)
    return CheckpointError(f"could not read checkpoint {path}: {reason} (truncated, corrupt, or not a PyTorch checkpoint of tensors)")


def _foreign_zip(path: Path) -> str | None:
    """Why a zip file is not torch.save's (None when it is, or when it is too damaged to list, which
    torch.load reports): torch.save writes <folder>/data.pkl, torch.jit.save adds code/ and
    constants.pkl (and torch.load would hand the file to torch.jit.load), NumPy's .npz holds .npy."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any("/code/" in name or name.endswith("/constants.pkl") for name in names):
        return ("it is a TorchScript archive (torch.jit.save), not a state dict: in a trusted session, "
                "torch.save(torch.jit.load(path).state_dict(), new_path)")
    if not any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"it is a zip archive without torch.save's data.pkl (it holds {shown or 'nothing'}): not a PyTorch checkpoint"
    return None


def _read_pth(path: Path, fmt: str) -> dict:
    """torch.load, always with weights_only=True."""
    if fmt == _TORCH_ZIP and (problem := _foreign_zip(path)):
        raise CheckpointError(f"could not read checkpoint {path}: {problem}")
    # torch can memory-map only the zip format, and only from a path, which it hands to safetensors
    # when it ends in .safetensors: other files are read whole from an open file.
    mmap = fmt == _TORCH_ZIP and path.suffix != ".safetensors"
    try:
        # Training scripts often store their argparse arguments next to the weights. A Namespace is a
        # plain attribute holder, and what it holds still passes weights_only's own checks.
        with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path if mmap else f, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # pickle / zip / EOF errors from a truncated or foreign file
        raise _torch_load_error(path, e) from None
    obj = _unwrap(obj, path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors (found {type(obj).__name__})")
    if not all(isinstance(k, str) for k in obj):
        keys = [repr(k) for k in obj if not isinstance(k, str)]
        raise CheckpointError(f"{path} does not hold a state dict: its keys must be names (str), got {', '.join(keys[:8])}")
    others = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors: {len(others)} entries are not tensors: {shown}")
    return obj


# Where training checkpoints keep the weights: {"model": state_dict, "optimizer": ..., "epoch": ...}.
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module", "net")


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj, path: Path):
    """The state dict inside (possibly nested) training wrappers: the one entry under a WRAPPER_KEYS
    name that is a dict of tensors (or a wrapper of one); else the one such entry that holds some
    tensors (so the caller's error names its non-tensor entries); `obj` itself when there is none."""
    if not isinstance(obj, dict) or _is_tensor_dict(obj):
        return obj
    inner = {k: _unwrap(obj[k], path) for k in WRAPPER_KEYS if k in obj}
    found = [k for k, v in inner.items() if _is_tensor_dict(v)]
    if len(found) > 1:
        raise CheckpointError(f"{path} holds several state dicts ({', '.join(map(repr, found))}): cannot tell which is the model")
    if not found:
        found = [k for k, v in inner.items() if isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())]
    return inner[found[0]] if len(found) == 1 else obj


_SAM_PREFIXES = ("image_encoder.", "vision_encoder.", "prompt_encoder.", "mask_decoder.")


def _strip_shared_prefix(state_dict: dict) -> dict:
    """Drop a prefix that every key shares ("module." from DDP, "model.", ...) when what is left
    are SAM-HQ keys (original or HF layout)."""
    keys = list(state_dict)
    if not keys or any(k.startswith(_SAM_PREFIXES) for k in keys):
        return state_dict
    parts = keys[0].split(".")
    for n in range(1, len(parts)):
        prefix = ".".join(parts[:n]) + "."
        if not all(k.startswith(prefix) for k in keys):
            break
        if any(k[len(prefix) :].startswith(_SAM_PREFIXES) for k in keys):
            return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)  # memory-mapped
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"could not read safetensors file {path}: {e} (truncated or corrupt?)") from e


def _read_file(path: Path) -> dict:
    """A .pth / .bin / .safetensors file, read by the reader of its content (not of its name)."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    fmt = _sniff(path)
    if fmt == _SAFETENSORS:
        return _read_safetensors(path)
    if fmt is not None:
        return _read_pth(path, fmt)
    with open(path, "rb") as f:
        head = f.read(32)
    hint = ": a Git LFS pointer, not the weights (run `git lfs pull`)" if head.startswith(b"version https://git-lfs") else ""
    raise CheckpointError(
        f"could not read checkpoint {path}: neither a PyTorch checkpoint (zip or pickle) nor a safetensors file "
        f"(corrupt?); it starts with {head[:16]!r}{hint}"
    )


def _read_folder(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (no valid 'weight_map' of tensor name -> shard file)") from e
        not_names = [repr(shard) for shard in shards if not isinstance(shard, str) or Path(shard).name != shard]
        if not_names:  # HF writes plain file names; a path could read any file on the machine
            raise CheckpointError(f"{index} names shards that are not file names in its folder: {', '.join(not_names[:4])}")
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are not in {path}: {', '.join(missing)}")
        state_dict = {}
        for shard in shards:
            state_dict.update(_read_file(path / shard))
        return state_dict
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _read_file(path / name)
    raise CheckpointError(f"folder {path} has no model.safetensors (or model.safetensors.index.json / pytorch_model.bin)")


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"{repo_id!r} is not a local file or folder; to download it from the Hugging Face hub install "
            "huggingface_hub (pip install 'samhq-fast[hub]')"
        ) from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        raise CheckpointError(
            f"{repo_id!r} is not a local file or folder, and could not be downloaded from the Hugging Face hub "
            f"(no network, or no such repo?): {e}"
        ) from e


def read_state_dict(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint in its own key layout. source: .pth/.pt/.bin, .safetensors,
    an HF-style folder, or a hub id like "syscv-community/sam-hq-vit-base"."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"checkpoint source must be a path or hub id string, got {type(source).__name__}")
    if not str(source).strip():  # Path("") is the current folder
        raise FileNotFoundError("checkpoint source is an empty string: give a .pth or .safetensors file, an HF model folder, or a hub id")
    path = Path(source).expanduser()  # "~/sam_hq_vit_h.pth" as a shell would read it (no hub id starts with ~)
    if path.is_dir():
        return _strip_shared_prefix(_read_folder(path))
    if path.is_file():
        return _strip_shared_prefix(_read_file(path))
    if isinstance(source, str) and _HUB_ID.match(source) and path.suffix not in (".pth", ".pt", ".bin", ".safetensors"):
        return _strip_shared_prefix(_read_folder(_download(source)))
    raise FileNotFoundError(f"checkpoint not found: {source!s} (expected a .pth or .safetensors file, an HF model folder, or a hub id)")


# ---------------------------------------------------------------------------------------------
# Architecture from shapes


def _shape(state_dict: dict, key: str, rank: int, encoder: str = "ViT") -> tuple[int, ...]:
    """The shape of a tensor the architecture is read from, which must exist and have `rank` dims."""
    if key not in state_dict:
        raise CheckpointError(f"checkpoint has no {key!r}, which every SAM-HQ checkpoint with a {encoder} image encoder has")
    shape = tuple(state_dict[key].shape)
    if len(shape) != rank:
        raise CheckpointError(f"{key} has shape {list(shape)}: a SAM-HQ checkpoint's is {rank}-dimensional")
    return shape


def _most_common(sizes: list[int]) -> int:
    """The size most blocks agree on: read from block 0 alone, one broken block 0 would make every
    other block look mis-shaped in the error, instead of itself."""
    return collections.Counter(sizes).most_common(1)[0][0]


def _indices(state_dict: dict, prefix: str) -> list[int]:
    """The sorted numbers n of keys `{prefix}n.*`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})


# The original TinyViT merges with stride 1 (not 2) exactly into these widths; samhq-fast's
# MERGE_STRIDES assume that happens at the last merge only, as in every released TinyViT.
_ORIGINAL_STRIDE_1_WIDTHS = (320, 448, 576)


def _infer_tiny_vit(state_dict: dict[str, torch.Tensor]) -> TinyViTConfig:
    """TinyViT architecture from shapes: widths from the stem and the merges' 1x1 convs, depths from
    the block counts, heads and windows from `attention_biases` [heads, window^2]. The input size
    (1024) and the merge strides cannot be seen in shapes: the original's only ones are assumed."""
    shape = lambda key, rank: _shape(state_dict, "image_encoder." + key, rank, "TinyViT")  # noqa: E731
    default = TinyViTConfig()
    stages = _indices(state_dict, "image_encoder.layers.")
    if stages != list(range(4)):
        raise CheckpointError(f"a TinyViT image encoder has 4 stages (image_encoder.layers.0-3), this checkpoint has layers {stages}")
    dims = [shape("patch_embed.seq.2.c.weight", 4)[0]] + [shape(f"layers.{i}.downsample.conv1.c.weight", 4)[0] for i in range(3)]
    strides = tuple(1 if d in _ORIGINAL_STRIDE_1_WIDTHS else 2 for d in dims[1:])
    if strides != MERGE_STRIDES:
        raise CheckpointError(
            f"TinyViT widths {dims}: the original would merge stages with strides {strides} (stride 1 into a width of "
            f"{'/'.join(map(str, _ORIGINAL_STRIDE_1_WIDTHS))}), samhq-fast supports {MERGE_STRIDES} (every released TinyViT)"
        )
    depths = [len(_indices(state_dict, f"image_encoder.layers.{i}.blocks.")) for i in range(4)]
    heads, windows = [default.num_heads[0]], [default.window_sizes[0]]  # stage 0 is convolutional
    for i in range(1, 4):
        shapes = {shape(f"layers.{i}.blocks.{j}.attn.attention_biases", 2) for j in range(depths[i])}
        if len(shapes) != 1:
            found = f"attention_biases of different shapes across blocks: {sorted(shapes)}" if shapes else "no blocks"
            raise CheckpointError(f"TinyViT stage {i}: {found}")
        (num_heads, offsets), = shapes
        window = math.isqrt(offsets)
        if window * window != offsets or dims[i] % num_heads:
            raise CheckpointError(
                f"TinyViT stage {i}: attention_biases [{num_heads}, {offsets}] is not [heads, window^2] "
                f"with heads dividing the width {dims[i]}"
            )
        heads.append(num_heads)
        windows.append(window)
    hidden = shape("layers.0.blocks.0.conv1.c.weight", 4)[0]
    mlp_hidden = shape("layers.1.blocks.0.mlp.fc1.weight", 2)[0]
    if hidden % dims[0] or mlp_hidden % dims[1]:
        raise CheckpointError(f"TinyViT: MBConv width {hidden} / MLP width {mlp_hidden} are not multiples of {dims[0]} / {dims[1]}")
    head_key = "image_encoder.head.weight"
    return TinyViTConfig(
        img_size=default.img_size,
        embed_dims=tuple(dims),
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_sizes=tuple(windows),
        mlp_ratio=mlp_hidden // dims[1],
        mbconv_expand_ratio=hidden // dims[0],
        local_conv_size=shape("layers.1.blocks.0.local_conv.c.weight", 4)[-1],
        num_classes=_shape(state_dict, head_key, 2, "TinyViT")[0] if head_key in state_dict else 0,
        out_chans=shape("neck.0.weight", 4)[0],
    )


_HQ_PREFIXES = tuple(f"mask_decoder.{name}." for name in ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature"))


def infer_config(state_dict: dict[str, torch.Tensor]) -> SamHQConfig:
    """Architecture from tensor shapes (original key layout); see REFERENCE.md."""
    if not any(k.startswith(_HQ_PREFIXES) for k in state_dict) and "mask_decoder.iou_token.weight" in state_dict:
        raise CheckpointError(
            "this is a plain SAM checkpoint without the HQ keys (mask_decoder.hf_token, hf_mlp, compress_vit_feat, "
            "embedding_encoder, embedding_maskfeature): samhq-fast needs a SAM-HQ checkpoint"
        )
    if is_tiny_vit(state_dict):
        return SamHQConfig(encoder=_infer_tiny_vit(state_dict))
    embed_dim, _, patch, _ = _shape(state_dict, "image_encoder.patch_embed.proj.weight", 4)
    _, grid, _, _ = _shape(state_dict, "image_encoder.pos_embed", 4)
    depth = len(_indices(state_dict, "image_encoder.blocks."))
    if depth == 0:
        raise CheckpointError("checkpoint has no image_encoder.blocks.*: not a ViT SAM-HQ checkpoint")
    rows = [_shape(state_dict, f"image_encoder.blocks.{i}.attn.rel_pos_h", 2) for i in range(depth)]
    head_dim = _most_common([r[1] for r in rows])
    global_rows = 2 * grid - 1
    global_idx = tuple(i for i, r in enumerate(rows) if r[0] == global_rows)
    window_rows = {r[0] for r in rows if r[0] != global_rows}
    if len(window_rows) > 1 or (window_rows and min(window_rows) % 2 == 0):
        raise CheckpointError(f"inconsistent rel_pos_h tables across blocks: rows {sorted({r[0] for r in rows})}")
    if not global_idx:
        raise CheckpointError(f"no global-attention block (rel_pos_h with {global_rows} rows for a {grid}x{grid} grid)")
    if not window_rows and depth > 1:
        # Every table has 2 * grid - 1 rows: a grid as small as the window (224-pixel input), where
        # shapes cannot tell windowed from global blocks, and the HQ decoder needs the first global one.
        raise CheckpointError(
            f"cannot infer which blocks use global attention: all {depth} blocks have rel_pos tables of "
            f"{global_rows} rows for a {grid}x{grid} token grid (the window is as large as the grid)"
        )
    window = (window_rows.pop() + 1) // 2 if window_rows else grid
    if embed_dim % head_dim:
        raise CheckpointError(f"embed dim {embed_dim} is not a multiple of head_dim {head_dim}")
    lin1 = [f"image_encoder.blocks.{i}.mlp.lin1.weight" for i in range(depth)]
    lin1_shapes = [state_dict[k].shape for k in lin1 if k in state_dict and state_dict[k].dim() == 2]
    if not lin1_shapes:
        _shape(state_dict, lin1[0], 2)  # raises, naming block 0's missing or mis-ranked lin1
    mlp_dim = _most_common([s[0] for s in lin1_shapes])
    out_chans = _shape(state_dict, "image_encoder.neck.0.weight", 4)[0]
    encoder = ViTConfig(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        mlp_dim=mlp_dim,
        window_size=window,
        global_attn_indexes=global_idx,
        out_chans=out_chans,
    )
    return SamHQConfig(encoder=encoder)


def hf_config_kwargs(config: SamHQConfig) -> dict:
    """Keyword arguments for transformers' `SamHQConfig` of the same architecture. The decoder's
    LayerNorm eps is set to the original's 1e-5 (HF defaults to 1e-6, see REFERENCE.md)."""
    enc = config.encoder
    if not isinstance(enc, ViTConfig):
        raise ValueError(NO_HF_TINY_VIT)
    return dict(
        vision_config=dict(
            hidden_size=enc.embed_dim, num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
            image_size=enc.img_size, patch_size=enc.patch_size, window_size=enc.window_size,
            global_attn_indexes=list(enc.global_attn_indexes), mlp_dim=enc.mlp_dim, output_channels=enc.out_chans,
        ),
        prompt_encoder_config=dict(image_size=enc.img_size, patch_size=enc.patch_size),
        mask_decoder_config=dict(vit_dim=config.vit_dim, layer_norm_eps=1e-5),
    )


@functools.cache
def _variant_shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(t.shape) for k, t in SamHQ(SamHQConfig(encoder=ALL_VARIANTS[name])).state_dict().items()}


def known_variant_part(state_dict: dict[str, torch.Tensor]) -> tuple[str, list[str]] | None:
    """(name, missing keys) of the released variant whose weights this state dict is a strict part of
    (same shapes, some keys absent: e.g. a last block dropped, which infer_config reads as a
    shallower custom model), or None."""
    shapes = {k: tuple(t.shape) for k, t in state_dict.items()}
    for name in ALL_VARIANTS:
        expected = _variant_shapes(name)
        if shapes.keys() < expected.keys() and all(expected[k] == shape for k, shape in shapes.items()):
            return name, sorted(expected.keys() - shapes.keys())
    return None


def load_state_dict_strict(model: SamHQ, state_dict: dict[str, torch.Tensor]) -> None:
    """Load with assign=True after checking every key and shape; one error lists every problem."""
    expected = model.state_dict()
    # BatchNorm step counters (TinyViT's) are unused at inference, and some exporters leave them out:
    # torch's own strict load fills them in too.
    counters = {k: torch.zeros((), dtype=torch.long) for k in expected if k.endswith(".num_batches_tracked") and k not in state_dict}
    state_dict = {**state_dict, **counters}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    # Weights must be floating point (any width: they are cast to the model's dtype); torch would
    # otherwise fail inside load_state_dict.
    not_float = [
        f"{k}: {str(state_dict[k].dtype).removeprefix('torch.')}"
        for k in expected
        if k in state_dict and expected[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    without_data = [k for k in expected if k in state_dict and state_dict[k].is_meta]
    not_dense = [f"{k}: {state_dict[k].layout}" for k in expected if k in state_dict and state_dict[k].layout != torch.strided]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped tensors", misshaped),
                         ("tensors that are not floating point (weights must be float32/float16/bfloat16/float64)", not_float),
                         ("tensors without data (on the meta device)", without_data),
                         ("tensors that are not dense (sparse or other layouts: save them with .to_dense())", not_dense)):
        if items:
            shown = "\n    ".join(items[:40]) + (f"\n    ... and {len(items) - 40} more" if len(items) > 40 else "")
            problems.append(f"  {len(items)} {title}:\n    {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match the inferred {model.variant} architecture {model.config.to_dict()['encoder']}:\n" + "\n".join(problems)
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
