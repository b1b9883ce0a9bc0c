"""Checkpoint loading: every accepted source gives the same model, keys map exactly between the
original and HF layouts, the architecture is inferred from shapes, and every malformed checkpoint
fails loudly with a CheckpointError that says what is wrong (the original loads with strict=False
and silently produces garbage)."""

import argparse
import fnmatch
import functools
import json
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import samhq_fast
from samhq_fast import CheckpointError, SamHQ, SamHQConfig, sam_model_registry
from samhq_fast.build import resolve_backend, resolve_device, resolve_dtype
from samhq_fast.checkpoint import hf_to_original, infer_config, original_to_hf, read_state_dict
from samhq_fast.modeling import ViTConfig
from conftest import TINY_CONFIG, make_model

DATA = Path(__file__).parent / "data"
GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
# HF keeps the gaussian matrix twice; files written by transformers may hold either or both.
HF_GAUSSIAN_COPIES = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
HQ_PREFIXES = ("mask_decoder.hf_token", "mask_decoder.hf_mlp", "mask_decoder.compress_vit_feat",
               "mask_decoder.embedding_encoder", "mask_decoder.embedding_maskfeature")

# REFERENCE.md, "Variants".
VARIANT_FACTS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, head_dim=64, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, head_dim=64, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, head_dim=80, global_attn_indexes=(7, 15, 23, 31)),
}
VARIANTS = tuple(VARIANT_FACTS)


# ---------------------------------------------------------------------------------------------
# Helpers


def read_tsv(name: str) -> list[list[str]]:
    lines = (DATA / name).read_text().splitlines()
    return [line.split("\t") for line in lines if line and not line.startswith("#")]


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.strip("[]").split(",") if x.strip())


def variant_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the real original checkpoint of a variant."""
    return {key: parse_shape(shape) for key, shape, _dtype in read_tsv(f"keys_{variant}.tsv")}


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Shape-only tensors: real-size architectures without allocating any memory."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def tagged_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Every tensor has the right shape and a distinct constant value (its index) but is a
    stride-0 view of one scalar, so a real-size state dict costs nothing and we can still tell
    where each tensor ended up after renaming."""
    return {k: torch.tensor(float(i)).expand(s) for i, (k, s) in enumerate(shapes.items())}


def tag(t: torch.Tensor) -> float:
    return t.reshape(-1)[0].item()


def state_dict_of(model: SamHQ) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save(state_dict: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        torch.save(state_dict, path)
    return path


def assert_same_model(loaded: SamHQ, reference: SamHQ) -> None:
    assert loaded.config == reference.config
    assert loaded.variant == reference.variant
    assert not any(m.training for m in loaded.modules()), "load must return an eval-mode model"
    got, want = loaded.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), f"{key} differs after loading"


def load_error(source, **kwargs) -> str:
    """The CheckpointError message, with the source path replaced by "<path>": pytest's tmp_path
    contains the test name, which would otherwise satisfy checks like `"truncated" in message`."""
    with pytest.raises(CheckpointError) as info:
        samhq_fast.load(source, device="cpu", **kwargs)
    return str(info.value).replace(str(source), "<path>")


@pytest.fixture(scope="module")
def tiny_sd(tiny_model) -> dict[str, torch.Tensor]:
    return state_dict_of(tiny_model)


@pytest.fixture(scope="module")
def real_variant_pth(tmp_path_factory) -> dict[str, Path]:
    """Real-size vit_b / vit_l / vit_h .pth files whose tensors are all stride-0 views of one
    scalar: torch.save stores the single shared storage, so each file is a few KB but has every
    key and shape of the real checkpoint."""
    folder = tmp_path_factory.mktemp("real_variants")
    one = torch.zeros(())
    paths = {}
    for variant in VARIANTS:
        state_dict = {k: one.expand(s) for k, s in variant_shapes(variant).items()}
        paths[variant] = folder / f"sam_hq_{variant}.pth"
        torch.save(state_dict, paths[variant])
        assert paths[variant].stat().st_size < 1_000_000
    return paths


# ---------------------------------------------------------------------------------------------
# 1. Round trips: every source format gives back the identical model


@pytest.mark.parametrize("fmt", ["pth", "original_st", "hf_st"])
@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_round_trip_formats(tiny_model, tiny_checkpoints, fmt, as_str):
    path = tiny_checkpoints[fmt]
    loaded = samhq_fast.load(str(path) if as_str else path, device="cpu")
    assert_same_model(loaded, tiny_model)
    assert loaded.variant == "custom"
    assert loaded.backend == "eager"


def test_round_trip_wrapped_pth(tiny_model, tiny_sd, tmp_path):
    # Training scripts save {"model": state_dict}; the original release accepts that too.
    path = save({"model": tiny_sd}, tmp_path / "wrapped.pth")
    assert_same_model(samhq_fast.load(path, device="cpu"), tiny_model)


TRAINING_STATE = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                  "epoch": 3, "args": {"lr": 1e-4, "batch_size": 4}}


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": sd, **TRAINING_STATE},
    lambda sd: {"model_state_dict": sd, "optimizer_state_dict": TRAINING_STATE["optimizer"], "epoch": 3, "loss": 0.25},
    lambda sd: {"state_dict": {"module": sd}, "epoch": 3},
    lambda sd: {"net": sd, "step": 10, "model_ema": {"ema_decay": 0.99}},
    lambda sd: {"model": sd, "args": argparse.Namespace(lr=1e-4, input_size=[1024, 1024], output="work_dirs/hq")},
], ids=["model+optimizer+epoch+args", "model_state_dict", "nested", "net", "argparse-namespace"])
def test_round_trip_training_checkpoint(tiny_model, tiny_sd, tmp_path, wrap):
    # Training scripts save the weights next to optimizer state, epoch, arguments...: find them.
    assert_same_model(samhq_fast.load(save(wrap(tiny_sd), tmp_path / "train.pth"), device="cpu"), tiny_model)


def test_training_checkpoint_with_two_state_dicts_is_refused(tiny_sd, tmp_path):
    # Two candidate weight sets: refuse rather than pick one silently.
    message = load_error(save({"model": tiny_sd, "state_dict": tiny_sd, "epoch": 3}, tmp_path / "two.pth"))
    assert "several state dicts" in message and "'model'" in message and "'state_dict'" in message


@pytest.mark.parametrize("prefix", ["module.", "model.", "model.module."])
@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_prefixed_keys(tiny_model, tiny_sd, tmp_path, prefix, layout, suffix):
    # DDP saves "module.image_encoder..."; training wrappers add "model." and the like.
    state_dict = original_to_hf(tiny_sd) if layout == "hf" else tiny_sd
    path = save({prefix + k: v for k, v in state_dict.items()}, tmp_path / f"prefixed{suffix}")
    assert_same_model(samhq_fast.load(path, device="cpu"), tiny_model)


