"""kernels/autotune.py: the per-shape config choice and its on-disk cache, and every candidate
config of the kernel families (each must compute the same function: the tuner only times them).

The choice logic is driven by a fake timer here (no GPU timing on the CPU); the candidates run in
the Triton interpreter at small awkward shapes, and at real shapes in the GPU-marked test.
"""

import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from samhq_fast.kernels import attention, autotune, conv3x3, fused_linear, layer_norm
from test_kernels_attention import check as check_attention
from test_kernels_linear import make_inputs, reference

CPU = torch.device("cpu")
CANDIDATES = [{"tile": 64}, {"tile": 128}, {"tile": 256}]
KEY = ("torch.float16", 4096, 1280, 5120, "gelu", True, False)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder and no in-process choices, for every test."""
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(autotune, "_chosen", {})
    monkeypatch.setattr(autotune, "_untuned", {})
    return tmp_path


def timer(times: dict, calls: list):
    """time_ms from a table {tile: ms}; a missing tile raises like a config that does not fit."""
    def time_ms(config):
        calls.append(config["tile"])
        if config["tile"] not in times:
            raise RuntimeError("out of resources: shared memory")
        return times[config["tile"]]
    return time_ms


def test_picks_the_fastest_and_caches_it_on_disk(fresh_cache, monkeypatch):
    calls = []
    best = autotune.pick("k", KEY, CANDIDATES, timer({64: 3.0, 128: 1.0, 256: 2.0}, calls), CPU)
    assert best == {"tile": 128} and calls == [64, 128, 256]
    entries = json.loads((fresh_cache / autotune.CACHE_FILE).read_text())
    assert entries == {autotune.file_key("cpu", "k", KEY, CANDIDATES): {"tile": 128}}
    assert "triton" in next(iter(entries)) and "4096/1280/5120" in next(iter(entries))
    # same process: from memory; a new process (empty memory): from the file; neither times again
    assert autotune.pick("k", KEY, CANDIDATES, timer({}, calls), CPU) == {"tile": 128}
    monkeypatch.setattr(autotune, "_chosen", {})
    assert autotune.pick("k", KEY, CANDIDATES, timer({}, calls), CPU) == {"tile": 128}
    assert calls == [64, 128, 256]


def test_other_shapes_and_kernels_are_timed_separately(fresh_cache):
    calls = []
    autotune.pick("k", KEY, CANDIDATES, timer({64: 1.0, 128: 2.0, 256: 3.0}, calls), CPU)
    other = autotune.pick("k", KEY[:1] + (8192,) + KEY[2:], CANDIDATES, timer({64: 3.0, 128: 2.0, 256: 1.0}, calls), CPU)
    again = autotune.pick("j", KEY, CANDIDATES, timer({64: 3.0, 128: 1.0, 256: 3.0}, calls), CPU)
    assert other == {"tile": 256} and again == {"tile": 128} and len(calls) == 9
    assert len(json.loads((fresh_cache / autotune.CACHE_FILE).read_text())) == 3


def test_a_failing_candidate_is_skipped_and_all_failing_is_an_error():
    calls = []
    assert autotune.pick("k", KEY, CANDIDATES, timer({64: 5.0, 256: 4.0}, calls), CPU) == {"tile": 256}
    with pytest.raises(RuntimeError, match=r"(?s)k: every candidate config failed.*out of resources"):
        autotune.pick("k", ("other",), CANDIDATES, timer({}, []), CPU)




def launcher(launchable: set, calls: list):
    """launch(config) -> its tile; a tile not in `launchable` raises Triton's OutOfResources, as a
    kernel whose shared memory exceeds the GPU's does before anything is queued."""
    def launch(config):
        calls.append(config["tile"])
        if config["tile"] not in launchable:
            raise OutOfResources(98304, 65536, "shared memory")
        return config["tile"]
    return launch


def test_untuned_run_passes_over_a_default_that_does_not_fit(fresh_cache):
    calls = []
    assert autotune.run("k", KEY, CANDIDATES, launcher({128, 256}, calls), CPU) == 128
    assert calls == [64, 128]
    # remembered for this process (the default is not tried again), never written to the cache file
    assert autotune.run("k", KEY, CANDIDATES, launcher({128, 256}, calls), CPU) == 128
    assert calls == [64, 128, 128] and not (fresh_cache / autotune.CACHE_FILE).exists()
    # another shape starts from the default again
    assert autotune.run("k", ("other",), CANDIDATES, launcher({64}, calls), CPU) == 64
    with pytest.raises(RuntimeError, match=r"(?s)k: no candidate config fits this GPU.*shared memory"):
        autotune.run("k", ("none fits",), CANDIDATES, launcher(set(), []), CPU)


