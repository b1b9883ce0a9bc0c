"""samhq_fast.graphs.GraphCache's bookkeeping, on the CPU with a stand-in for torch.cuda's graph API.

A real CUDA graph records kernels ("compute x * 2 into out") at capture and re-runs them on the
same buffers at replay. The stand-in does exactly that with Python closures the test function
registers, so what GraphCache must get right is visible without a GPU: warm-up before capture,
one capture per shape key, every input copied into the static buffers before each replay (else a
replay reads the previous call's inputs), outputs being the static buffers. The real thing runs in
the GPU-marked tests (test_fused_backend.py, test_decoding.py).
"""

import contextlib
import types

import pytest
import torch

from samhq_fast import graphs


class FakeGraph:
    capturing = None  # the graph being captured, if any
    device = None  # the current device, as the fake torch.cuda.device sets it
    log = []  # ("capture" | "replay", current device)

    def __init__(self):
        self.kernels = []

    def replay(self):
        FakeGraph.log.append(("replay", FakeGraph.device))
        for kernel in self.kernels:
            kernel()


@pytest.fixture
def fake_cuda(monkeypatch):
    pools = []

    FakeGraph.device, FakeGraph.log = None, []

    @contextlib.contextmanager
    def device(d):
        previous, FakeGraph.device = FakeGraph.device, d
        try:
            yield
        finally:
            FakeGraph.device = previous

    @contextlib.contextmanager
    def graph(g, pool=None):
        pools.append(pool)
        FakeGraph.log.append(("capture", FakeGraph.device))
        FakeGraph.capturing = g
        try:
            yield
        finally:
            FakeGraph.capturing = None

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    fake = types.SimpleNamespace(
        CUDAGraph=FakeGraph, graph=graph, device=device, graph_pool_handle=object, Stream=lambda: stream,
        current_stream=lambda: stream, stream=lambda s: contextlib.nullcontext(),
    )
    monkeypatch.setattr(graphs.torch, "cuda", fake)
    return pools


def scaled_sum(x, y, calls):
    """out = 2x + y (y may be None), as a 'kernel' a graph can record and replay."""
    calls.append("capture" if FakeGraph.capturing else "eager")
    out = torch.empty_like(x)

    def kernel():
        torch.add(2 * x, 0 if y is None else y, out=out)

    kernel()
    if FakeGraph.capturing:
        FakeGraph.capturing.kernels.append(kernel)
    return out


def test_graph_cache_replays_on_fresh_inputs(fake_cuda):
    calls = []
    cache = graphs.GraphCache(lambda x, y: scaled_sum(x, y, calls), warmup=2)
    a, b = torch.arange(4.0), torch.ones(4)
    out = cache("k", a, b)
    assert calls == ["eager", "eager", "capture"]  # warm-up twice, then one capture
    torch.testing.assert_close(out, 2 * a + b)
    for x, y in ((b, a), (a, a), (3 * b, b)):  # replays: same graph, new values
        out = cache("k", x, y)
        torch.testing.assert_close(out, 2 * x + y)
    assert calls == ["eager", "eager", "capture"]  # no new capture
    static_out = cache("k", a, b)
    assert cache("k", b, b) is static_out  # the graph's own output buffer: callers copy it out


def test_one_graph_per_key_sharing_one_pool(fake_cuda):
    calls = []
    cache = graphs.GraphCache(lambda x, y: scaled_sum(x, y, calls), warmup=1)
    small, large = torch.ones(3), torch.ones(5)
    torch.testing.assert_close(cache((3,), small, None), 2 * small)  # None passes through as a constant
    torch.testing.assert_close(cache((5,), large, large), 3 * large)
    torch.testing.assert_close(cache((3,), 4 * small, None), 8 * small)
    assert calls == ["eager", "capture", "eager", "capture"] and len(cache.graphs) == 2
    assert len(fake_cuda) == 2 and fake_cuda[0] is fake_cuda[1] is not None
    cache.clear()
    assert cache.graphs == {} and cache.pool is None