def test_shared_prefix_is_stripped_only_when_sam_keys_remain(tiny_sd, tmp_path):
    prefixed = {"module." + k: v for k, v in tiny_sd.items()}
    assert sorted(read_state_dict(save(prefixed, tmp_path / "ddp.safetensors"))) == sorted(tiny_sd)
    # Keys that share a prefix but are no SAM-HQ keys under it stay as they are (and then fail to load).
    other = {"module.head.x" + k: v for k, v in tiny_sd.items()}
    assert sorted(read_state_dict(save(other, tmp_path / "other.safetensors"))) == sorted(other)


@pytest.mark.parametrize("written, name", [
    ("safetensors", "model.pth"), ("safetensors", "model.bin"),
    ("torch_zip", "model.safetensors"), ("torch_legacy", "model.safetensors"),
])
def test_format_from_content_not_extension(tiny_model, tiny_sd, tmp_path, written, name):
    path = tmp_path / name
    if written == "safetensors":
        save_file(tiny_sd, path)
    else:
        torch.save(tiny_sd, path, _use_new_zipfile_serialization=written == "torch_zip")
    assert_same_model(samhq_fast.load(path, device="cpu"), tiny_model)


@pytest.mark.parametrize("kept", HF_GAUSSIAN_COPIES)
def test_hf_file_with_one_gaussian_copy(tiny_model, tiny_sd, tmp_path, kept):
    hf = original_to_hf(tiny_sd)
    dropped = next(k for k in HF_GAUSSIAN_COPIES if k != kept)
    del hf[dropped]
    path = save(hf, tmp_path / "hf_one_copy.safetensors")
    assert_same_model(samhq_fast.load(path, device="cpu"), tiny_model)


def test_hf_file_with_disagreeing_gaussian_copies(tiny_sd, tmp_path):
    # Two different values for one tied tensor: refuse rather than pick one silently.
    hf = original_to_hf(tiny_sd)
    hf[HF_GAUSSIAN_COPIES[1]] = hf[HF_GAUSSIAN_COPIES[1]] + 1
    message = load_error(save(hf, tmp_path / "hf_bad_tie.safetensors"))
    assert "positional_embedding" in message and "differ" in message


def test_a_file_holding_both_layouts_is_refused(tiny_sd, tmp_path):
    """Original and HF copies of the weights (with other values) in one file: refuse rather than keep
    whichever the renaming writes last."""
    hf = {k: v + 1 for k, v in original_to_hf(tiny_sd).items()}
    message = load_error(save({**tiny_sd, **hf}, tmp_path / "both_layouts.safetensors"))
    assert "mixes the HF layout" in message and "image_encoder." in message


def test_hf_and_original_names_of_one_weight_are_refused(tiny_sd, tmp_path):
    """An HF file that also holds one decoder weight under its original name: two tensors for one weight."""
    hf = original_to_hf(tiny_sd)
    hf["prompt_encoder.point_embeddings.0.weight"] = hf["prompt_encoder.point_embed.0.weight"] + 1
    message = load_error(save(hf, tmp_path / "one_weight_twice.safetensors"))
    assert "names 1 weights twice" in message and "prompt_encoder.point_embed" in message


def test_keys_that_are_not_names_are_refused(tiny_sd, tmp_path):
    message = load_error(save({**tiny_sd, 7: torch.zeros(1)}, tmp_path / "int_key.pth"))
    assert "its keys must be names (str), got 7" in message


def test_sparse_weights_are_refused(tiny_sd, tmp_path):
    """A sparse tensor loads into the module and fails at the first predict, deep in torch."""
    key = "mask_decoder.iou_token.weight"
    message = load_error(save({**tiny_sd, key: tiny_sd[key].to_sparse()}, tmp_path / "sparse.pth"))
    assert "1 tensors that are not dense" in message and f"{key}: torch.sparse_coo" in message


def test_legacy_pth_format(tiny_model, tiny_sd, tmp_path):
    # Pre-zip torch.save format (torch < 1.6) cannot be memory-mapped but is a valid checkpoint.
    path = tmp_path / "legacy.pth"
    torch.save(tiny_sd, path, _use_new_zipfile_serialization=False)
    assert_same_model(samhq_fast.load(path, device="cpu"), tiny_model)


def hf_tiny_config():
    """transformers' config for TINY_CONFIG."""
    from transformers import SamHQConfig as HFConfig
    from transformers import SamHQMaskDecoderConfig, SamHQPromptEncoderConfig, SamHQVisionConfig

    encoder = TINY_CONFIG.encoder
    vision = SamHQVisionConfig(
        hidden_size=encoder.embed_dim, num_hidden_layers=encoder.depth, num_attention_heads=encoder.num_heads,
        image_size=encoder.img_size, global_attn_indexes=list(encoder.global_attn_indexes), mlp_dim=encoder.mlp_dim,
    )
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (160, 4, 2)
    assert (vision.image_size, list(vision.global_attn_indexes), vision.mlp_dim) == (256, [1, 3], 320)
    return HFConfig(
        vision_config=vision,
        prompt_encoder_config=SamHQPromptEncoderConfig(image_size=encoder.img_size),
        mask_decoder_config=SamHQMaskDecoderConfig(vit_dim=encoder.embed_dim),
    )