def test_untuned_run_lets_other_errors_through():
    """Only "does not fit" moves on to the next candidate: a real bug in a launch is not hidden."""
    def broken(config):
        raise ValueError("bad stride")
    with pytest.raises(ValueError, match="bad stride"):
        autotune.run("k", KEY, CANDIDATES, broken, CPU)


def test_untuned_run_launches_the_default_and_caches_nothing(fresh_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "bench_ms", lambda fn: {64: 3.0, 128: 1.0, 256: 2.0}[fn()])
    monkeypatch.setattr(autotune, "tuning_enabled", lambda device: False)
    assert autotune.run("k", KEY, CANDIDATES, launcher({64, 128, 256}, calls), CPU) == 64
    assert calls == [64] and not (fresh_cache / autotune.CACHE_FILE).exists()
    # a later tuned call still times (the default was not remembered as a choice)
    monkeypatch.setattr(autotune, "tuning_enabled", lambda device: True)
    assert autotune.run("k", KEY, CANDIDATES, launcher({64, 128, 256}, calls), CPU) == 128
    assert calls == [64, 64, 128, 256, 128]


def test_run_uses_the_timed_choice(monkeypatch):
    """Tuning on: every candidate is timed once, then the fastest launched; with tuning off later
    (e.g. during a CUDA graph capture) the same process keeps launching that choice."""
    monkeypatch.setattr(autotune, "tuning_enabled", lambda device: True)
    monkeypatch.setattr(autotune, "bench_ms", lambda fn: {64: 3.0, 128: 1.0, 256: 2.0}[fn()])
    calls = []
    assert autotune.run("k", KEY, CANDIDATES, launcher({64, 128, 256}, calls), CPU) == 128
    assert calls == [64, 128, 256, 128]
    monkeypatch.setattr(autotune, "tuning_enabled", lambda device: False)
    assert autotune.run("k", KEY, CANDIDATES, launcher({64, 128, 256}, calls), CPU) == 128


def test_corrupt_or_stale_cache_is_timed_again(fresh_cache, monkeypatch):
    path = fresh_cache / autotune.CACHE_FILE
    path.write_text("{not json")
    calls = []
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        assert autotune.pick("k", KEY, CANDIDATES, timer({64: 2.0, 128: 1.0, 256: 3.0}, calls), CPU) == {"tile": 128}
    assert json.loads(path.read_text())  # rewritten as valid JSON
    # an entry naming a config that is no longer a candidate is not trusted
    path.write_text(json.dumps({autotune.file_key("cpu", "k", KEY, CANDIDATES): {"tile": 32}}))
    monkeypatch.setattr(autotune, "_chosen", {})
    calls.clear()
    assert autotune.pick("k", KEY, CANDIDATES, timer({64: 1.0, 128: 2.0, 256: 3.0}, calls), CPU) == {"tile": 64}
    assert calls == [64, 128, 256]
    # a hand-edited 256.0 selects the candidate 256, whose own (int) value is launched: Triton would
    # take a float as a different constexpr
    path.write_text(json.dumps({autotune.file_key("cpu", "k", KEY, CANDIDATES): {"tile": 256.0}}))
    monkeypatch.setattr(autotune, "_chosen", {})
    chosen = autotune.pick("k", KEY, CANDIDATES, timer({}, calls), CPU)
    assert chosen == {"tile": 256} and type(chosen["tile"]) is int


def test_a_new_candidate_list_is_timed_again(fresh_cache, monkeypatch):
    """A choice cached among fewer candidates (an older release) is not kept when a faster candidate
    joins the list, though that choice is still among the candidates."""
    calls = []
    assert autotune.pick("k", KEY, CANDIDATES[:2], timer({64: 2.0, 128: 1.0}, calls), CPU) == {"tile": 128}
    monkeypatch.setattr(autotune, "_chosen", {})  # a new process, with the same cache file
    assert autotune.pick("k", KEY, CANDIDATES, timer({64: 2.0, 128: 1.0, 256: 0.5}, calls), CPU) == {"tile": 256}
    assert calls == [64, 128, 64, 128, 256]
    assert len(json.loads((fresh_cache / autotune.CACHE_FILE).read_text())) == 2