def test_graphs_share_input_buffers_of_one_layout(fake_cuda):
    """Two keys whose first argument has one shape and dtype read it from one static buffer (one copy
    of an image's features for every prompt bucket); alternating calls still get their own inputs,
    and a new key's warm-up runs on its own call's values, not on what the buffer held before."""
    seen = []

    def fn(x, y):
        if not FakeGraph.capturing:
            seen.append(x.clone())  # what the warm-up run read
        return scaled_sum(x, y, [])

    cache = graphs.GraphCache(fn, warmup=1)
    x, small, large = torch.arange(3.0), torch.ones(3), torch.ones(1)
    torch.testing.assert_close(cache("a", x, small), 2 * x + small)
    torch.testing.assert_close(cache("b", 5 * x, large), 10 * x + large)
    assert torch.equal(seen[-1], 5 * x)  # b's warm-up: this call's x, not a's
    assert cache.graphs["a"][1][0] is cache.graphs["b"][1][0]  # one buffer for x
    assert cache.graphs["a"][1][1] is not cache.graphs["b"][1][1]  # y: two shapes, two buffers
    for scale in (3.0, 7.0):
        torch.testing.assert_close(cache("a", scale * x, small).clone(), 2 * scale * x + small)
        torch.testing.assert_close(cache("b", -scale * x, large).clone(), -2 * scale * x + large)
    cache.clear()
    assert cache.input_buffers == {}


def test_copy_into_fills_every_buffer_from_its_own_input():
    """The copies into a graph's input buffers run grouped by dtype (one multi-tensor copy each):
    every buffer must still receive its own input, whatever the mix of dtypes, sizes and layouts;
    None buffers (constant None arguments) take nothing."""
    buffers = [torch.zeros(3), None, torch.zeros(2, dtype=torch.bool), torch.zeros(4, dtype=torch.int64),
               torch.zeros(3, 2), torch.zeros((), dtype=torch.bool), torch.zeros(1)]
    sources = [torch.arange(3.0), torch.ones(5), torch.tensor([True, False]), torch.arange(4),
               torch.arange(6.0).reshape(2, 3).t(), torch.tensor(True), torch.full((1,), 7.0)]  # a transposed view
    graphs.copy_into(buffers, sources)
    for buffer, source in zip(buffers, sources):
        assert buffer is None or torch.equal(buffer, source)


def test_inputs_are_copied_not_aliased(fake_cuda):
    """The graph keeps its own input buffers: changing the caller's tensor later changes nothing."""
    cache = graphs.GraphCache(lambda x, y: scaled_sum(x, y, []), warmup=0)
    x = torch.ones(2)
    cache("k", x, None)
    x.fill_(100.0)
    graph, static_args, _ = cache.graphs["k"]
    graph.replay()  # a replay without a call: runs on the buffers, which still hold the ones
    assert static_args[0] is not x and torch.equal(static_args[0], torch.ones(2))


def test_tensor_set_is_by_identity_and_does_not_keep_tensors_alive():
    """TensorSet: a tensor is in it by identity (an equal tensor, or a view, is not); a tensor freed
    leaves it (no entries pile up over a video's frames)."""
    a, b = torch.ones(3), torch.ones(3)
    members = graphs.TensorSet([a])
    assert a in members and b not in members and a[:2] not in members and None not in members
    for _ in range(100):
        members.add(torch.zeros(2))  # freed at once
    assert len(members) == 1
    del a
    assert len(members) == 0


def test_kept_inputs_given_again_are_not_copied_again(fake_cuda, monkeypatch):
    """A kept tensor given again is not copied again, while its buffer still holds it; it is after
    another tensor went into that buffer (another call, kept or not, or another key's capture sharing
    the buffer), after an in-place write that bumps its version, and tensors not kept always are.
    The outputs are right throughout."""
    copied = []
    copy = graphs.copy_into
    monkeypatch.setattr(graphs, "copy_into", lambda buffers, sources: copied.append(len(buffers)) or copy(buffers, sources))
    image, other, prompt, wide_prompt, not_kept = torch.arange(3.0), torch.ones(3), torch.ones(3), torch.ones(1), torch.zeros(3)
    kept = graphs.TensorSet([image, other])
    cache = graphs.GraphCache(lambda x, y: scaled_sum(x, y, []), warmup=0, kept=kept)

    def call(key, x, y, copies):
        copied.clear()
        torch.testing.assert_close(cache(key, x, y).clone(), 2 * x + y)
        assert copied == [copies]  # how many arguments were copied in

    call("a", image, prompt, 2)  # capture
    call("a", image, 2 * prompt, 1)  # the image is held: the prompt alone
    call("a", other, prompt, 2)
    call("a", image, prompt, 2)  # the buffer held `other`
    call("a", not_kept, prompt, 2)
    call("a", image, prompt, 2)  # the buffer held a tensor not kept
    call("a", image, prompt, 1)
    call("b", image, wide_prompt, 1)  # another key, the same image buffer: its capture copies the prompt alone
    with torch.no_grad():
        image.add_(1)  # bumps image's version
    call("b", image, wide_prompt, 2)
    call("a", image, prompt, 1)
    copied.clear()
    cache.clear()
    call("a", image, prompt, 2)  # new buffers hold nothing


