"""The fused backend (Triton kernels in the image encoder) against the eager reference.

On the CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) on the
tiny random model; the GPU tests run real vit_b / vit_h sizes.
"""

import copy
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import samhq_fast
from samhq_fast import SamHQPredictor
from samhq_fast.benchmark.common import rel_l2
from samhq_fast.fused import KILL_SWITCH, FusedBlock, apply_fused_backend
from samhq_fast.graphs import GraphedEncoder
from samhq_fast.modeling import SamHQConfig
from conftest import make_model


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max error relative to the tensor's scale (random-weight tensors have values near 0)."""
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture(scope="module")
def fused_tiny(tiny_model):
    return apply_fused_backend(copy.deepcopy(tiny_model))


def test_fused_swap_keeps_parameters_and_keys(tiny_model, fused_tiny):
    assert fused_tiny.backend == "fused"
    assert all(isinstance(block, FusedBlock) for block in fused_tiny.image_encoder.blocks)
    eager_sd, fused_sd = tiny_model.state_dict(), fused_tiny.state_dict()
    assert list(eager_sd) == list(fused_sd)
    assert all(torch.equal(eager_sd[k], fused_sd[k]) for k in eager_sd)


def tiny_attention_launches(encoder) -> int:
    """Attention launches per image batch of the tiny encoder: one per block, and one more per
    windowed block, whose 14 x 14 windows pass the 16 x 16 grid: interior and border windows apart."""
    assert encoder.grid_size % encoder.window_size != 0 and encoder.grid_size > encoder.window_size
    return 2 * encoder.depth - len(encoder.global_attn_indexes)


def test_fused_encoder_matches_eager_fp32(tiny_model, fused_tiny, kernel_spies):
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_model.encode_image(images)
        assert not any(spy.launches for spy in kernel_spies.values())
        got = fused_tiny.encode_image(images)
    for name, g, e in zip(("embeddings", "early ViT features", "HQ features"), got, expected):
        assert rel_error(g, e) < 1e-4, name
    # The kernels computed it (not torch ops behind the same names), with exact fp32 dots (no TF32).
    depth = tiny_model.config.encoder.depth
    launches = {name: spy.launches for name, spy in kernel_spies.items()}
    expected = {"attention": tiny_attention_launches(tiny_model.config.encoder), "rel_pos_terms": 2 * depth, "linear": 4 * depth}
    assert {name: len(runs) for name, runs in launches.items()} == expected
    precisions = [run.get("DOT_PRECISION", run.get("INPUT_PRECISION")) for runs in launches.values() for run in runs]
    assert set(precisions) == {"ieee"}