@pytest.fixture(scope="module")
def hf_folders(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    """The tiny model written by transformers itself: one folder with model.safetensors, one sharded."""
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.SamHQModel(hf_tiny_config())
    hf_sd = original_to_hf(tiny_sd)
    # The HF config must describe exactly our tiny architecture: same keys, same shapes.
    assert {k: tuple(v.shape) for k, v in hf_model.state_dict().items()} == {k: tuple(v.shape) for k, v in hf_sd.items()}
    hf_model.load_state_dict(hf_sd, strict=True)
    folders = {"single": tmp_path_factory.mktemp("hf_single"), "sharded": tmp_path_factory.mktemp("hf_sharded")}
    hf_model.save_pretrained(folders["single"])
    hf_model.save_pretrained(folders["sharded"], max_shard_size="2MB")
    assert (folders["single"] / "config.json").is_file() and (folders["single"] / "model.safetensors").is_file()
    assert (folders["sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(folders["sharded"].glob("model-*.safetensors"))) > 1
    return folders


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_round_trip_hf_folder_written_by_transformers(tiny_model, hf_folders, kind):
    assert_same_model(samhq_fast.load(hf_folders[kind], device="cpu"), tiny_model)


@pytest.mark.parametrize("prefix", ["", "model."])
@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_folder_with_one_weights_file(tiny_model, tiny_sd, tmp_path, name, prefix):
    """An HF folder holding model.safetensors or (older exports) pytorch_model.bin; keys under a
    shared prefix are unwrapped as in a single file."""
    save({prefix + k: v for k, v in original_to_hf(tiny_sd).items()}, tmp_path / name)
    assert_same_model(samhq_fast.load(tmp_path, device="cpu"), tiny_model)


def test_folder_reads_safetensors_before_a_pickle(tiny_model, tiny_sd, tmp_path):
    """With both, model.safetensors is read (no pickle at all; here the .bin is an LFS pointer never pulled)."""
    save(original_to_hf(tiny_sd), tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    assert_same_model(samhq_fast.load(tmp_path, device="cpu"), tiny_model)


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch_zip", "torch_legacy"])
def test_checkpoint_saved_from_gpu_tensors_loads_on_the_cpu(tiny_model, tiny_sd, tmp_path, monkeypatch, zip_format):
    """A .pth saved from CUDA tensors records "cuda:0" as their device (as most released checkpoints
    do): it is read onto the CPU, also on a machine without a GPU."""
    path = tmp_path / "from_gpu.pth"
    with monkeypatch.context() as patch:  # torch.save asks location_tag where each storage lives
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(tiny_sd, path, _use_new_zipfile_serialization=zip_format)
    if not torch.cuda.is_available():  # the file really names a CUDA device
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    assert all(t.device.type == "cpu" for t in read_state_dict(path).values())
    assert_same_model(samhq_fast.load(path, device="cpu"), tiny_model)


def test_an_empty_wrapper_entry_is_not_a_second_state_dict(tiny_model, tiny_sd, tmp_path):
    """{"model": {}, "state_dict": weights}: the empty dict holds no weights, so there is one candidate."""
    assert_same_model(samhq_fast.load(save({"model": {}, "state_dict": tiny_sd}, tmp_path / "w.pth"), device="cpu"), tiny_model)


# ---------------------------------------------------------------------------------------------
# 2. Key mapping and real-size architectures


def test_key_mapping_leaves_its_input_alone(tiny_sd):
    hf = original_to_hf(tiny_sd)
    before = (list(tiny_sd), list(hf))
    hf_to_original(hf)
    original_to_hf(tiny_sd)
    assert (list(tiny_sd), list(hf)) == before


def keymap_rows() -> list[tuple[str, str, tuple[int, ...]]]:
    return [(orig, hf, parse_shape(shape)) for orig, hf, shape in read_tsv("keymap_original_to_hf_vit_b.tsv")]


def test_keymap_covers_vit_b():
    # Guard for the tests below: the keymap is the vit_b key list plus HF's tied extra copy.
    rows = keymap_rows()
    assert [orig for orig, _, _ in rows[:-1]] == list(variant_shapes("vit_b"))
    assert rows[-1][0] == "(tied copy)"


def test_original_to_hf_matches_keymap():
    rows = keymap_rows()
    original = tagged_state_dict({orig: shape for orig, _, shape in rows[:-1]})
    hf = original_to_hf(original)
    assert sorted(hf) == sorted(hf_key for _, hf_key, _ in rows)
    for orig, hf_key, shape in rows:
        source = GAUSSIAN if orig == "(tied copy)" else orig
        assert tuple(hf[hf_key].shape) == shape, hf_key
        assert tag(hf[hf_key]) == tag(original[source]), f"{source} should map to {hf_key}"


@pytest.mark.parametrize("copies", ["both", *HF_GAUSSIAN_COPIES])
def test_hf_to_original_inverts_keymap(copies):
    rows = keymap_rows()
    hf = tagged_state_dict({hf_key: shape for _, hf_key, shape in rows})
    # The two copies of the tied gaussian matrix hold the same value.
    gaussian = hf[HF_GAUSSIAN_COPIES[0]] = hf[HF_GAUSSIAN_COPIES[1]]
    if copies != "both":
        del hf[next(k for k in HF_GAUSSIAN_COPIES if k != copies)]
    original = hf_to_original(hf)
    assert sorted(original) == sorted(orig for orig, _, _ in rows[:-1])
    for orig, hf_key, shape in rows[:-1]:
        assert tuple(original[orig].shape) == shape
        expected = gaussian if orig == GAUSSIAN else hf[hf_key]
        assert tag(original[orig]) == tag(expected), f"{hf_key} should map back to {orig}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_mapping_round_trip_real_variant(variant):
    original = tagged_state_dict(variant_shapes(variant))
    back = hf_to_original(original_to_hf(original))
    assert back.keys() == original.keys()
    assert all(tag(back[k]) == tag(original[k]) for k in original)


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_keys_match_real_checkpoint(variant):
    with torch.device("meta"):
        model = SamHQ(SamHQConfig.from_variant(variant))
    got = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    want = {k: (s, torch.float32) for k, s in variant_shapes(variant).items()}
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want


@pytest.mark.parametrize("variant", VARIANTS)
def test_infer_config_real_variant(variant):
    config = infer_config(meta_state_dict(variant_shapes(variant)))
    facts = VARIANT_FACTS[variant]
    enc = config.encoder
    assert config.variant == variant
    assert (enc.img_size, enc.patch_size, enc.window_size, enc.out_chans) == (1024, 16, 14, 256)
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.head_dim) == (
        facts["embed_dim"], facts["depth"], facts["num_heads"], facts["head_dim"])
    assert enc.global_attn_indexes == facts["global_attn_indexes"]
    assert enc.mlp_dim == 4 * facts["embed_dim"]
    assert config.vit_dim == facts["embed_dim"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_infer_config_real_variant_hf_layout(variant):
    # HF files are mapped back to the original layout before inference; nothing may be lost.
    hf = original_to_hf(meta_state_dict(variant_shapes(variant)))
    del hf[HF_GAUSSIAN_COPIES[1]]  # transformers writes only one copy
    assert infer_config(hf_to_original(hf)).variant == variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_real_variant(real_variant_pth, variant):
    model = samhq_fast.load(real_variant_pth[variant], device="cpu")
    assert model.variant == variant
    assert model.config == SamHQConfig.from_variant(variant)


@pytest.mark.parametrize("variant, dropped", [("vit_b", "image_encoder.blocks.11."), ("vit_tiny", "image_encoder.layers.2.blocks.5.")])
def test_a_variant_without_its_last_block_warns(tmp_path, variant, dropped):
    """Shapes alone read a state dict missing a stage's LAST block as a shallower custom model: the
    loader says which released variant it is a part of (a block missing anywhere else is an error)."""
    one = torch.zeros(())
    state_dict = {k: one.expand(s) for k, s in variant_shapes(variant).items() if not k.startswith(dropped)}
    path = save(state_dict, tmp_path / "partial.pth")
    with pytest.warns(UserWarning, match=f"loaded as a custom model, but it is {variant} with .* tensors missing .*{re.escape(dropped)}"):
        assert samhq_fast.load(path, device="cpu").variant == "custom"
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=f"sam_model_registry\\['{variant}'\\] was given a custom checkpoint"):
        sam_model_registry[variant](path)


def test_a_custom_architecture_is_not_called_part_of_a_variant(tiny_checkpoints):
    # The tiny test model's keys are a subset of vit_b's (fewer blocks), but its shapes are not.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert samhq_fast.load(tiny_checkpoints["pth"], device="cpu").variant == "custom"


def test_missing_batchnorm_counters_are_filled_in(tmp_path):
    """TinyViT's BatchNorm num_batches_tracked counters (unused at inference) may be absent, as
    torch's own strict load_state_dict allows; the model equals the one from the full state dict."""
    full = state_dict_of(make_model(SamHQConfig.from_variant("vit_tiny")))
    counters = [k for k in full if k.endswith(".num_batches_tracked")]
    assert counters
    loaded = samhq_fast.load(save({k: v for k, v in full.items() if k not in counters}, tmp_path / "no_counters.pth"), device="cpu")
    reference = samhq_fast.load(save(full, tmp_path / "full.pth"), device="cpu")
    assert_same_model(loaded, reference)


@pytest.mark.parametrize("value, dtype, hint", [(float("nan"), "fp32", ""), (float("-inf"), "bf16", ""),
                                                 (1e6, "fp16", "beyond float16's range")])
def test_non_finite_weights_are_named(tmp_path, tiny_sd, value, dtype, hint):
    # NaN weights would give NaN logits and empty masks without a word.
    key = "image_encoder.blocks.1.mlp.lin2.weight"
    state_dict = dict(tiny_sd, **{key: tiny_sd[key].clone().index_fill_(1, torch.tensor([3]), value)})
    message = load_error(save(state_dict, tmp_path / "nan.pth"), dtype=dtype)
    assert "NaN or infinite values in 1 of" in message and key in message and hint in message


def test_half_weights_whose_sum_overflows_half_load(tmp_path, tiny_sd):
    """Every value within float16's range (30000 < 65504) though the tensor's sum is not: finite weights, not refused."""
    key = "mask_decoder.iou_token.weight"
    state_dict = dict(tiny_sd, **{key: torch.full_like(tiny_sd[key], 30000.0)})
    model = samhq_fast.load(save(state_dict, tmp_path / "large.pth"), device="cpu", dtype="fp16")
    assert torch.equal(model.state_dict()[key], torch.full_like(tiny_sd[key], 30000.0, dtype=torch.float16))


def test_tensors_without_data_are_named(tmp_path, tiny_sd):
    state_dict = dict(tiny_sd, **{"mask_decoder.hf_token.weight": torch.empty(tiny_sd["mask_decoder.hf_token.weight"].shape, device="meta")})
    message = load_error(save(state_dict, tmp_path / "meta.pth"))
    assert "1 tensors without data (on the meta device):\n    mask_decoder.hf_token.weight" in message


# ---------------------------------------------------------------------------------------------
# 3. Custom architectures load as "custom" with the inferred config


CUSTOM_ENCODERS = {
    # 512 input -> 32x32 grid: global tables have 63 rows, windowed ones 27.
    "img512": ViTConfig(img_size=512, embed_dim=64, depth=2, num_heads=1, mlp_dim=128, global_attn_indexes=(1,)),
    # Other depth, width, head count, MLP ratio and global blocks at 256 input.
    "deeper_narrower": ViTConfig(img_size=256, embed_dim=96, depth=6, num_heads=3, mlp_dim=200, global_attn_indexes=(0, 3, 5)),
    # A smaller window (13-row tables) and patch 8 (256 input -> 32x32 grid).
    "window7_patch8": ViTConfig(img_size=256, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_dim=128,
                                window_size=7, global_attn_indexes=(1,)),
    # One block, global: no windowed table to read a window from (window = grid, unused).
    "one_global_block": ViTConfig(img_size=256, embed_dim=64, depth=1, num_heads=2, mlp_dim=128, window_size=16,
                                  global_attn_indexes=(0,)),
}


@functools.cache
def custom_model(name: str) -> SamHQ:
    return make_model(SamHQConfig(CUSTOM_ENCODERS[name]), seed=1)


@pytest.mark.parametrize("name", CUSTOM_ENCODERS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_custom_architecture(tmp_path, name, suffix):
    reference = custom_model(name)
    state_dict = state_dict_of(reference)
    assert infer_config(state_dict).encoder == CUSTOM_ENCODERS[name]
    loaded = samhq_fast.load(save(state_dict, tmp_path / f"custom{suffix}"), device="cpu")
    assert loaded.variant == "custom"
    assert loaded.config.encoder == CUSTOM_ENCODERS[name]
    assert_same_model(loaded, reference)


def test_light_hq_sam_vit_tiny_is_inferred():
    # A real Light HQ-SAM key list (TinyViT encoder) is its own variant; tests/test_tiny_vit.py
    # checks the model against the original.
    config = infer_config(meta_state_dict(variant_shapes("vit_tiny")))
    assert config == SamHQConfig.from_variant("vit_tiny")
    assert config.variant == "vit_tiny" and config.vit_dim == 160 and config.embedding_size == 64


def test_grid_as_small_as_window_is_refused():
    # 224 input -> 14x14 grid: windowed and global tables both have 27 rows, so shapes cannot say
    # which block the HQ decoder must read; guessing would be a silent wrong answer.
    encoder = ViTConfig(img_size=224, embed_dim=64, depth=4, num_heads=2, mlp_dim=128, global_attn_indexes=(1, 3))
    with torch.device("meta"):
        state_dict = SamHQ(SamHQConfig(encoder)).state_dict()
    with pytest.raises(CheckpointError, match="cannot infer which blocks use global attention"):
        infer_config(state_dict)


def test_tiny_config_inferred(tiny_sd):
    # TINY_CONFIG copies vit_h's head_dim 80 at a 16x16 grid.
    encoder = infer_config(tiny_sd).encoder
    assert encoder == TINY_CONFIG.encoder
    assert encoder.head_dim == 80 and encoder.global_attn_indexes == (1, 3)


# ---------------------------------------------------------------------------------------------
# 4. Malformed checkpoints


# Keys the architecture is inferred from, and keys it is not: both must be named when missing.
@pytest.mark.parametrize("key", [
    "mask_decoder.iou_prediction_head.layers.2.bias",
    "image_encoder.blocks.2.mlp.lin2.weight",
    "mask_decoder.hf_mlp.layers.1.weight",
    "mask_decoder.hf_token.weight",
    "image_encoder.blocks.0.attn.rel_pos_h",
    "image_encoder.patch_embed.proj.weight",
    GAUSSIAN,
])
def test_missing_key(tiny_sd, tmp_path, key):
    state_dict = {k: v for k, v in tiny_sd.items() if k != key}
    message = load_error(save(state_dict, tmp_path / "missing.pth"))
    assert key in message


@pytest.mark.parametrize("key, bad", [
    ("image_encoder.blocks.0.attn.rel_pos_h", lambda t: t[:, 0]),  # 1-D
    ("image_encoder.patch_embed.proj.weight", lambda t: t.flatten(1)),  # [C, 3 * 16 * 16]
    ("image_encoder.pos_embed", lambda t: t[0]),  # 3-D
    ("image_encoder.pos_embed", lambda t: t[None]),  # 5-D
    ("image_encoder.neck.0.weight", lambda t: t.flatten(1)),
])
def test_tensor_of_the_wrong_rank_is_named(tiny_sd, tmp_path, key, bad):
    # The architecture is read from these shapes: a wrong rank must be named, not an IndexError.
    message = load_error(save({**tiny_sd, key: bad(tiny_sd[key])}, tmp_path / "rank.pth"))
    assert key in message and str(list(bad(tiny_sd[key]).shape)) in message


def test_no_encoder_blocks(tiny_sd, tmp_path):
    state_dict = {k: v for k, v in tiny_sd.items() if not k.startswith("image_encoder.blocks.")}
    assert "checkpoint has no image_encoder.blocks.*" in load_error(save(state_dict, tmp_path / "no_blocks.pth"))


def test_windowed_tables_of_two_sizes(tiny_sd, tmp_path):
    """Block 0 (windowed) with a rel_pos_h two rows short of the other windowed blocks': which
    window is meant cannot be told, so both sizes are named."""
    key = "image_encoder.blocks.0.attn.rel_pos_h"
    rows = tiny_sd[key].shape[0]
    assert rows != 2 * TINY_CONFIG.encoder.grid_size - 1  # a windowed block
    message = load_error(save({**tiny_sd, key: tiny_sd[key][2:]}, tmp_path / "rows.pth"))
    assert f"inconsistent rel_pos_h tables across blocks: rows [{rows - 2}, {rows}," in message


@pytest.mark.parametrize("dropped", [10, 45])
def test_long_problem_lists_are_cut_at_40(tiny_sd, tmp_path, dropped):
    """Every missing key up to 40 is named; beyond that, the first 40 and how many more."""
    keys = sorted(k for k in tiny_sd if k.startswith("mask_decoder."))[:dropped]
    message = load_error(save({k: v for k, v in tiny_sd.items() if k not in keys}, tmp_path / "short.pth"))
    assert f"{dropped} missing keys" in message
    named = [k for k in keys if f"    {k}\n" in message + "\n"]
    assert len(named) == min(dropped, 40)
    assert ("... and 5 more" in message) == (dropped == 45)


def test_missing_hf_token_is_not_called_plain_sam(tiny_sd, tmp_path):
    # Only one HQ key is missing: the other HQ keys are there, so this is a broken SAM-HQ
    # checkpoint, not a plain SAM one, and the error must list the missing key.
    state_dict = {k: v for k, v in tiny_sd.items() if k != "mask_decoder.hf_token.weight"}
    message = load_error(save(state_dict, tmp_path / "no_hf_token.pth"))
    assert "missing" in message and "mask_decoder.hf_token.weight" in message
    assert "plain SAM" not in message


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_missing_key_in_either_safetensors_layout(tiny_sd, tmp_path, layout):
    # HF files are checked after mapping to the original layout, so the original name is reported.
    key = "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight"
    state_dict = {k: v for k, v in tiny_sd.items() if k != key}
    if layout == "hf":
        state_dict = original_to_hf(state_dict)
    message = load_error(save(state_dict, tmp_path / "missing.safetensors"))
    assert "missing" in message and key in message


@pytest.mark.parametrize("key", ["mask_decoder.extra_head.weight", "image_encoder.blocks.0.attn.extra", "optimizer_step"])
def test_unexpected_key(tiny_sd, tmp_path, key):
    state_dict = {**tiny_sd, key: torch.zeros(3)}
    message = load_error(save(state_dict, tmp_path / "unexpected.pth"))
    assert "unexpected" in message and key in message


@pytest.mark.parametrize("key", ["mask_decoder.iou_token.weight", "image_encoder.neck.2.weight", "mask_decoder.compress_vit_feat.0.weight"])
def test_misshaped_tensor(tiny_sd, tmp_path, key):
    shape = tuple(tiny_sd[key].shape)
    wrong = (shape[0] + 1, *shape[1:])
    state_dict = {**tiny_sd, key: torch.zeros(wrong)}
    message = load_error(save(state_dict, tmp_path / "misshaped.pth"))
    assert key in message and str(wrong) in message and str(shape) in message


@pytest.mark.parametrize("key", ["image_encoder.blocks.0.mlp.lin1.weight", "image_encoder.blocks.0.attn.rel_pos_h"])
def test_broken_first_block_is_the_one_reported(tiny_sd, tmp_path, key):
    """The MLP width and head_dim are read from what most blocks agree on, so a wrong tensor in
    block 0 (a transposed lin1, a rel_pos table 8 columns too wide) is named alone, not every
    other block as mis-shaped against it."""
    rows, cols = tiny_sd[key].shape
    wrong = torch.zeros(cols, rows) if "lin1" in key else torch.zeros(rows, cols + 8)
    state_dict = {**tiny_sd, key: wrong}
    message = load_error(save(state_dict, tmp_path / "block0.pth"))
    assert "1 mis-shaped" in message and key in message


def test_several_problems_in_one_error(tiny_sd, tmp_path):
    # Fixing problems one error at a time is slow: one message must list all of them.
    missing = ["mask_decoder.iou_prediction_head.layers.0.bias", "image_encoder.blocks.3.norm2.weight"]
    unexpected = ["mask_decoder.bogus.weight", "image_encoder.blocks.1.bogus"]
    misshaped = "mask_decoder.mask_tokens.weight"
    state_dict = {k: v for k, v in tiny_sd.items() if k not in missing}
    state_dict.update({k: torch.zeros(1) for k in unexpected})
    state_dict[misshaped] = torch.zeros(7, 256)
    message = load_error(save(state_dict, tmp_path / "several.pth"))
    for key in [*missing, *unexpected, misshaped]:
        assert key in message
    assert "2 missing" in message and "2 unexpected" in message and "1 mis-shaped" in message


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_plain_sam_checkpoint(tiny_sd, tmp_path, layout):
    # A plain SAM checkpoint (no HQ keys) is the most likely mix-up: say so instead of listing 30 keys.
    state_dict = {k: v for k, v in tiny_sd.items() if not k.startswith(HQ_PREFIXES)}
    assert len(state_dict) < len(tiny_sd) - 10  # the HQ keys really were removed
    if layout == "hf":
        state_dict = original_to_hf(state_dict)
    message = load_error(save(state_dict, tmp_path / "plain_sam.safetensors"))
    assert "plain SAM" in message and "HQ" in message


def truncate(path: Path, out: Path) -> Path:
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize("fmt", ["pth", "original_st", "hf_st"])
def test_truncated_file(tiny_checkpoints, tmp_path, fmt):
    path = truncate(tiny_checkpoints[fmt], tmp_path / f"half{tiny_checkpoints[fmt].suffix}")
    message = load_error(path)
    assert "<path>" in message and ("truncated" in message or "corrupt" in message)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"zero_bytes{suffix}"
    path.touch()
    message = load_error(path)
    assert "empty" in message and "<path>" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_random_bytes(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    assert "<path>" in load_error(path)


def test_empty_folder(tmp_path):
    message = load_error(tmp_path)
    assert "model.safetensors" in message


@pytest.mark.parametrize(
    "index, message",
    [
        ('{"metadata": {}}', "is not a safetensors index (no valid 'weight_map'"),
        ("not json", "is not a safetensors index"),
        ('{"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}', "names shard files that are not in"),
        ('{"weight_map": {"a.weight": 1}}', "names shards that are not file names in its folder: 1"),
        ('{"weight_map": {"a.weight": "/etc/hostname"}}', "names shards that are not file names in its folder: '/etc/hostname'"),
        ('{"weight_map": {"a.weight": "../model.safetensors"}}', "not file names in its folder: '../model.safetensors'"),
    ],
    ids=["no_weight_map", "invalid_json", "missing_shard", "int_shard", "absolute_shard", "parent_shard"],
)
def test_broken_sharded_folder(tmp_path, index, message):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    assert message in load_error(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes)"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 379000000\n", "a Git LFS pointer, not the weights"),
], ids=["empty", "git_lfs_pointer"])
def test_bad_shard_is_diagnosed_like_a_file(tmp_path, tiny_sd, content, message):
    """A shard of a sharded folder gets the same diagnosis as a checkpoint file given alone."""
    keys = list(tiny_sd)
    save({k: tiny_sd[k] for k in keys[:10]}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(content)
    weight_map = {k: f"model-0000{1 + (i >= 10)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert message in load_error(tmp_path)


@pytest.mark.parametrize("obj, named", [
    ({"weight": torch.zeros(2), "epoch": 3}, "1 entries are not tensors: 'epoch' (int)"),
    ([torch.zeros(2)], "found list"),
    ({"model": {"weight": torch.zeros(2), "note": "not a tensor"}, "epoch": 3}, "1 entries are not tensors: 'note' (str)"),  # the inner entry named
    (torch.zeros(2), "found Tensor"),
], ids=["int_value", "list", "wrapped_str_value", "bare_tensor"])
def test_not_a_state_dict_of_tensors(tmp_path, obj, named):
    message = load_error(save(obj, tmp_path / "odd.pth"))
    assert "state dict of tensors" in message and named in message


def test_legacy_pth_cut_inside_a_global_is_truncation(tiny_sd, tmp_path):
    """A legacy (pre-zip) file cut inside a pickle GLOBAL names a fragment like torch._utils._rebu:
    truncation, not an unsafe object."""
    path = tmp_path / "legacy.pth"
    torch.save(tiny_sd, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:data.index(b"_rebuild_tensor") + 6])
    message = load_error(cut)
    assert re.search(r"names torch\._utils\._reb\w*, which does not exist here \(a file cut short", message) and "truncated" in message
    assert "non-tensor" not in message and "safe_globals" not in message


def test_empty_state_dict(tmp_path):
    message = load_error(save({}, tmp_path / "nothing.pth"))
    assert "image_encoder" in message


class RunsCode:
    """Unpickling this creates a file: proof that arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_malicious_pickle_is_not_executed(tmp_path, writer):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    payload = {"image_encoder.pos_embed": RunsCode(marker)}
    if writer == "raw_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch.load's protocol
        pickle.loads(path.read_bytes())  # sanity: an unsafe load really runs the payload
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch_zip")
        torch.load(path, weights_only=False)  # sanity: an unsafe load really runs the payload
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError):
        samhq_fast.load(path, device="cpu")
    assert not marker.exists(), "loading a checkpoint executed code from its pickle"


def test_code_inside_an_argparse_namespace_is_not_executed(tmp_path):
    # Namespaces are let through for training checkpoints' arguments; what they hold is still checked.
    marker = tmp_path / "code_ran"
    path = save({"model": {"image_encoder.pos_embed": torch.zeros(1)}, "args": argparse.Namespace(hook=RunsCode(marker))},
                tmp_path / "evil.pth")
    message = load_error(path)
    assert not marker.exists(), "loading a checkpoint executed code from its pickle"
    assert "non-tensor" in message and "io.open" in message


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_unsafe_pickle_error_says_why_and_never_suggests_weights_only_false(tmp_path, writer):
    # torch's own text suggests weights_only=False, which would run the code in the pickle.
    path = tmp_path / "evil.pth"
    payload = {"model": {"image_encoder.pos_embed": RunsCode(tmp_path / "code_ran")}, "epoch": 3}
    if writer == "raw_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch_zip")
    message = load_error(path)
    assert "<path>" in message and "non-tensor" in message and "io.open" in message and "safety" in message
    assert "weights_only" not in message and "will likely succeed" not in message


def test_broken_pickle_error_never_suggests_weights_only_false(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x80\x02garbage that is no pickle" * 10)
    message = load_error(path)
    assert "<path>" in message and "could not read checkpoint" in message
    assert "weights_only" not in message and "will likely succeed" not in message


def test_torchscript_archive_is_named_and_not_run(tmp_path):
    # torch.load would hand a TorchScript zip to torch.jit.load, and fail with an empty message.
    path = tmp_path / "sam_hq_scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), path)
    message = load_error(path)
    assert "TorchScript archive" in message and "state_dict()" in message


def test_zip_that_is_not_a_torch_checkpoint_is_named(tmp_path):
    path = tmp_path / "weights.npz"
    np.savez(path, image_encoder_pos_embed=np.zeros(3))
    message = load_error(path)
    assert "zip archive without torch.save's data.pkl" in message and "image_encoder_pos_embed.npy" in message


def test_git_lfs_pointer_is_named(tmp_path):
    path = tmp_path / "sam_hq_vit_b.pth"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 379000000\n")
    assert "Git LFS pointer" in load_error(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_floating_point_tensor(tiny_sd, tmp_path, dtype, suffix):
    keys = ["mask_decoder.iou_token.weight", "image_encoder.blocks.0.attn.rel_pos_h"]
    state_dict = {**tiny_sd, **{k: tiny_sd[k].to(dtype) for k in keys}}
    message = load_error(save(state_dict, tmp_path / f"ints{suffix}"))
    dtype_name = str(dtype).removeprefix("torch.")
    assert "not floating point" in message
    for key in keys:
        assert f"{key}: {dtype_name}" in message


def test_float64_tensors_are_fine_integer_ones_are_named(tiny_model, tiny_sd, tmp_path):
    # Any floating-point width is fine (tensors are cast to the requested dtype); only the integer one is named.
    doubles = {k: v.double() for k, v in tiny_sd.items()}
    assert_same_model(samhq_fast.load(save(doubles, tmp_path / "fp64.pth"), device="cpu"), tiny_model)
    doubles["mask_decoder.hf_token.weight"] = doubles["mask_decoder.hf_token.weight"].long()
    message = load_error(save(doubles, tmp_path / "fp64_and_int.pth"))
    assert "1 tensors that are not floating point" in message and "mask_decoder.hf_token.weight: int64" in message
    assert "float64" not in message.split("not floating point")[1].replace("float32/float16/bfloat16/float64", "")


@pytest.mark.parametrize("name", ["nope.pth", "nope.safetensors", "no_dir/nope.pth", "nope_folder"])
def test_missing_path(tmp_path, name):
    with pytest.raises(FileNotFoundError):
        samhq_fast.load(tmp_path / name, device="cpu")


@pytest.mark.parametrize("name", ["model.pth", "model.safetensors", "hf_folder"])
def test_home_relative_source(tmp_path, monkeypatch, tiny_sd, tiny_model, name):
    """"~/..." is the user's home folder, as a shell would expand it (a quoted or --opt=~ path is not)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    if name == "hf_folder":
        (tmp_path / name).mkdir()
        save(tiny_sd, tmp_path / name / "model.safetensors")
    else:
        save(tiny_sd, tmp_path / name)
    assert_same_model(samhq_fast.load(f"~/{name}", device="cpu"), tiny_model)


def test_empty_source_is_not_the_current_folder(tmp_path, monkeypatch, tiny_sd):
    """Path("") is ".": an empty --checkpoint must not load whatever model.safetensors sits in the cwd."""
    save(tiny_sd, tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    for source in ("", "  "):
        with pytest.raises(FileNotFoundError, match="checkpoint source is an empty string"):
            samhq_fast.load(source, device="cpu")


@pytest.mark.parametrize("name", ["some_dir/nope.pth", "nope_folder", "some_dir/nope.safetensors"])
def test_missing_relative_file_is_not_a_hub_id(tmp_path, monkeypatch, name):
    # "org/file.pth" looks like a hub id but is a file path, and a hub id has an owner: never try to download these.
    hub = pytest.importorskip("huggingface_hub")

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download a local file path")

    monkeypatch.setattr(hub, "snapshot_download", no_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(name)):
        samhq_fast.load(name, device="cpu")


HUB_ID = "syscv-community/sam-hq-vit-base"


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    message = load_error(HUB_ID)
    assert "<path>" in message and "huggingface_hub" in message  # "<path>" is the hub id


def test_hub_id_without_network(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    message = load_error(HUB_ID)
    assert "<path>" in message and "network is unreachable" in message  # "<path>" is the hub id
    # A mistyped local folder also looks like a hub id: the message must say it is not local either.
    assert "not a local file or folder" in message


def test_hub_id_downloads_and_loads(tiny_model, tiny_checkpoints, tmp_path, monkeypatch):
    # The hub path ends in the same folder reader: fake the download with a local HF folder.
    hub = pytest.importorskip("huggingface_hub")
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(tiny_checkpoints["hf_st"].read_bytes())
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    assert_same_model(samhq_fast.load(HUB_ID, device="cpu"), tiny_model)
    assert calls == [HUB_ID]


def test_hub_id_of_a_sharded_repo(tiny_model, hf_folders, tmp_path, monkeypatch):
    """The download asks for what a sharded safetensors repo needs (index and shards, no pickled
    copy of the weights): the fake hub copies only the files the request's patterns allow."""
    hub = pytest.importorskip("huggingface_hub")
    repo = tmp_path / "repo"
    shutil.copytree(hf_folders["sharded"], repo)
    (repo / "pytorch_model.bin").write_bytes(b"the same weights, pickled")
    snapshot = tmp_path / "snapshot"

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        snapshot.mkdir()
        for f in repo.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    assert_same_model(samhq_fast.load(HUB_ID, device="cpu"), tiny_model)
    assert (snapshot / "model.safetensors.index.json").is_file() and not (snapshot / "pytorch_model.bin").exists()


def test_read_state_dict_rejects_non_path():
    with pytest.raises(TypeError):
        read_state_dict({"not": "a path"})


# ---------------------------------------------------------------------------------------------
# Registry (drop-in for segment_anything_hq.sam_model_registry)


@pytest.mark.parametrize("name, variant", [("vit_b", "vit_b"), ("vit_l", "vit_l"), ("vit_h", "vit_h"), ("default", "vit_h")])
def test_registry_loads_its_variant(real_variant_pth, name, variant):
    model = sam_model_registry[name](checkpoint=real_variant_pth[variant])
    assert model.variant == variant
    assert model.device == torch.device("cpu")  # like the original: built on the CPU
    assert not model.training


@pytest.mark.parametrize("name, variant", [("vit_b", "vit_h"), ("vit_l", "vit_b"), ("default", "vit_l"), ("vit_h", "custom")])
def test_registry_rejects_other_variant(real_variant_pth, tiny_checkpoints, name, variant):
    path = tiny_checkpoints["pth"] if variant == "custom" else real_variant_pth[variant]
    with pytest.raises(CheckpointError) as info:
        sam_model_registry[name](checkpoint=path)
    # The file names contain the variant: look for it in the message without the path.
    assert f"a {variant} checkpoint" in str(info.value).replace(str(path), "<path>")


def test_registry_names_its_variants_for_an_unknown_one():
    with pytest.raises(KeyError, match=re.escape("no SAM-HQ variant 'vit_x' in sam_model_registry: choose from vit_b, vit_l, vit_h, vit_tiny, default")):
        sam_model_registry["vit_x"]
    assert sam_model_registry.get("vit_x") is None and "vit_x" not in sam_model_registry  # still a dict


def test_unknown_variant_name_is_named():
    for build in (SamHQConfig.from_variant, samhq_fast.build_sam_hq):
        with pytest.raises(ValueError, match=re.escape("unknown variant 'vit_x'; expected one of ['vit_b', 'vit_h', 'vit_l', 'vit_tiny']")):
            build("vit_x")


def test_registry_without_checkpoint_builds_random_variant():
    model = sam_model_registry["vit_b"](checkpoint=None)
    assert model.variant == "vit_b"
    assert model.config == SamHQConfig.from_variant("vit_b")
    assert sum(t.numel() for t in model.state_dict().values()) == 94_806_832  # REFERENCE.md: 94.8M
    assert not any(m.training for m in model.modules())


def test_random_light_hq_sam_is_in_eval_mode():
    """TinyViT has BatchNorm: in training mode it would normalize with each batch's statistics."""
    model = samhq_fast.build_sam_hq("vit_tiny", device="cpu")
    assert model.variant == "vit_tiny" and not any(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("dtype", ["fp8", "float64", torch.float64, torch.int8, "int32", 32])
def test_bad_dtype(tiny_checkpoints, dtype):
    with pytest.raises(ValueError, match="dtype"):
        samhq_fast.load(tiny_checkpoints["pth"], device="cpu", dtype=dtype)


@pytest.mark.parametrize("device", ["gpu", "cpu:x", "not a device", 1.5, ["cpu"]])
def test_bad_device(tiny_checkpoints, device):
    with pytest.raises(ValueError, match="device"):
        samhq_fast.load(tiny_checkpoints["pth"], device=device)


@pytest.mark.parametrize("device", ["meta", "xpu", "xpu:0", torch.device("meta")])
def test_unsupported_device(tiny_checkpoints, device):
    # meta would only fail in predict; xpu and the like with a raw error from deep inside torch.
    with pytest.raises(ValueError, match="not supported") as info:
        samhq_fast.load(tiny_checkpoints["pth"], device=device)
    assert all(name in str(info.value) for name in ("'cpu'", "'cuda'", "'cuda:N'", "'mps'"))


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a torch without MPS")
@pytest.mark.parametrize("device", ["mps", "mps:0"])
def test_mps_device_without_mps(tiny_checkpoints, device):
    with pytest.raises(ValueError, match="MPS"):
        samhq_fast.load(tiny_checkpoints["pth"], device=device)


def test_mps_device_runs_eager_only(monkeypatch):
    # Where torch has MPS: accepted, "auto" is eager, and the Triton kernels are refused (not
    # handed MPS tensors, even under TRITON_INTERPRET=1, which is set in this test suite).
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    device = resolve_device("mps")
    assert device == torch.device("mps")
    assert resolve_backend("auto", device, torch.float32) == "eager"
    with pytest.raises(ValueError, match="backend='fused' cannot run here"):
        resolve_backend("fused", device, torch.float32)


def test_cuda_index_beyond_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tiny_checkpoints):
    with pytest.raises(ValueError, match="CUDA"):
        samhq_fast.load(tiny_checkpoints["pth"], device="cuda")


@pytest.mark.parametrize("backend", ["triton", "", "eager ", None, 1])
def test_bad_backend(tiny_checkpoints, backend):
    with pytest.raises(ValueError, match="backend"):
        samhq_fast.load(tiny_checkpoints["pth"], device="cpu", backend=backend)


@pytest.mark.parametrize("backend", ["EAGER", "Eager", "AUTO"])
def test_backend_any_case(tiny_checkpoints, backend):
    assert samhq_fast.load(tiny_checkpoints["pth"], device="cpu", backend=backend).backend == "eager"


def test_auto_backend_is_eager_on_cpu(tiny_checkpoints):
    # Even under the test suite's TRITON_INTERPRET=1: "auto" never picks the (slow) interpreter.
    assert samhq_fast.load(tiny_checkpoints["pth"], device="cpu", backend="auto").backend == "eager"


def test_checkpoint_error_is_a_value_error():
    # Callers catching ValueError (as with the original's load_state_dict errors) still work.
    assert issubclass(CheckpointError, ValueError)


# ---------------------------------------------------------------------------------------------
# 5. dtype and device


@pytest.mark.parametrize("dtype, expected", [
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16), (torch.bfloat16, torch.bfloat16),
    ("fp16", torch.float16), ("float16", torch.float16), ("half", torch.float16), (torch.float16, torch.float16),
    ("fp32", torch.float32), ("float32", torch.float32), (torch.float32, torch.float32), (None, torch.float32),
    ("HALF", torch.float16), ("Float16", torch.float16), ("FP32", torch.float32),
])
def test_dtype_names(dtype, expected):
    # Every spelling load() accepts (checked cheaply; the loads below use a few of them).
    assert resolve_dtype(dtype) == expected


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), (torch.float16, torch.float16), (None, torch.float32)])
def test_dtype(tiny_model, tiny_checkpoints, dtype, expected):
    model = samhq_fast.load(tiny_checkpoints["hf_st"], device="cpu", dtype=dtype)
    assert model.dtype == expected
    reference = tiny_model.state_dict()
    for key, value in model.state_dict().items():  # parameters and buffers alike
        # ...but the prompt encoder's Fourier basis, kept fp32 (see test_dtypes.py)
        kept = torch.float32 if key == GAUSSIAN else expected
        assert value.dtype == kept, key
        assert torch.equal(value, reference[key].to(kept)), key


@pytest.mark.parametrize("device", ["cpu", "CPU", " Cpu", torch.device("cpu")])
def test_device_cpu(tiny_checkpoints, device):
    model = samhq_fast.load(tiny_checkpoints["pth"], device=device)
    assert all(t.device == torch.device("cpu") for t in model.state_dict().values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cuda(tiny_model, tiny_checkpoints):
    model = samhq_fast.load(tiny_checkpoints["pth"], device="cuda", dtype="bf16")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        assert value.device.type == "cuda", key
        kept = torch.float32 if key == GAUSSIAN else torch.bfloat16  # the Fourier basis stays fp32
        assert value.dtype == kept, key
        assert torch.equal(value.cpu(), tiny_model.state_dict()[key].to(kept)), key