def test_unwritable_cache_folder_warns_and_keeps_the_choice(fresh_cache, monkeypatch):
    blocker = fresh_cache / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(blocker / "cache"))  # a folder inside a file: mkdir fails, even as root
    with pytest.warns(UserWarning, match="could not write the autotune cache"):
        best = autotune.pick("k", KEY, CANDIDATES, timer({64: 2.0, 128: 1.0, 256: 3.0}, []), CPU)
    assert best == {"tile": 128}
    assert autotune.pick("k", KEY, CANDIDATES, timer({}, []), CPU) == {"tile": 128}  # kept in memory


def test_concurrent_writers_keep_the_file_valid(fresh_cache):
    """Threads of one process (e.g. one model per GPU) write at once: each through its own temporary
    file, so the cache is never half-written and no writer fails."""
    path = fresh_cache / autotune.CACHE_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "could not write" nor "unreadable"
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: autotune._write_cache(path, f"key {i}", {"tile": i}), range(200)))
    entries = json.loads(path.read_text())
    assert entries and all(entries[key] == {"tile": int(key.split()[1])} for key in entries)
    assert not list(fresh_cache.glob("*.tmp"))


def test_cache_path_that_is_a_folder_warns_and_leaves_no_files(fresh_cache):
    (fresh_cache / autotune.CACHE_FILE).mkdir()
    with pytest.warns(UserWarning) as record:  # the unreadable cache, then the failed write
        autotune._write_cache(fresh_cache / autotune.CACHE_FILE, "k", {"tile": 64})
    assert any("could not write the autotune cache" in str(w.message) for w in record)
    assert sorted(p.name for p in fresh_cache.iterdir()) == [autotune.CACHE_FILE]


def test_tuning_switches(monkeypatch):
    """Never in the interpreter, never on the CPU, never while a CUDA graph is being captured (timing
    syncs), never with SAMHQ_FAST_AUTOTUNE=0 (or false / off / no)."""
    cuda = torch.device("cuda", 0)
    assert not autotune.tuning_enabled(CPU)  # conftest runs the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not autotune.tuning_enabled(CPU)
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    for capturing in (True, False):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        assert autotune.tuning_enabled(cuda) is not capturing
    for off in ("0", "false", " OFF ", "no"):
        monkeypatch.setenv(autotune.AUTOTUNE_ENV, off)
        assert not autotune.tuning_enabled(cuda), off
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "")  # blank: the default, on
    assert autotune.tuning_enabled(cuda)


def test_each_gpu_model_is_timed_separately(fresh_cache, monkeypatch):
    """A choice timed on one GPU model is not reused on another (same kernel and shape)."""
    calls = []
    for name in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB"):
        monkeypatch.setattr(autotune, "device_name", lambda device: name)
        monkeypatch.setattr(autotune, "_chosen", {})  # a new process on that GPU
        autotune.pick("k", KEY, CANDIDATES, timer({64: 3.0, 128: 1.0, 256: 2.0}, calls), CPU)
    assert calls == [64, 128, 256] * 2
    assert len(json.loads((fresh_cache / autotune.CACHE_FILE).read_text())) == 2


@pytest.fixture
def tuning_keys(monkeypatch) -> dict:
    """The keys each kernel family asks the tuner for, {family: [key, ...]}. The keys are built on the
    compiled path: stand-ins for the interpreter check and the tuner let it run on the CPU."""
    keys = {"fused_linear": [], "rel_pos_attention": [], "layer_norm": [], "conv3x3": []}
    torch_ops = {"fused_linear": fused_linear.TORCH_OP, "layer_norm": layer_norm.TORCH_OP, "conv3x3": conv3x3.TORCH_OP}

    def record(kernel, key, candidates, launch, device):
        keys[kernel].append(key)
        return launch(torch_ops.get(kernel, attention.INTERPRETER_CONFIG))

    for module in (fused_linear, attention, layer_norm, conv3x3):
        monkeypatch.setattr(module, "interpreting", lambda x, who: False)
        monkeypatch.setattr(module.autotune, "run", record)
    return keys


def test_tuning_keys_tell_dtypes_apart(tuning_keys):
    """Each kernel family keys its choice by dtype: a tile timed for fp32 is not reused for fp16
    (the GEMM and attention candidates differ too)."""
    for dtype in (torch.float32, torch.float16):
        x, w, b, _ = make_inputs((5,), 32, 24, dtype)
        fused_linear.fused_linear(x, w, b)
        attention.rel_pos_attention(x.new_zeros(1, 3, 4, 96), x.new_zeros(96), x.new_zeros(5, 16), x.new_zeros(7, 16), 2, 0)
        layer_norm.layer_norm(x, x.new_ones(32), x.new_zeros(32), 1e-6)
        conv3x3.conv3x3_ln_gelu(x.new_zeros(2, 3, 4, 4), x.new_zeros(5, 3, 3, 3), x.new_zeros(5), x.new_ones(5), x.new_zeros(5), 1e-6)
    assert all(len(family) == 2 and family[0] != family[1] for family in tuning_keys.values()), tuning_keys