def test_fused_encoder_refuses_autograd(tiny_model, fused_tiny, kernel_spies):
    """The kernels have no backward: with autograd on, the eager encoder gives gradients, and the
    fused one must not hand back outputs that silently lack them."""
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    embeddings = tiny_model.encode_image(images)[0]
    assert embeddings.requires_grad  # the eager model (loaded weights require grad) trains
    with pytest.raises(RuntimeError, match="inference-only"):
        fused_tiny.encode_image(images)
    assert not kernel_spies["attention"].launches
    block = copy.deepcopy(fused_tiny.image_encoder.blocks[0]).requires_grad_(False)  # frozen weights
    tokens = torch.randn(1, 16, 16, 160, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        block(tokens)  # ... and a differentiable input
    assert block(tokens.detach()).shape == tokens.shape  # autograd on, but nothing to differentiate
    block.mlp.lin1.weight.requires_grad_(True)  # fine-tuning one layer of a frozen encoder
    with pytest.raises(RuntimeError, match="inference-only"):
        block(tokens.detach())


def test_fused_predictor_matches_eager(tiny_checkpoints, kernel_spies):
    """load(backend="fused") end to end: same masks and scores as the eager backend, for every
    multimask_output / hq_token_only combination (one compiled decoder graph serves them all)."""
    photo = np.random.default_rng(1).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    prompts = dict(point_coords=np.array([[[60, 50], [200, 120]], [[150, 100], [20, 170]]]),
                   point_labels=np.array([[1, 0], [1, 1]]), box=np.array([[10, 20, 150, 160], [90, 40, 235, 175]]))
    flag_sets = [(True, False), (False, False), (False, True), (True, True)]
    outputs = {}
    for backend in ("eager", "fused"):
        model = samhq_fast.load(tiny_checkpoints["pth"], device="cpu", backend=backend)
        assert model.backend == backend
        predictor = SamHQPredictor(model)
        predictor.set_image(photo)
        outputs[backend] = [predictor.predict(**prompts, multimask_output=m, hq_token_only=hq) for m, hq in flag_sets]
        assert (predictor._prompt_decoder is not None) == (backend == "fused")  # the compiled decoder
        # the Triton attention ran in every ViT block of the fused encoder, never in the eager one
        assert len(kernel_spies["attention"].launches) == (tiny_attention_launches(model.config.encoder) if backend == "fused" else 0)
    for flags, eager, fused in zip(flag_sets, outputs["eager"], outputs["fused"]):
        (masks_e, scores_e, logits_e), (masks_f, scores_f, logits_f) = eager, fused
        np.testing.assert_allclose(scores_f, scores_e, atol=1e-5, err_msg=str(flags))
        np.testing.assert_allclose(logits_f, logits_e, atol=1e-4 * np.abs(logits_e).max(), err_msg=str(flags))
        # Masks may only differ where the logit is within rounding of the threshold.
        assert (masks_f != masks_e).sum() <= 10, flags


@pytest.mark.parametrize("value", ["1", "true", " YES "])
def test_kill_switch_falls_back_to_eager(tiny_checkpoints, tiny_model, monkeypatch, value):
    """load and apply_fused_backend alike: the eager model, with a warning."""
    monkeypatch.setenv(KILL_SWITCH, value)
    with pytest.warns(UserWarning, match=KILL_SWITCH):
        model = samhq_fast.load(tiny_checkpoints["pth"], device="cpu", backend="fused")
    assert model.backend == "eager"
    assert not any(isinstance(block, FusedBlock) for block in model.image_encoder.blocks)
    model = copy.deepcopy(tiny_model)
    with pytest.warns(UserWarning, match=KILL_SWITCH):
        assert apply_fused_backend(model) is model
    assert model.backend == "eager" and not any(isinstance(block, FusedBlock) for block in model.image_encoder.blocks)


@pytest.mark.parametrize("value", ["", "0", "false", " Off "])
def test_kill_switch_off_values_keep_fused(tiny_checkpoints, monkeypatch, value):
    """SAMHQ_FAST_DISABLE_FUSED=0 / false / off (or empty) means "not disabled", as such switches usually do."""
    monkeypatch.setenv(KILL_SWITCH, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = samhq_fast.load(tiny_checkpoints["pth"], device="cpu", backend="fused")
    assert model.backend == "fused" and all(isinstance(block, FusedBlock) for block in model.image_encoder.blocks)
    assert not any(m.training for m in model.modules())  # load returns an eval-mode model, fused or not


@pytest.mark.parametrize("value", ["1", "true", "On", "0", "off", ""])
def test_interpreter_switch_is_read_as_triton_reads_it(monkeypatch, value):
    """Triton interprets for TRITON_INTERPRET=true / on as well as 1: samhq_fast's checks follow what
    @triton.jit does (else a CPU tensor under TRITON_INTERPRET=true was refused as 'needs a CUDA
    device', and on a GPU interpreted kernels were timed and graph-captured as compiled ones)."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from samhq_fast.kernels import interpreting
    from samhq_fast.switches import triton_interpreter_on

    monkeypatch.setenv("TRITON_INTERPRET", value)

    @triton.jit
    def noop(x_ptr):
        pass

    interpreted = isinstance(noop, InterpretedFunction)
    assert triton_interpreter_on() == interpreted
    if interpreted:
        assert interpreting(torch.zeros(2), "test")
    else:
        with pytest.raises(RuntimeError, match="CUDA device"):
            interpreting(torch.zeros(2), "test")


def test_build_sam_hq_applies_the_fused_backend():
    """build_sam_hq (random weights: tests, benchmarks) honours backend= as load does: the benchmark
    would otherwise time eager under the fused name."""
    from conftest import TINY_CONFIG

    model = samhq_fast.build_sam_hq(TINY_CONFIG, device="cpu", backend="fused")
    assert model.backend == "fused" and all(isinstance(block, FusedBlock) for block in model.image_encoder.blocks)
    assert not any(m.training for m in model.modules())


def test_load_refuses_fused_bf16_in_the_interpreter_before_reading(tmp_path):
    """The backend is checked for the asked dtype before the (possibly large) file is read."""
    with pytest.raises(ValueError, match="bfloat16 cannot run in the Triton interpreter"):
        samhq_fast.load(tmp_path / "not_there.pth", device="cpu", dtype="bf16", backend="fused")


def test_fused_on_cpu_without_interpreter_is_a_clear_error(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA device"):
        samhq_fast.load(tiny_checkpoints["pth"], device="cpu", backend="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" on the CPU quietly picks eager
        assert samhq_fast.load(tiny_checkpoints["pth"], device="cpu", backend="auto").backend == "eager"


def test_interpreter_set_after_import_is_a_clear_error(tiny_checkpoints):
    """Triton fixes interpreted vs compiled when it is imported (`import samhq_fast` does that): a
    TRITON_INTERPRET=1 set later is refused by load, not a failure deep inside Triton at set_image."""
    script = (
        "import os, samhq_fast\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        f"    samhq_fast.load({str(tiny_checkpoints['pth'])!r}, device='cpu', backend='fused')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "backend='fused' cannot run here: TRITON_INTERPRET=1 was set after Triton was imported" in out.stdout


def test_interpreter_too_old_for_numpy_is_refused_at_load(tmp_path, monkeypatch):
    """Triton < 3.7's interpreter fails deep inside itself with NumPy >= 2.4: refused by load with
    the reason (before the file is read), not at the first forward."""
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.4.1")
    with pytest.raises(ValueError, match="backend='fused' cannot run here: the Triton interpreter of triton 3.6.0 cannot run with numpy 2.4.1"):
        samhq_fast.load(tmp_path / "not_there.pth", device="cpu", backend="fused")


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    """resolve_backend asks torch for the CUDA device's compute capability: answer for a GPU this
    machine does not have."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_auto_backend_choice(monkeypatch):
    """"auto": fused on CUDA in bf16 / fp16 (measured faster there), eager in fp32 (the default dtype),
    on the CPU, and under the kill switch."""
    from samhq_fast import build

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert build.resolve_backend("auto", cuda, torch.bfloat16) == "fused"
    assert build.resolve_backend("auto", cuda, torch.float16) == "fused"
    assert build.resolve_backend("auto", cuda, torch.float32) == "eager"
    assert build.resolve_backend("auto", cuda) == "eager"
    assert build.resolve_backend("auto", cpu, torch.float32) == "eager"
    monkeypatch.setenv(KILL_SWITCH, "1")
    assert build.resolve_backend("auto", cuda, torch.bfloat16) == "eager"


def test_fused_needs_ampere(monkeypatch):
    """Below compute capability 8.0 (a T4, a V100) Triton's dots run without tensor cores and bf16
    does not compile at all: "fused" is refused there with the way out, and "auto" stays eager."""
    from samhq_fast import build

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        with pytest.raises(ValueError, match=r"compute capability 8.0 or newer \(Ampere\), but Tesla T4 is 7.5: use backend='eager'"):
            build.resolve_backend("fused", cuda, dtype)
        assert build.resolve_backend("auto", cuda, dtype) == "eager"
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100")
    assert all(build.resolve_backend("fused", cuda, dtype) == "fused" for dtype in (torch.bfloat16, torch.float16, torch.float32))


def test_fused_bf16_in_the_interpreter_is_a_clear_error(tiny_checkpoints, tiny_model):
    """The interpreter's bf16 tl.dot returns garbage (triton #11584): refused, not a wrong answer."""
    with pytest.raises(ValueError, match="bfloat16 cannot run in the Triton interpreter"):
        samhq_fast.load(tiny_checkpoints["pth"], device="cpu", dtype="bf16", backend="fused")
    with pytest.raises(ValueError, match="bfloat16 cannot run in the Triton interpreter"):
        apply_fused_backend(copy.deepcopy(tiny_model).to(torch.bfloat16))
    assert samhq_fast.load(tiny_checkpoints["pth"], device="cpu", dtype="bf16", backend="auto").backend == "eager"


# ---------------------------------------------------------------------------------------------
# Real sizes on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["vit_b", "vit_h"])
def test_fused_encoder_matches_eager_real_size_gpu(variant, tf32_off):
    eager = make_model(SamHQConfig.from_variant(variant)).cuda()
    images = torch.randn(2, 3, 1024, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        expected = eager.encode_image(images)
        fused = apply_fused_backend(copy.deepcopy(eager))
        got = fused.encode_image(images)
        for g, e in zip(got, expected):  # fp32, TF32 off: ~1e-4 relative
            assert rel_error(g, e) < 1e-4
        # bf16 / fp16: the fused path must be as accurate as the eager path in that dtype, both against fp32.
        for dtype in (torch.bfloat16, torch.float16):
            images16 = images.to(dtype)
            got16 = copy.deepcopy(fused).to(dtype).encode_image(images16)
            eager16 = copy.deepcopy(eager).to(dtype).encode_image(images16)
            for g, e16, e in zip(got16, eager16, expected):
                assert torch.isfinite(e16).all(), f"eager {dtype} overflows"
                assert rel_l2(g, e) <= 1.25 * rel_l2(e16, e) + 1e-3, dtype


@pytest.mark.gpu
@pytest.mark.parametrize("encoder_graphs", [False, True, None])
def test_hot_path_has_no_host_sync_gpu(tiny_checkpoints, encoder_graphs):
    """Frames on the GPU in, tensors out: set_image on a uint8 CUDA tensor and predict_torch with
    CUDA prompts (N = 2, and N = 0: a frame without detections) must not synchronize with the host
    (after the compile / CUDA-graph warm-up)."""
    model = samhq_fast.load(tiny_checkpoints["pth"], device="cuda", backend="fused")
    predictor = SamHQPredictor(model, encoder_graphs=encoder_graphs)
    frame = torch.randint(0, 256, (180, 240, 3), dtype=torch.uint8, device="cuda")
    boxes = torch.tensor([[10.0, 20.0, 150.0, 160.0], [60.0, 5.0, 250.0, 190.0]], device="cuda")  # input frame
    for _ in range(3):  # warm-up: Triton compiles, torch.compile, CUDA graph recording
        predictor.set_image(frame)
        predictor.predict_torch(None, None, boxes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        predictor.set_image(frame)
        masks, scores, low_res = predictor.predict_torch(None, None, boxes)
        no_masks, no_scores, _ = predictor.predict_torch(None, None, boxes[:0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert masks.is_cuda and masks.shape == (2, 1, 180, 240)
    assert no_masks.is_cuda and no_masks.shape == (0, 1, 180, 240) and no_scores.dtype == scores.dtype


@pytest.mark.gpu
def test_frame_batch_has_no_host_sync_gpu(tiny_checkpoints):
    """set_images on a uint8 CUDA clip [B, 3, H, W] (converted, resized and encoded as one batch) and
    predict_batch_torch with CUDA boxes (one padded decoder call for all frames) do not synchronize
    with the host; the clip's features equal the same frames given as a list."""
    model = samhq_fast.load(tiny_checkpoints["pth"], device="cuda", backend="fused")
    predictor = SamHQPredictor(model)
    clip = torch.randint(0, 256, (4, 3, 180, 240), dtype=torch.uint8, device="cuda")
    boxes = [{"boxes": torch.tensor([[10.0, 20.0, 150.0, 160.0]] * n, device="cuda")} for n in (1, 2, 1, 3)]  # input frame
    for _ in range(3):  # warm-up: Triton compiles, torch.compile, CUDA graph recording
        predictor.set_images(clip)
        predictor.predict_batch_torch(boxes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        predictor.set_images(clip)
        results = predictor.predict_batch_torch(boxes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [r[0].shape for r in results] == [(n, 1, 180, 240) for n in (1, 2, 1, 3)] and results[0][0].is_cuda
    listed = SamHQPredictor(model)
    listed.set_images(list(clip))
    assert predictor.input_sizes == listed.input_sizes == [(192, 256)] * 4
    torch.testing.assert_close(predictor.features, listed.features)
    torch.testing.assert_close(predictor.hq_features, listed.hq_features)


@pytest.mark.gpu
def test_graphed_fused_encoder_gpu(tiny_model):
    """GraphedEncoder replays one CUDA graph per batch size: the same outputs as direct calls, for two
    inputs alternating through one graph (a stale replay would show), at batch 1 and 2."""
    model = apply_fused_backend(copy.deepcopy(tiny_model).cuda())
    graphed = GraphedEncoder(model)
    gen = torch.Generator("cuda").manual_seed(0)
    for batch in (1, 2):
        inputs = [torch.randn(batch, 3, 256, 256, device="cuda", generator=gen) for _ in range(2)]
        for images in inputs + inputs:
            with torch.inference_mode():
                expected = model.encode_image(images)
            got = graphed(images)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert len(graphed._graphs.graphs) == 2


@pytest.mark.gpu
def test_graphed_encoder_follows_a_model_cast_gpu(tiny_model):
    """A graph replays the weight addresses it captured: after model.half() and back to float32 (new
    weight tensors, the old ones freed) the encoder is captured again, not replayed from freed memory."""
    model = apply_fused_backend(copy.deepcopy(tiny_model).cuda())
    graphed = GraphedEncoder(model)
    images = torch.randn(1, 3, 256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    graphed(images)
    model.half()
    graphed(images.half())
    model.float()
    with torch.inference_mode():
        expected = model.encode_image(images)
    for g, e in zip(graphed(images), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_graphed_encoder_follows_weights_assigned_to_a_block_gpu(tiny_model):
    """load_state_dict(assign=True) on one block's MLP gives it new weight tensors and leaves the
    model's first weight as it was: the encoder must be captured again, not replayed on the old ones."""
    model = apply_fused_backend(copy.deepcopy(tiny_model).cuda())
    graphed = GraphedEncoder(model)
    images = torch.randn(1, 3, 256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    graphed(images)
    mlp = model.image_encoder.blocks[-1].mlp
    old_weights = mlp.state_dict()  # kept alive: no new tensor can take an old one's address
    mlp.load_state_dict({name: 2 * t for name, t in old_weights.items()}, assign=True)
    with torch.inference_mode():
        expected = model.encode_image(images)
    for g, e in zip(graphed(images), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_predictor_with_encoder_graphs_gpu(tiny_checkpoints):
    """SamHQPredictor(encoder_graphs=True) gives what the plain predictor gives, for frames that
    alternate through one graph (a stale replay would repeat the previous frame's masks) and for a
    two-image set_images batch (a second graph)."""
    model = samhq_fast.load(tiny_checkpoints["pth"], device="cuda", backend="fused")
    plain, graphed = SamHQPredictor(model, encoder_graphs=False), SamHQPredictor(model, encoder_graphs=True)
    gen = torch.Generator("cuda").manual_seed(4)
    frames = [torch.randint(0, 256, (180, 240, 3), dtype=torch.uint8, device="cuda", generator=gen) for _ in range(2)]
    box = np.array([[10, 20, 150, 160]])
    for frame in frames + frames:
        expected, got = [], []
        for predictor, out in ((plain, expected), (graphed, got)):
            predictor.set_image(frame)
            out.extend(predictor.predict(box=box, return_logits=True))
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())
    prompts = [{"box": box}, {"box": box + 5}]
    results = []
    for predictor in (plain, graphed):
        predictor.set_images(frames)
        results.append(predictor.predict_batch(prompts, return_logits=True))
    for got_image, expected_image in zip(results[1], results[0]):
        for g, e in zip(got_image, expected_image):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())
    assert len(graphed._graphed_encoder._graphs.graphs) == 2  # batch 1 and batch 2


@pytest.mark.gpu
def test_fused_model_on_a_second_gpu(tiny_model):
    """Triton launches on the current device: a fused model on cuda:1 (cuda:0 current) must run its
    kernels and its encoder graph there and match eager."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    eager = copy.deepcopy(tiny_model).to("cuda:1")
    fused = apply_fused_backend(copy.deepcopy(tiny_model).to("cuda:1"))
    images = torch.randn(1, 3, 256, 256, device="cuda:1")
    with torch.cuda.device(0), torch.inference_mode():
        expected = eager.encode_image(images)
        for got in (fused.encode_image(images), GraphedEncoder(fused)(images)):
            for g, e in zip(got, expected):
                assert g.device == e.device and rel_error(g, e) < 1e-4


def test_default_encoder_graphs_are_for_batch_1_of_a_fused_cuda_model(tiny_model, monkeypatch):
    """encoder_graphs=None replays batch-1 encoder calls of a fused CUDA model from a graph (where the
    H200 bench measured it faster) and runs other batch sizes, eager and CPU models plainly; True
    graphs every batch size, False none. (A stand-in graph encoder and a model that says it is on
    CUDA: the real graphs are tested on the GPU.)"""
    from samhq_fast import predictor as predictor_module
    from samhq_fast.modeling import SamHQ

    replayed = []

    class RecordingGraphedEncoder:
        def __init__(self, model):
            self.model = model

        def __call__(self, images):
            replayed.append(len(images))
            return self.model.encode_image(images)

    monkeypatch.setattr(predictor_module, "GraphedEncoder", RecordingGraphedEncoder)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU machine (the kernels imported here stay interpreted)
    model = copy.deepcopy(tiny_model)
    cases = [("cuda", "fused", None, [1]), ("cuda", "eager", None, []), ("cpu", "fused", None, []),
             ("cuda", "fused", True, [1, 2]), ("cuda", "eager", True, [1, 2]), ("cuda", "fused", False, [])]
    for device, backend, encoder_graphs, expected in cases:
        monkeypatch.setattr(SamHQ, "device", property(lambda self: torch.device(device)))
        model.backend = backend
        predictor = SamHQPredictor(model, encoder_graphs=encoder_graphs)
        replayed.clear()
        with torch.inference_mode():
            for batch in (1, 2):
                predictor._encode(torch.zeros(batch, 3, 256, 256))
        assert replayed == expected, (device, backend, encoder_graphs)
    # No default graphs for a fused TinyViT model (its encoder stays eager, never captured on the GPU)
    # nor under the Triton interpreter (its host copies cannot be captured).
    monkeypatch.setattr(SamHQ, "device", property(lambda self: torch.device("cuda")))
    with torch.device("meta"):
        light = SamHQ(SamHQConfig.from_variant("vit_tiny"))
    light.backend = model.backend = "fused"
    assert SamHQPredictor(light)._graphed_encoder is None and SamHQPredictor(model)._graphed_encoder is not None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert SamHQPredictor(model)._graphed_encoder is None
    with pytest.raises(TypeError, match="encoder_graphs must be True, False or None"):
        SamHQPredictor(model, encoder_graphs="batch 1")


def test_graphed_encoder_needs_cuda(tiny_model):
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedEncoder(tiny_model)
    with pytest.raises(ValueError, match="CUDA device"):
        SamHQPredictor(tiny_model, encoder_graphs=True)


def test_fused_fp16_predictor_on_cpu(tiny_checkpoints):
    """fp16 through the fused encoder (interpreter) and the compiled padded decoder (with the CPU
    workaround for Inductor's half-precision transposes): finite, and as close to eager fp16 as fp16
    allows."""
    photo = np.random.default_rng(2).integers(0, 256, (160, 200, 3), dtype=np.uint8)
    outputs = {}
    for backend in ("eager", "fused"):
        predictor = SamHQPredictor(samhq_fast.load(tiny_checkpoints["pth"], device="cpu", dtype="fp16", backend=backend))
        predictor.set_image(photo)
        outputs[backend] = predictor.predict(box=np.array([[20, 30, 150, 140], [5, 5, 195, 155]]))
    (masks_e, scores_e, logits_e), (masks_f, scores_f, logits_f) = outputs["eager"], outputs["fused"]
    assert np.isfinite(logits_f).all() and np.isfinite(scores_f).all()
    assert rel_l2(torch.from_numpy(logits_f), torch.from_numpy(logits_e)) < 1e-2
    assert (masks_f == masks_e).mean() > 0.99
    np.testing.assert_allclose(scores_f, scores_e, rtol=0, atol=2e-3)  # ~8 fp16 steps at these scores (~0.25)