def test_graphs_are_captured_and_replayed_on_the_inputs_device(fake_cuda):
    """torch.cuda's streams, pools and captures use the current device: GraphCache makes it the
    inputs' device (a model on cuda:1 must not be captured on cuda:0)."""
    cache = graphs.GraphCache(lambda x, y: scaled_sum(x, y, []), warmup=1)
    x = torch.ones(2)
    cache("k", x, None)  # capture, then the first replay
    cache("k", x, None)
    assert FakeGraph.log == [("capture", x.device), ("replay", x.device), ("replay", x.device)]
    assert FakeGraph.device is None  # restored after each call


class StubModel(torch.nn.Module):
    """Stands in for a SamHQ model in GraphedEncoder: encode_image is three scaled_sum 'kernels'
    (each output 2 x images); a weight and a submodule's, whose replacement (like a .to() / .half(),
    or load_state_dict(assign=True)) must re-capture."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.head = torch.nn.Linear(1, 1)
        self.config = types.SimpleNamespace(img_size=4)
        self.device = torch.device("cuda")
        self.calls = []

    def encode_image(self, images):
        return tuple(scaled_sum(images, None, self.calls) for _ in range(3))


@pytest.fixture
def graphed_stub(fake_cuda):
    model = StubModel()
    encoder = graphs.GraphedEncoder(model)
    model.device = torch.device("cpu")  # built as a CUDA model; the stand-in graphs then run on CPU tensors
    return model, encoder


def test_graphed_encoder_results_survive_the_next_replay(graphed_stub):
    _, encoder = graphed_stub
    first_images = torch.ones(1, 3, 4, 4)
    first = encoder(first_images)
    encoder(5 * first_images)  # the same graph replays into its buffers: what the caller holds must not change
    for t in first:
        torch.testing.assert_close(t, 2 * first_images)


def test_graphed_encoder_one_graph_per_batch_size(graphed_stub):
    model, encoder = graphed_stub
    for batch in (1, 2, 1, 3, 2):
        images = torch.arange(batch * 48.0).view(batch, 3, 4, 4)
        for t in encoder(images):
            torch.testing.assert_close(t, 2 * images)
    assert model.calls.count("capture") == 3 * 3  # three batch sizes, three outputs each


def test_graphed_encoder_captures_again_after_a_cast(graphed_stub):
    model, encoder = graphed_stub
    encoder(torch.ones(1, 3, 4, 4))
    model.double()  # new tensors for the same Parameter objects (param.data = ...): nothing is registered
    encoder(torch.ones(1, 3, 4, 4))
    assert model.calls.count("capture") == 2 * 3


def test_graphed_encoder_captures_again_after_new_weights_of_the_same_dtype(graphed_stub):
    """load_state_dict(assign=True) replaces the weight tensors without changing device or dtype:
    the graphs captured before would replay the old weights' addresses."""
    model, encoder = graphed_stub
    encoder(torch.ones(1, 3, 4, 4))
    old = model.weight  # (kept alive: the new weight cannot take its address)
    model.weight = torch.nn.Parameter(torch.ones(1))
    encoder(torch.ones(1, 3, 4, 4))
    assert old.dtype == model.weight.dtype and model.calls.count("capture") == 2 * 3


def test_graphed_encoder_captures_again_after_a_submodule_s_weights_are_assigned(graphed_stub):
    """load_state_dict(assign=True) on a submodule replaces its weights and leaves the model's first
    weight as it was; modules built elsewhere meanwhile register weights too, but not on this model."""
    model, encoder = graphed_stub
    encoder(torch.ones(1, 3, 4, 4))
    torch.nn.Linear(1, 1)
    encoder(torch.ones(1, 3, 4, 4))
    assert model.calls.count("capture") == 3
    model.head.load_state_dict({"weight": torch.full((1, 1), 2.0), "bias": torch.zeros(1)}, assign=True)
    encoder(torch.ones(1, 3, 4, 4))
    assert model.calls.count("capture") == 2 * 3


def test_modules_built_after_a_watch_may_be_unhashable(graphed_stub):
    """The watch's hook sees every module registration in the process, also of modules that define
    __eq__ without __hash__ (dataclass-style): it must not fail on them."""

    class Unhashable(torch.nn.Module):
        __hash__ = None

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

    assert Unhashable().weight.shape == (1,)