def test_tuning_keys_tell_launch_variants_apart(tuning_keys):
    """A choice is reused only for the same launch: the fused linear's key holds its epilogue
    (activation, residual), the attention's its window (a global block's tiles spill in a windowed
    one, and the candidate lists differ), the 3x3 convolution's its epilogue."""
    x, w, b, residual = make_inputs((6,), 32, 24, torch.float32, residual=True)
    fused_linear.fused_linear(x, w, b)
    fused_linear.fused_linear(x, w, b, activation="gelu")
    fused_linear.fused_linear(x, w, b, residual=residual)
    qkv = x.new_zeros(1, 6, 6, 96)
    for window in (0, 3):  # the whole 6 x 6 grid, or 3 x 3 windows of it
        attention.rel_pos_attention(qkv, x.new_zeros(96), x.new_zeros(11, 16), x.new_zeros(11, 16), 2, window)
    conv_args = (x.new_zeros(2, 3, 4, 4), x.new_zeros(5, 3, 3, 3), x.new_zeros(5))
    conv3x3.conv3x3_ln_gelu(*conv_args, x.new_ones(5), x.new_zeros(5), 1e-6)
    conv3x3.conv3x3_ln_gelu_project(*conv_args, x.new_ones(5), x.new_zeros(5), 1e-6, x.new_zeros(2, 9, 5))
    assert len(set(tuning_keys["fused_linear"])) == 3 and len(set(tuning_keys["rel_pos_attention"])) == 2, tuning_keys
    assert len(set(tuning_keys["conv3x3"])) == 2, tuning_keys


def test_global_blocks_are_offered_their_own_candidates(monkeypatch):
    """The launcher offers the tuner the global-only tiles (two grid rows of keys) in a global block
    and not in a windowed one, where they spill. Stand-ins as above let it run on the CPU."""
    offered = []

    def record(kernel, key, candidates, launch, device):
        offered.append(candidates)
        return launch(attention.INTERPRETER_CONFIG)

    monkeypatch.setattr(attention, "interpreting", lambda x, who: False)
    monkeypatch.setattr(attention.autotune, "run", record)
    qkv = torch.zeros(1, 5, 5, 96, dtype=torch.float16)
    for window in (0, 3):
        attention.rel_pos_attention(qkv, qkv.new_zeros(96), qkv.new_zeros(9, 16), qkv.new_zeros(9, 16), 2, window)
    global_candidates, windowed_candidates = offered
    assert global_candidates == attention.candidate_configs(torch.float16, global_block=True) != windowed_candidates
    assert windowed_candidates == attention.candidate_configs(torch.float16)


# ---------------------------------------------------------------------------------------------
# Every candidate computes the same function (interpreter: fp32 and fp16; the torch op on the CPU)
# ---------------------------------------------------------------------------------------------


LINEAR_CANDIDATES = [
    pytest.param(dtype, atol, config, id=f"{name}-" + ("-".join(map(str, config.values())) if "impl" in config else "x".join(str(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + ("-tma" if config.get("TMA") else "")))
    for dtype, atol, name in ((torch.float32, 1e-5, "fp32"), (torch.float16, 1e-2, "fp16"))
    for config in fused_linear.candidate_configs(dtype, activation="gelu")  # every candidate of either activation
]


@pytest.mark.parametrize("dtype, atol, config", LINEAR_CANDIDATES)
def test_every_linear_candidate(dtype, atol, config):
    for lead, k, n, activation, residual in (((37,), 80, 100, "gelu", True), ((2, 3, 5), 33, 48, "none", False)):
        x, w, b, r = make_inputs(lead, k, n, dtype, residual=residual)
        x2, r2 = x.reshape(-1, k), None if r is None else r.reshape(-1, n)
        got = fused_linear._linear(x2, w, b, r2, activation, config)
        expected = reference(x2, w, b, activation, r2)
        torch.testing.assert_close(got.double(), expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 5e-3, 5e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("window", [7, 0], ids=["window7_pad", "global9"])
def test_every_attention_candidate(dtype, atol, rtol, window):
    """Each tile shape on a 9x9 grid with head_dim 80: padded 7x7 windows, and global attention over
    81 tokens."""
    candidates = attention.candidate_configs(dtype, global_block=window == 0)
    # once per kernel variant: the interpreter ignores warps and stages
    for kernel_config in {tuple((k, v) for k, v in c.items() if k not in ("num_warps", "num_stages")) for c in candidates}:
        check_attention(1, 9, 160, 2, window, dtype, atol, rtol, config=dict(kernel_config))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-2, 1e-2), (torch.bfloat16, 3e-2, 3e-2)],
                         ids=["fp32", "fp16", "bf16"])
def test_every_candidate_at_real_shapes_gpu(dtype, atol, rtol, monkeypatch):
    """On the GPU, compiled: every linear candidate at vit_h's lin1 shape (batch 1), every attention
    candidate at a vit_h window and global block. A candidate that cannot launch (a tile that does
    not fit) is skipped, as the tuner skips it; one that runs must be right."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x, w, b, r = make_inputs((4096,), 1280, 5120, dtype, device="cuda", residual=True)
    expected = reference(x, w, b, "gelu", r)
    ran = 0
    for config in fused_linear.candidate_configs(dtype, activation="gelu"):
        try:
            got = fused_linear._linear(x, w, b, r, "gelu", config)
        except triton.runtime.errors.OutOfResources as e:
            warnings.warn(f"linear candidate {config} did not run: {e}")
            continue
        torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{config}: {m}")
        ran += 1
    assert ran >= 2
    for window in (14, 0):
        ran = 0
        for config in attention.candidate_configs(dtype, global_block=window == 0):
            try:
                check_attention(1, 64, 1280, 16, window, dtype, atol, rtol, device="cuda", config=config)
            except triton.runtime.errors.OutOfResources as e:
                warnings.warn(f"attention candidate {config} did not run: {e}")
                continue
            ran += 1
        assert ran >= 2


@pytest.mark.gpu
def test_tuned_launch_on_the_gpu(fresh_cache, monkeypatch):
    """The real thing once: tuning on (conftest turns it off for the rest of the suite), do_bench
    times every candidate of one fused_linear shape, the result is right, and the choice is cached
    under this GPU's name."""
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    x, w, b, r = make_inputs((3, 170), 256, 384, torch.float16, device="cuda", residual=True)
    got = fused_linear.fused_linear(x, w, b, activation="gelu", residual=r)
    torch.testing.assert_close(got.double(), reference(x, w, b, "gelu", r), atol=1e-2, rtol=1e-2)
    entries = json.loads((fresh_cache / autotune.CACHE_FILE).read_text())
    (key, config), = entries.items()
    assert key.startswith(torch.cuda.get_device_name()) and config in fused_linear.candidate_configs(torch.float16, activation="gelu")


@pytest.mark.gpu
def test_untuned_default_that_does_not_fit_falls_back_gpu(monkeypatch):
    """A default tile larger than any GPU's shared memory (4 stages of 256x128 + 256x128 fp16 tiles:
    512 KiB) is passed over for the next candidate, and the answer is right: what a 64 KiB GPU
    (T4) gets from the real 96 KiB default with SAMHQ_FAST_AUTOTUNE=0."""
    too_big = dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    real_candidates = fused_linear.candidate_configs
    monkeypatch.setattr(fused_linear, "candidate_configs", lambda *args, **kwargs: [too_big, *real_candidates(*args, **kwargs)])
    x, w, b, r = make_inputs((300,), 256, 384, torch.float16, device="cuda", residual=True)
    got = fused_linear.fused_linear(x, w, b, activation="gelu", residual=r)
    torch.testing.assert_close(got.double(), reference(x, w, b, "gelu", r), atol=1e-2, rtol=1e-2)
    (config,) = autotune._untuned.values()
    assert config != too_big


def test_fp32_linear_tuning_key_says_when_cublas_may_use_tf32(monkeypatch):
    """The cuBLAS candidate runs TF32 when torch allows it, the Triton ones never: a choice timed with
    TF32 on must not be reused with it off. (The key is built on the compiled path: stand-ins for the
    interpreter check and the tuner let it run on the CPU.)"""
    keys = []
    monkeypatch.setattr(fused_linear, "interpreting", lambda x, who: False)
    monkeypatch.setattr(fused_linear.autotune, "run", lambda kernel, key, candidates, launch, device: keys.append(key) or launch(fused_linear.TORCH_OP))
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    previous = torch.backends.cuda.matmul.allow_tf32  # a property of torch's, not an attribute monkeypatch can restore
    try:
        for allow_tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.testing.assert_close(fused_linear.fused_linear(x, w), x @ w.T)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert keys[0][-1] != "tf32" and keys[1] == keys[0] + ("tf32",)
